"""Procedural microscopy-like images whose class is visible, for the embedded sample.

Each generator takes a class name and a NumPy ``Generator`` and returns ``(rgb uint8 HxWx3, instances)`` where
``instances`` is a list of ``(className, polygon [(x, y), ...])`` in pixels (empty for classification-only data).
The renderings follow the physics loosely on purpose (Beer–Lambert colour for H&E/Giemsa/IHC, additive emission
for fluorescence, electron density for EM) so that features which work on the sample transfer sensibly.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import draw, measure

from microbench.data import exactmath as em

SIZE = 96
Instance = tuple[str, list[tuple[float, float]]]

# Beer–Lambert optical densities per unit stain (R, G, B)
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])
_GIEMSA_AZURE = np.array([0.55, 0.80, 0.25])


def _absorb(*layers: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Transmitted-light colour from stain density maps: I = 255·exp(−Σ density·OD)."""
    od = sum(d[..., None] * vec for d, vec in layers)
    return np.clip(255.0 * em.exp(-od), 0, 255).astype(np.uint8)


def _emit(intensity: np.ndarray, colour: tuple[float, float, float], rng, noise: float = 0.015) -> np.ndarray:
    """Fluorescence: an emission map in one colour channel mix, with shot-like noise, on black."""
    img = np.clip(intensity, 0, None)
    img = img / max(float(img.max()), 1e-6)
    img = np.clip(img + rng.normal(0, noise, img.shape), 0, 1)
    return (img[..., None] * np.array(colour) * 255).astype(np.uint8)


def _gray(intensity: np.ndarray, rng, noise: float = 0.04) -> np.ndarray:
    img = np.clip(intensity + rng.normal(0, noise, intensity.shape), 0, 1)
    return np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)


def _smooth_noise(rng, sigma: float, shape=(SIZE, SIZE)) -> np.ndarray:
    n = em.gaussian_filter(rng.normal(0, 1, shape), sigma)
    return (n - n.min()) / max(float(np.ptp(n)), 1e-6)


