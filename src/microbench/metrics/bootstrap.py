"""Bootstrap confidence intervals as the Micro-Bench paper computes them, but seeded and fast.

The official code calls ``scipy.stats.bootstrap((is_correct,), np.mean, confidence_level=0.95, method='basic')``
with the default 9,999 resamples and no seed, and reports ``|CI.high − mean|`` as "± CI". For 0/1 data the mean of
a resample of size n is exactly ``Binomial(n, p̂) / n``, so :func:`bootstrap_accuracy` draws those directly: the
same bootstrap distribution in O(resamples) instead of O(resamples · n), which matters when hundreds of slices of
300k items are scored. :func:`scipy_bootstrap` is the literal scipy call, for checking and for non-binary data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

N_RESAMPLES = 9_999
CONFIDENCE = 0.95
#: the bootstrap of a record whose run gave none (configs/eval.yaml's defaults)
DEFAULT_BOOTSTRAP = {"n_resamples": N_RESAMPLES, "confidence": CONFIDENCE, "seed": 0}


@dataclass(frozen=True)
class Estimate:
    """A metric value with its bootstrap interval; ``ci`` is the official half-width ``|high − value|``; ``se`` the
    bootstrap standard error where one is kept (the clustered intervals)."""

    value: float
    low: float
    high: float
    ci: float
    n: int
    se: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "se" or v is not None}


def basic_interval(theta_hat: float, resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    """scipy's ``method='basic'``: reflect the percentile interval of the resampled statistic about theta_hat."""
    alpha = (1 - confidence) / 2
    lo_p, hi_p = np.percentile(resampled, [alpha * 100, (1 - alpha) * 100])
    return 2 * theta_hat - hi_p, 2 * theta_hat - lo_p


def bootstrap_accuracy(correct: np.ndarray, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = 0) -> Estimate:
    """Accuracy of a 0/1 vector with a basic bootstrap CI (exact binomial resampling, seeded)."""
    correct = np.asarray(correct, dtype=float)
    n = int(correct.size)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    p = float(correct.mean())
    rng = np.random.default_rng(seed)
    resampled = rng.binomial(n, p, size=n_resamples) / n
    lo, hi = basic_interval(p, resampled, confidence)
    return Estimate(p, float(lo), float(hi), float(abs(hi - p)), n)


def bootstrap_macro(groups: list[np.ndarray], n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                    seed: int = 0) -> Estimate:
    """Unweighted mean of per-group accuracies, each group resampled separately (stratified bootstrap)."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return Estimate(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    ps = np.array([g.mean() for g in groups])
    ns = np.array([g.size for g in groups])
    resampled = (rng.binomial(ns[:, None], ps[:, None], size=(len(groups), n_resamples)) / ns[:, None]).mean(0)
    value = float(ps.mean())
    lo, hi = basic_interval(value, resampled, confidence)
    return Estimate(value, float(lo), float(hi), float(abs(hi - value)), int(ns.sum()))


def scipy_bootstrap(correct: np.ndarray, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                    seed: int = 0) -> Estimate:
    """The official call, verbatim but seeded: ``scipy.stats.bootstrap(..., method='basic')``."""
    correct = np.asarray(correct, dtype=float)
    res = stats.bootstrap((correct,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          vectorized=True, batch=100, method="basic", rng=np.random.default_rng(seed))
    value = float(correct.mean())
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Estimate(value, lo, hi, float(abs(hi - value)), int(correct.size))


def paired_bootstrap_delta(base_correct: np.ndarray, model_correct: np.ndarray, n_resamples: int = N_RESAMPLES,
                           confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """Δ = acc(model) − acc(base) on the *same* items, with a paired basic bootstrap CI (items resampled jointly).

    For 0/1 pairs only the discordant counts matter: a resample of n items has (c10, c01, rest) ~ Multinomial(n,
    (p10, p01, 1 − p10 − p01)) and Δ* = (c01 − c10)/n, drawn exactly in O(resamples).
    """
    a = np.asarray(base_correct, dtype=bool)
    b = np.asarray(model_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same items: {a.shape} vs {b.shape}")
    n = int(a.size)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    c10, c01 = int((a & ~b).sum()), int((~a & b).sum())
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [c10 / n, c01 / n, max(0.0, 1.0 - (c10 + c01) / n)], size=n_resamples)
    # in counts (integers), not fractions: a bound that is exactly 0 stays 0 (floats gave e.g. -1e-16, "significant")
    lo, hi = basic_interval(c01 - c10, counts[:, 1] - counts[:, 0], confidence)
    d = (c01 - c10) / n
    return Estimate(float(d), float(lo) / n, float(hi) / n, float(abs(hi - (c01 - c10))) / n, n)


#: the name every report gives the image-clustered interval
CLUSTERED = "image-clustered percentile bootstrap"


def clustered_bootstrap(values: np.ndarray, clusters: np.ndarray, n_resamples: int = N_RESAMPLES,
                        confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """Mean of per-item ``values`` with an image-clustered percentile bootstrap CI: the clusters (images) are
    resampled with replacement, each with all of its items (Field & Welsh 2007; lmms-eval's clustered standard
    errors resample the same way), and the statistic is the ratio Σ values / Σ items of the resample. Questions on
    one image agree, so this interval is wider than the i.i.d. one by up to √(items per image). Percentile bounds
    lie inside the range of the values: an accuracy's interval inside [0, 1], a paired difference's inside [−1, 1].
    One statistic of :class:`ClusterBootstrap` (which shares the resamples among many)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    boot = ClusterBootstrap(clusters, n_resamples, confidence, seed)
    return boot.estimates(values, {"all": np.ones(values.size, dtype=bool)})["all"]


