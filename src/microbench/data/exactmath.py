"""Float math whose every bit is the same on every x86-64 CPU, for the embedded sample's generator.

NumPy dispatches ``sin``/``cos``/``exp``/``log``/``arctan2`` to SIMD kernels chosen at run time (AVX2, AVX-512, or
baseline when ``NPY_DISABLE_CPU_FEATURES`` switches them off), and their results differ in the last bits between
kernels; ``scipy.ndimage.gaussian_filter`` builds its kernel with ``numpy.exp``; ``skimage.draw.ellipse`` rotates with
``numpy.sin``/``cos``; ``skimage.measure.approximate_polygon`` breaks exact ties through ``arctan2``. A sample that
goes through them is only "deterministic" on one CPU. Everything here uses only the correctly rounded IEEE-754
operations (``+ - * /``, ``sqrt``, ``floor``, ``ldexp``/``frexp``), one NumPy ufunc at a time (so nothing can be
fused into an FMA), in a fixed order: the result is bit-identical whatever kernel NumPy picks. Polygon simplification
is done in integers. Accuracy is a few ulp, which is all a procedural image needs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

PI = 3.141592653589793
TWO_PI = 6.283185307179586
LN2 = 0.6931471805599453

# Taylor coefficients 1/k!, computed once in exact rational steps (each a correctly rounded division).
_INV_FACT = [1.0]
for _k in range(1, 32):
    _INV_FACT.append(_INV_FACT[-1] / _k)


def _horner(coeffs: list[float], x):
    p = np.zeros_like(x) + coeffs[-1]
    for c in reversed(coeffs[:-1]):
        p = np.add(np.multiply(p, x), c)
    return p


def _out(x_in, y):
    return float(y) if np.ndim(x_in) == 0 else y


def sin(x):
    """sin(x), bit-identical on every CPU (range reduction to [-π, π], Taylor series to x^29)."""
    a = np.asarray(x, dtype=np.float64)
    r = np.subtract(a, np.multiply(np.floor(np.add(np.divide(a, TWO_PI), 0.5)), TWO_PI))
    r2 = np.multiply(r, r)
    coeffs = [(-1.0) ** k * _INV_FACT[2 * k + 1] for k in range(15)]  # r·Σ (-1)^k r^2k/(2k+1)!
    return _out(x, np.multiply(r, _horner(coeffs, r2)))


def cos(x):
    """cos(x), bit-identical on every CPU (range reduction to [-π, π], Taylor series to x^30)."""
    a = np.asarray(x, dtype=np.float64)
    r = np.subtract(a, np.multiply(np.floor(np.add(np.divide(a, TWO_PI), 0.5)), TWO_PI))
    r2 = np.multiply(r, r)
    coeffs = [(-1.0) ** k * _INV_FACT[2 * k] for k in range(16)]
    return _out(x, _horner(coeffs, r2))


def exp(x):
    """exp(x), bit-identical on every CPU (x = k·ln2 + r, |r| ≤ ln2/2, Taylor series to r^17, exact ldexp)."""
    a = np.asarray(x, dtype=np.float64)
    k = np.floor(np.add(np.divide(a, LN2), 0.5))
    r = np.subtract(a, np.multiply(k, LN2))
    p = _horner(_INV_FACT[:18], r)
    return _out(x, np.ldexp(p, k.astype(np.int64)))


def log(x):
    """Natural log of x > 0, bit-identical on every CPU (x = m·2^e exactly, atanh series in s = (m−1)/(m+1))."""
    a = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(a)  # exact: a = m·2^e, m in [0.5, 1)
    small = m < 0.7071067811865476
    m = np.where(small, np.multiply(m, 2.0), m)
    e = np.where(small, e - 1, e).astype(np.float64)
    s = np.divide(np.subtract(m, 1.0), np.add(m, 1.0))
    s2 = np.multiply(s, s)
    coeffs = [1.0 / (2 * k + 1) for k in range(14)]
    logm = np.multiply(np.multiply(s, 2.0), _horner(coeffs, s2))
    return _out(x, np.add(logm, np.multiply(e, LN2)))


def hypot(a, b):
    """sqrt(a² + b²) with correctly rounded operations only."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.sqrt(np.add(np.multiply(a, a), np.multiply(b, b)))