def _blob(shape, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    return em.ellipse_mask(shape, cy, cx, max(ry, 1), max(rx, 1), angle).astype(float)


def _polygon_of(mask: np.ndarray) -> list[tuple[float, float]] | None:
    """Outer contour of a binary mask as an (x, y) polygon in pixels, simplified (0.8 px); None if too small.

    The marching-squares contour of a 0/1 mask lies exactly on half pixels, so doubling it gives integers, which are
    simplified exactly (``exactmath.simplify_closed_contour``): the vertices are the same on every CPU.
    """
    contours = measure.find_contours(np.pad(mask.astype(float), 1), 0.5)
    if not contours:
        return None
    doubled = np.rint(max(contours, key=len) * 2).astype(np.int64)
    c = em.simplify_closed_contour(doubled, 8, 5) - 2  # tolerance 1.6 half-pixels = 0.8 px; undo the padding
    if len(c) < 4:
        return None
    hi_x, hi_y = mask.shape[1] - 1, mask.shape[0] - 1
    return [(min(max(x / 2, 0.0), hi_x), min(max(y / 2, 0.0), hi_y)) for y, x in c[:-1].tolist()]


# --- hematology (Giemsa) ------------------------------------------------------------------------------------

def blood_cell(cls: str, rng) -> tuple[np.ndarray, list[Instance]]:
    shape = (SIZE, SIZE)
    eo = np.full(shape, 0.10)
    az = np.zeros(shape)
    for _ in range(rng.integers(3, 6)):  # red cells around the white cell
        cy, cx = rng.uniform(0, SIZE, 2)
        r = rng.uniform(9, 12)
        disc = _blob(shape, cy, cx, r, r)
        pale = _blob(shape, cy, cx, r * 0.45, r * 0.45)
        eo += 0.55 * disc - 0.25 * pale
    cy, cx = SIZE / 2 + rng.uniform(-6, 6, 2)
    rc = {"lymphocyte": 19, "basophil": 21}.get(cls, 24) * rng.uniform(0.92, 1.08)
    cyto = _blob(shape, cy, cx, rc, rc * rng.uniform(0.9, 1.0), rng.uniform(0, np.pi))
    eo = eo * (1 - cyto)
    az += 0.25 * cyto
    nucleus = np.zeros(shape)
    if cls == "lymphocyte":
        nucleus = _blob(shape, cy, cx, rc * 0.85, rc * 0.8, rng.uniform(0, np.pi))
    elif cls == "neutrophil":
        k = rng.integers(3, 5)
        a0 = rng.uniform(0, 2 * np.pi)
        for j in range(k):
            a = a0 + 2 * np.pi * j / k
            nucleus = np.maximum(nucleus, _blob(shape, cy + 9 * em.sin(a), cx + 9 * em.cos(a), 5.5, 5.5))
    elif cls == "eosinophil":
        a = rng.uniform(0, np.pi)
        for s in (-1, 1):
            nucleus = np.maximum(nucleus, _blob(shape, cy + s * 8 * em.sin(a), cx + s * 8 * em.cos(a), 7, 7))
        gran = (rng.random(shape) < 0.35) * cyto
        eo += 1.1 * em.gaussian_filter(gran, 0.6)
    elif cls == "basophil":
        nucleus = _blob(shape, cy, cx, rc * 0.6, rc * 0.5, rng.uniform(0, np.pi))
        gran = (rng.random(shape) < 0.30) * cyto
        az += 1.8 * em.gaussian_filter(gran, 0.7)
    else:
        raise KeyError(cls)
    az += 1.6 * em.gaussian_filter(nucleus, 0.8)
    rgb = _absorb((eo, _EOSIN), (az, _GIEMSA_AZURE))
    return rgb, []


# --- histology (H&E) ----------------------------------------------------------------------------------------

def he_tissue(cls: str, rng) -> tuple[np.ndarray, list[Instance]]:
    shape = (SIZE, SIZE)
    H = np.zeros(shape)
    E = 0.35 + 0.15 * _smooth_noise(rng, 3)
    if cls == "tumor":
        E *= 0.8
        for _ in range(rng.integers(28, 38)):
            cy, cx = rng.uniform(0, SIZE, 2)
            H = np.maximum(H, _blob(shape, cy, cx, rng.uniform(4, 7), rng.uniform(3, 5), rng.uniform(0, np.pi)))
        H = 1.1 * em.gaussian_filter(H, 0.8) + 0.15
    elif cls == "stroma":
        yy, xx = np.mgrid[:SIZE, :SIZE]
        ang = rng.uniform(0, np.pi)
        wave = em.sin((xx * em.cos(ang) + yy * em.sin(ang)) / 2.2 + 3 * _smooth_noise(rng, 8) * 2)
        E = 0.45 + 0.35 * (wave > 0.2)
        for _ in range(rng.integers(3, 7)):
            cy, cx = rng.uniform(0, SIZE, 2)
            H = np.maximum(H, _blob(shape, cy, cx, 6, 1.6, ang + np.pi / 2))
        H = 1.0 * H
    elif cls == "adipose":
        E = np.full(shape, 0.02)
        walls = np.zeros(shape)
        pts = rng.uniform(0, SIZE, (9, 2))
        yy, xx = np.mgrid[:SIZE, :SIZE]
        d = np.sort(em.hypot(yy[..., None] - pts[:, 0], xx[..., None] - pts[:, 1]), axis=-1)
        walls = (d[..., 1] - d[..., 0]) < 1.5
        E = E + 0.6 * walls
    elif cls == "lympho":
        E *= 0.5
        for _ in range(rng.integers(70, 95)):
            cy, cx = rng.uniform(0, SIZE, 2)
            r = rng.uniform(2.2, 3.2)
            H = np.maximum(H, _blob(shape, cy, cx, r, r))
        H = 1.6 * H
    elif cls in ("chronic_heart_failure", "not_chronic_heart_failure"):
        yy, xx = np.mgrid[:SIZE, :SIZE]
        ang = rng.uniform(-0.3, 0.3)
        fibres = em.sin((yy * em.cos(ang) - xx * em.sin(ang)) / 3.0 + 2 * _smooth_noise(rng, 10))
        E = 0.55 + 0.25 * (fibres > -0.6)
        n_nuc = rng.integers(5, 9)
        for _ in range(n_nuc):
            cy, cx = rng.uniform(0, SIZE, 2)
            big = cls == "chronic_heart_failure"
            H = np.maximum(H, _blob(shape, cy, cx, 2.0 if not big else 4.0, 5 if not big else 7, ang))
        H = 1.2 * H
        if cls == "chronic_heart_failure":  # interstitial fibrosis: pale, bluish-grey collagen bands and gaps
            band = _smooth_noise(rng, 5) > 0.55
            E = np.where(band, 0.18, E)
            H = H + 0.25 * band
    else:
        raise KeyError(cls)
    return _absorb((H, _HEMATOXYLIN), (E, _EOSIN)), []


def glands(cls: str, rng) -> tuple[np.ndarray, list[Instance]]:
    """GlaS-like H&E field with gland polygons; malignant glands are distorted and their nuclei crowded."""
    shape = (SIZE, SIZE)
    E = 0.45 + 0.15 * _smooth_noise(rng, 4)
    H = np.zeros(shape)
    instances: list[Instance] = []
    centers = [(SIZE * 0.3, SIZE * 0.3), (SIZE * 0.7, SIZE * 0.65)] if rng.random() < 0.5 else [(SIZE / 2, SIZE / 2)]
    for cy, cx in centers:
        cy, cx = cy + rng.uniform(-4, 4), cx + rng.uniform(-4, 4)
        r = rng.uniform(14, 18) if len(centers) == 2 else rng.uniform(22, 28)
        theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        amp = 0.05 if cls == "benign" else 0.30
        radius = r * (1 + amp * em.sin(3 * theta + rng.uniform(0, 6)) + amp * 0.6 * em.sin(5 * theta + rng.uniform(0, 6)))
        ys, xs = cy + radius * em.sin(theta), cx + radius * em.cos(theta)
        gland = np.zeros(shape)
        rr, cc = draw.polygon(ys, xs, shape)
        gland[rr, cc] = 1
        lumen = ndi.binary_erosion(gland, iterations=5 if cls == "benign" else 3)
        rim = gland.astype(bool) & ~lumen
        E = np.where(lumen, 0.02, E)
        p_nuc = 0.18 if cls == "benign" else 0.55
        H += 1.5 * em.gaussian_filter((rng.random(shape) < p_nuc) * rim, 0.7)
        poly = _polygon_of(gland > 0)
        if poly:
            instances.append(("gland", poly))
    return _absorb((H, _HEMATOXYLIN), (E, _EOSIN)), instances


# --- fluorescence -------------------------------------------------------------------------------------------

def _nucleus_intensity(stage: str, shape, cy, cx, rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """Chromatin emission for one cell at a mitotic stage; returns (intensity, [instance masks])."""
    a = rng.uniform(0, np.pi)
    if stage in ("interphase", "g1", "s", "g2"):
        m = _blob(shape, cy, cx, rng.uniform(10, 13), rng.uniform(8, 11), a)
        inten = m * (0.6 + 0.15 * _smooth_noise(rng, 2, shape))
        return inten, [m]
    if stage == "prophase":
        m = _blob(shape, cy, cx, 11, 10, a)
        speck = em.gaussian_filter((rng.random(shape) < 0.25).astype(float), 0.7) * m
        return m * 0.25 + 2.0 * speck, [m]
    if stage == "prometaphase":
        m = np.zeros(shape)
        for _ in range(7):
            m = np.maximum(m, _blob(shape, cy + rng.normal(0, 4), cx + rng.normal(0, 4), 2.5, 4.5, rng.uniform(0, np.pi)))
        return m, [m]
    if stage == "metaphase":
        m = _blob(shape, cy, cx, 3.2, 12, a)
        return m, [m]
    if stage == "anaphase":
        masks = []
        for s in (-1, 1):
            masks.append(_blob(shape, cy + s * 6 * em.cos(a), cx - s * 6 * em.sin(a), 2.6, 10, a))
        return np.maximum(*masks), masks
    if stage == "telophase":
        masks = []
        for s in (-1, 1):
            masks.append(_blob(shape, cy + s * 13 * em.cos(a), cx - s * 13 * em.sin(a), 6, 6, a))
        return np.maximum(*masks), masks
    raise KeyError(stage)


def fluorescent_nuclei(cls: str, rng, colour=(0.3, 0.55, 1.0), n_cells: tuple[int, int] = (1, 2),
                       class_name: str | None = None) -> tuple[np.ndarray, list[Instance]]:
    shape = (SIZE, SIZE)
    inten = np.zeros(shape)
    instances: list[Instance] = []
    k = int(rng.integers(n_cells[0], n_cells[1] + 1))
    slots = [(SIZE / 2, SIZE / 2)] if k == 1 else [(SIZE * 0.3, SIZE * 0.3), (SIZE * 0.7, SIZE * 0.7),
                                                   (SIZE * 0.3, SIZE * 0.72), (SIZE * 0.72, SIZE * 0.28)][:k]
    for cy, cx in slots:
        i, masks = _nucleus_intensity(cls, shape, cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3), rng)
        inten = np.maximum(inten, i)
        if class_name:
            for m in masks:
                poly = _polygon_of(m > 0)
                if poly:
                    instances.append((class_name, poly))
    inten = em.gaussian_filter(inten, 1.0) + 0.04 * _smooth_noise(rng, 6)
    return _emit(inten, colour, rng), instances


def darkfield_cell(cls: str, rng) -> tuple[np.ndarray, list[Instance]]:
    """Darkfield: only edges scatter light, so cell and chromatin outlines glow on black."""
    shape = (SIZE, SIZE)
    cell = _blob(shape, SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-3, 3), 26, 24, rng.uniform(0, np.pi))
    chrom, _ = _nucleus_intensity(cls, shape, SIZE / 2, SIZE / 2, rng)
    edges = em.gaussian_gradient_magnitude(cell, 1.2) + 1.5 * em.gaussian_gradient_magnitude(chrom, 1.0)
    return _gray(edges / max(float(edges.max()), 1e-6) * 0.9, rng, 0.03), []