def clustered_paired_delta(base_correct: np.ndarray, model_correct: np.ndarray, clusters: np.ndarray,
                           n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """Δ = acc(model) − acc(base) on the same items, the images resampled jointly for both (image-clustered,
    paired). A model against itself is exactly 0 with a zero-width interval."""
    a = np.asarray(base_correct, dtype=float)
    b = np.asarray(model_correct, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same items: {a.shape} vs {b.shape}")
    return clustered_bootstrap(b - a, clusters, n_resamples, confidence, seed)


class ClusterBootstrap:
    """One set of image resamples shared by every statistic of a split (every slice of every model, and their
    paired differences), so that all of them are image-clustered and paired with each other by construction.

    ``clusters`` gives each item's image. The resample weights ``W`` (``[n_resamples, images]``, the number of times
    each image is drawn, Multinomial(images, uniform)) are drawn once; a slice's resampled statistic is Σ w·(sum of
    its values on the image) / Σ w·(its items on the image), for all slices at once as one matrix product. A slice is
    a domain of the split: its number of images varies across resamples (resamples without any of its images are
    left out of its interval). Percentile bounds, so accuracies stay in [0, 1] and differences in [−1, 1]; sums of
    0/1 differences are exact integers, so a difference that is 0 in every resample is exactly 0.
    """

    interval = CLUSTERED

    #: weights kept in memory up to this many entries (float32: 200 MB); above, drawn again chunk by chunk per call
    CACHE_ENTRIES = 50_000_000
    CHUNK = 1000

    def __init__(self, clusters: np.ndarray, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = 0) -> None:
        _, self.codes = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
        self.k = int(self.codes.max()) + 1 if self.codes.size else 0
        self.n_resamples, self.confidence, self.seed = int(n_resamples), float(confidence), int(seed)
        small = self.n_resamples * max(self.k, 1) <= self.CACHE_ENTRIES
        self._cached = list(self._draw()) if small else None

    def _draw(self):
        """The weights ``[rows, images]`` chunk by chunk, the same on every call (one seeded stream per chunk)."""
        for i, start in enumerate(range(0, self.n_resamples, self.CHUNK)):
            size = min(self.CHUNK, self.n_resamples - start)
            if not self.k:
                yield np.zeros((size, 0), np.float32)
                continue
            rng = np.random.default_rng([self.seed, i])
            yield rng.multinomial(self.k, np.full(self.k, 1.0 / self.k), size=size).astype(np.float32)

    def resampled(self, values: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray,
                                                                                  np.ndarray, np.ndarray]:
        """The slices that have items, their values (Σ values / Σ items), their item counts and their resampled
        statistics ``[n_resamples, slices]`` (NaN where a resample drew none of a slice's images)."""
        values = np.asarray(values, dtype=float)
        names = [m for m in masks if np.asarray(masks[m]).any()]
        if not names:
            return [], np.zeros(0), np.zeros(0, int), np.zeros((self.n_resamples, 0))
        sums = np.stack([np.bincount(self.codes[masks[m]], weights=values[masks[m]], minlength=self.k)
                         for m in names], axis=1)
        counts = np.stack([np.bincount(self.codes[masks[m]], minlength=self.k) for m in names], axis=1)
        nums, dens = [], []
        for w in self._cached if self._cached is not None else self._draw():
            nums.append(w @ sums)
            dens.append(w @ counts.astype(np.float64))
        num, den = np.concatenate(nums), np.concatenate(dens)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
        return names, sums.sum(0) / counts.sum(0), counts.sum(0), resampled

    def percentile_interval(self, value: float, resampled: np.ndarray, n: int) -> Estimate:
        """The percentile interval of one statistic from its resampled values (NaNs left out), widened to hold
        the value itself."""
        alpha = (1 - self.confidence) / 2
        r = resampled[~np.isnan(resampled)]
        lo, hi = np.percentile(r, [100 * alpha, 100 * (1 - alpha)]) if r.size else (np.nan, np.nan)
        lo, hi = min(float(lo), value), max(float(hi), value)
        se = float(np.std(r, ddof=1)) if r.size > 1 else float("nan")
        return Estimate(float(value), lo, hi, float(abs(hi - value)), int(n), se)

    def estimates(self, values: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, Estimate]:
        """The mean of ``values`` on each masked slice of the items, with its clustered percentile interval."""
        names, point, n, resampled = self.resampled(values, masks)
        return {m: self.percentile_interval(float(point[j]), resampled[:, j], int(n[j]))
                for j, m in enumerate(names)}

def attach_clustered(out: dict[str, dict], values: np.ndarray, masks: dict[str, np.ndarray], clusters: np.ndarray,
                     n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Add ``clustered: {low, high, ci, interval}`` (the image-clustered percentile interval, one
    :class:`ClusterBootstrap` shared by every slice) beside the interval each entry ``out[name]`` already has, for
    every slice ``masks[name]`` of the items; returns ``out``."""
    boot = ClusterBootstrap(clusters, n_resamples, confidence, seed)
    for name, est in boot.estimates(np.asarray(values, dtype=float), masks).items():
        out[name]["clustered"] = {"low": est.low, "high": est.high, "ci": est.ci, "se": est.se, "interval": CLUSTERED}
    return out