def _gaussian_kernel(sigma: float, order: int, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = exp(np.multiply(np.multiply(x, x), -0.5 / (float(sigma) * float(sigma))))
    phi = np.divide(phi, float(sum(phi.tolist())))  # a Python left-to-right sum: a fixed order
    if order == 0:
        return phi
    if order == 1:
        return np.multiply(np.multiply(x, -1.0 / (float(sigma) * float(sigma))), phi)
    raise ValueError(f"order {order} is not supported")


def gaussian_filter(image: np.ndarray, sigma: float, orders: tuple[int, ...] | None = None) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` (mode ``reflect``, ``truncate=4``) with a CPU-independent kernel.

    The separable passes run through ``scipy.ndimage.correlate1d`` (plain C, no run-time dispatch); like SciPy, the
    output keeps the input's dtype.
    """
    image = np.asarray(image)
    orders = orders or (0,) * image.ndim
    out = image
    for axis, order in enumerate(orders):
        out = ndi.correlate1d(out, _gaussian_kernel(sigma, order)[::-1], axis=axis, mode="reflect")
    return out


def gaussian_gradient_magnitude(image: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_gradient_magnitude`` with a CPU-independent kernel (float input)."""
    image = np.asarray(image, dtype=np.float64)
    total = np.zeros_like(image)
    for axis in range(image.ndim):
        d = gaussian_filter(image, sigma, tuple(1 if a == axis else 0 for a in range(image.ndim)))
        total = np.add(total, np.multiply(d, d))
    return np.sqrt(total)


def ellipse_mask(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, rotation: float = 0.0
                 ) -> np.ndarray:
    """Boolean mask of the pixels strictly inside an ellipse, as ``skimage.draw.ellipse`` draws it (same rotation
    convention: radians, counter-clockwise from the column axis), rotated with the functions above."""
    rot = float(rotation) % PI
    s, c = sin(rot), cos(rot)
    rr = np.arange(shape[0], dtype=np.float64)[:, None] - float(cy)
    cc = np.arange(shape[1], dtype=np.float64)[None, :] - float(cx)
    u = np.divide(np.add(np.multiply(rr, c), np.multiply(cc, s)), float(ry))
    v = np.divide(np.subtract(np.multiply(rr, s), np.multiply(cc, c)), float(rx))
    return np.add(np.multiply(u, u), np.multiply(v, v)) < 1.0


def simplify_closed_contour(points2: np.ndarray, tol_num: int = 8, tol_den: int = 5) -> np.ndarray:
    """Douglas–Peucker simplification of an integer polyline, exactly (tolerance ``tol_num/tol_den`` in the points'
    units; ties go to the first point). ``points2`` are (row, col) integers, e.g. doubled half-pixel contour points.

    Distances are compared as squared integers scaled by the segment's squared length, so no float rounding — and
    no CPU — can change which vertex is kept.
    """
    pts = np.asarray(points2, dtype=np.int64)
    keep = np.zeros(len(pts), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(pts) - 1)]
    tn2, td2 = tol_num * tol_num, tol_den * tol_den
    while stack:
        start, end = stack.pop()
        if end - start < 2:
            continue
        p0, p1 = pts[start], pts[end]
        seg = pts[start + 1:end]
        d = p1 - p0
        len2 = int(d @ d)
        v0, v1 = seg - p0, seg - p1
        e0, e1 = (v0 * v0).sum(axis=1), (v1 * v1).sum(axis=1)
        if len2 == 0:
            key, scale = e0, 1
        else:
            proj0 = v0 @ d
            proj1 = -(v1 @ d)
            perp = (proj0 > 0) & (proj1 > 0)
            cross = v0[:, 0] * d[1] - v0[:, 1] * d[0]
            key = np.where(perp, cross * cross, np.minimum(e0, e1) * len2)  # distance² · len2
            scale = len2
        best = int(np.argmax(key))
        if int(key[best]) * td2 > tn2 * scale:  # distance > tolerance
            mid = start + 1 + best
            keep[mid] = True
            stack.append((mid, end))
            stack.append((start, mid))
    return pts[keep]