def golgi(cls: str, rng) -> tuple[np.ndarray, list[Instance]]:
    """GalT–EGFP: a compact perinuclear ribbon, two twin ribbons, or a diffuse haze; boxes around ribbons."""
    shape = (SIZE, SIZE)
    inten = 0.05 * _smooth_noise(rng, 5)
    masks = []
    cy, cx = SIZE / 2 + rng.uniform(-6, 6, 2)
    if cls == "interphase":
        masks.append(_blob(shape, cy, cx, 6, 12, rng.uniform(0, np.pi)))
    elif cls == "golgi_twin":
        a = rng.uniform(0, np.pi)
        for s in (-1, 1):
            masks.append(_blob(shape, cy + s * 15 * em.sin(a), cx + s * 15 * em.cos(a), 5, 8, a))
    elif cls == "diffuse":
        inten = inten + 0.5 * _blob(shape, cy, cx, 30, 26) * _smooth_noise(rng, 1.2)
    else:
        raise KeyError(cls)
    for m in masks:
        inten = inten + m * (0.7 + 0.3 * _smooth_noise(rng, 1.5))
    img = _emit(em.gaussian_filter(inten, 1.0), (0.2, 1.0, 0.3), rng)
    return img, [("golgi", p) for p in (_polygon_of(m > 0) for m in masks) if p]


def filaments_or_puncta(cls: str, rng) -> tuple[np.ndarray, list[Instance]]:
    shape = (SIZE, SIZE)
    inten = np.zeros(shape)
    if cls == "filamentous":
        for _ in range(rng.integers(6, 10)):
            y0, x0 = rng.uniform(0, SIZE, 2)
            a = rng.uniform(0, np.pi)
            rr, cc, val = draw.line_aa(int(y0), int(x0), int(np.clip(y0 + 80 * em.sin(a), 0, SIZE - 1)),
                                       int(np.clip(x0 + 80 * em.cos(a), 0, SIZE - 1)))
            inten[rr, cc] = np.maximum(inten[rr, cc], val)
    elif cls == "punctate":
        inten = (rng.random(shape) < 0.012).astype(float)
    else:
        raise KeyError(cls)
    return _emit(em.gaussian_filter(inten, 1.0), (0.2, 1.0, 0.2), rng, noise=0.025), []


def opencell_field(cls: str, rng) -> tuple[np.ndarray, list[Instance]]:
    """OpenCell-like confocal field: a tagged protein that is nuclear or cytoplasmic; nuclei as polygons."""
    shape = (SIZE, SIZE)
    nuclei, cells = [], np.zeros(shape)
    for cy, cx in ((28, 28), (68, 66), (30, 70), (70, 26))[: rng.integers(2, 5)]:
        cy, cx = cy + rng.uniform(-4, 4), cx + rng.uniform(-4, 4)
        nuclei.append(_blob(shape, cy, cx, 9, 8, rng.uniform(0, np.pi)))
        cells = np.maximum(cells, _blob(shape, cy, cx, 19, 17, rng.uniform(0, np.pi)))
    nuc = np.max(nuclei, axis=0)
    inten = nuc if cls == "nuclear" else cells * (1 - nuc) * (0.5 + 0.5 * _smooth_noise(rng, 1.5))
    img = _emit(em.gaussian_filter(inten, 1.0), (0.3, 1.0, 0.4), rng)
    return img, [("nucleus", p) for p in (_polygon_of(m > 0) for m in nuclei) if p]


def synthetic_cell(contour: str, eccentricity: str, texture: str, rng) -> tuple[np.ndarray, list[Instance]]:
    """Burgess-style synthetic cell whose contour, eccentricity and texture are each set to one of 3 levels."""
    amp = {"smooth_contours": 0.0, "intermediate": 0.10, "irregular_contours": 0.22}[contour]
    ratio = {"round_shape": 1.0, "intermediate": 0.75, "elongated_shape": 0.5}[eccentricity]
    sigma = {"fine_texture": 0.6, "intermediate": 1.4, "coarse_texture": 3.0}[texture]
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = 28 * (1 + amp * em.sin(7 * theta + rng.uniform(0, 6)) + amp * 0.5 * em.sin(11 * theta + rng.uniform(0, 6)))
    a = rng.uniform(0, np.pi)
    x, y = r * em.cos(theta), r * em.sin(theta) * ratio
    cx, cy = SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-3, 3)
    xs, ys = cx + x * em.cos(a) - y * em.sin(a), cy + x * em.sin(a) + y * em.cos(a)
    cell = np.zeros((SIZE, SIZE))
    rr, cc = draw.polygon(ys, xs, cell.shape)
    cell[rr, cc] = 1
    nucleus = _blob(cell.shape, cy, cx, 8, 8 * max(ratio, 0.7), a)
    tex = _smooth_noise(rng, sigma)
    inten = cell * (0.35 + 0.45 * tex) + 0.35 * nucleus
    img = _gray(np.clip(inten, 0, 1), rng, 0.02)
    inst = [(n, p) for n, p in (("cell", _polygon_of(cell > 0)), ("nucleus", _polygon_of(nucleus > 0))) if p]
    return img, inst


# --- electron microscopy ------------------------------------------------------------------------------------

def em_texture(cls: str, rng) -> tuple[np.ndarray, list[Instance]]:
    shape = (SIZE, SIZE)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    base = 0.55 + 0.1 * _smooth_noise(rng, 6)
    if cls == "cardiac_muscle":  # sarcomeres: dark Z-lines at a regular period
        a = rng.uniform(-0.4, 0.4)
        u = xx * em.cos(a) + yy * em.sin(a)
        period = rng.uniform(9, 12)
        img = base - 0.35 * (em.cos(2 * np.pi * u / period) > 0.85) - 0.12 * em.cos(2 * np.pi * u / period)
    elif cls == "tobacco_leaf_chloroplast":  # oval plastid with stacked thylakoid lamellae
        a = rng.uniform(0, np.pi)
        plastid = _blob(shape, SIZE / 2, SIZE / 2, 24, 40, a)
        v = -xx * em.sin(a) + yy * em.cos(a)
        lam = (em.sin(v / 1.3) > 0.6) * plastid
        img = base - 0.15 * plastid - 0.3 * lam
    elif cls == "zebrafish_retina":  # packed photoreceptor profiles
        img = base.copy()
        step = rng.uniform(13, 16)
        for i, y0 in enumerate(np.arange(0, SIZE + step, step)):
            for x0 in np.arange((i % 2) * step / 2, SIZE + step, step):
                img -= 0.35 * em.gaussian_filter(_blob(shape, y0, x0, step * 0.38, step * 0.38), 0.8)
    elif cls == "hela_metaphase":  # dark chromosome mass in the middle of pale cytoplasm
        img = base + 0.1
        mass = np.zeros(shape)
        for _ in range(14):
            mass = np.maximum(mass, _blob(shape, SIZE / 2 + rng.normal(0, 5), SIZE / 2 + rng.normal(0, 12), 2.5, 7,
                                          rng.uniform(0, np.pi)))
        img -= 0.55 * em.gaussian_filter(mass, 0.8)
    else:
        raise KeyError(cls)
    return _gray(np.clip(img, 0, 1), rng, 0.03), []


# --- real micrographs shipped with scikit-image ------------------------------------------------------------

def _dab_density(rgb: np.ndarray) -> np.ndarray:
    """The DAB channel of ``skimage.color.rgb2hed`` (Ruifrok & Johnston colour deconvolution), computed with a
    matrix inverse in exact rationals and ``exactmath.log`` so it does not depend on BLAS/LAPACK or SIMD kernels."""
    from fractions import Fraction

    hed = [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]  # skimage's rgb_from_hed
    m = [[Fraction(v) for v in row] for row in hed]
    det = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
           + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    # third column of the inverse: the cofactors of the third row, transposed
    col = [(m[0][1] * m[1][2] - m[0][2] * m[1][1]) / det, -(m[0][0] * m[1][2] - m[0][2] * m[1][0]) / det,
           (m[0][0] * m[1][1] - m[0][1] * m[1][0]) / det]
    log_adjust = em.log(1e-6)
    od = [np.divide(em.log(np.maximum(np.divide(rgb[..., c].astype(np.float64), 255.0), 1e-6)), log_adjust)
          for c in range(3)]
    dab = np.add(np.add(np.multiply(od[0], float(col[0])), np.multiply(od[1], float(col[1]))),
                 np.multiply(od[2], float(col[2])))
    return np.maximum(dab, 0.0)


def ihc_tiles(rng) -> list[tuple[np.ndarray, str]]:
    """Tiles of skimage's IHC image, labelled ``strong``/``weak`` by DAB-positive area (top/bottom 12 tiles)."""
    from skimage import data
    img = data.immunohistochemistry()
    dab = _dab_density(img)
    tiles = []
    for y in range(0, img.shape[0] - SIZE + 1, 52):
        for x in range(0, img.shape[1] - SIZE + 1, 52):
            tiles.append((float((dab[y:y + SIZE, x:x + SIZE] > 0.03).mean()), img[y:y + SIZE, x:x + SIZE]))
    tiles.sort(key=lambda t: t[0])
    return [(t, "weak") for _, t in tiles[:12]] + [(t, "strong") for _, t in tiles[-12:]]


def phase_cell_tiles(rng) -> list[tuple[np.ndarray, str]]:
    """Crops of skimage's quantitative-phase cell image: the cell in view (``interphase``) or ``background``."""
    from PIL import Image
    from skimage import data

    img = data.cell()
    cy, cx, crop = 372, 428, 192  # the cell's centre in the 660x550 frame
    out = []
    for _ in range(8):
        y = int(np.clip(cy - crop / 2 + rng.integers(-40, 41), 0, img.shape[0] - crop))
        x = int(np.clip(cx - crop / 2 + rng.integers(-40, 41), 0, img.shape[1] - crop))
        out.append((img[y:y + crop, x:x + crop], "interphase"))
    for _ in range(8):
        y = int(rng.integers(0, 140))
        x = int(rng.integers(0, img.shape[1] - crop))
        out.append((img[y:y + crop, x:x + crop], "background"))
    resized = []
    for tile, label in out:
        small = np.asarray(Image.fromarray(tile).resize((SIZE, SIZE), Image.BILINEAR))
        resized.append((np.repeat(small[..., None], 3, axis=2), label))
    return resized
