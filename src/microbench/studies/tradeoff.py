"""The field's forgetting metrics, with intervals: normalized accuracy (LiNeS), the α selection rules, one number
for a whole trade-off curve (its area, with a paired bootstrap CI) and a paired test between two methods' curves.

Normalized accuracy (Wang et al., LiNeS, ICLR 2025, §4): target accuracy ÷ the fine-tune's, control (supported-task)
accuracy ÷ the base's. The curve area: each point of a method's sweep is placed in the box spanned by base and
fine-tune, x = share of the fine-tune's target gain kept = (t − t_base)/(t_ft − t_base), y = share of the supported
loss won back = (s − s_ft)/(s_base − s_ft), both clipped to [0, 1]; the base sits at (0, 1), the fine-tune at (1, 0).
The area under the upper (Pareto) frontier of the points, linear between them and constant left of the first, is
0.5 for the straight line between the two models, 1 for a point that keeps all of the gain and forgets nothing, 0.5
or less for a method that does no better than choosing between the two. Its CI resamples the test items with
replacement (target and supported items separately: a stratified bootstrap; in a study, whole images with all
their questions: image-clustered), the same resample for every point of every method, so the areas of two methods
are paired and their difference has a CI and a bootstrap p-value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from microbench.metrics.bootstrap import basic_interval

#: keep-gain: best supported accuracy among the α keeping ≥ keep_target_gain of the gain; trade-off: LiNeS' rule
SELECTION_RULES = ("keep_gain", "trade_off")


def normalized(summary: Mapping, finetuned: Mapping, base: Mapping, target: str = "target/fine",
               control: str = "supported/all") -> dict[str, float | None]:
    """LiNeS' normalized accuracies of one model: target ÷ fine-tuned, control ÷ base (None where undefined)."""
    def acc(s, k):
        v = ((s.get(k) or {}).get("acc") or {}).get("value")
        return None if v is None or v != v else float(v)

    t, t_ft, c, c_base = acc(summary, target), acc(finetuned, target), acc(summary, control), acc(base, control)
    return {"target": t / t_ft if t is not None and t_ft else None,
            "control": c / c_base if c is not None and c_base else None}


def select_trade_off(val: Mapping[float, Mapping], weight: float = 2.0) -> dict:
    """argmax over α of ``weight``·target_norm + control_norm on val (ties to the larger α)."""
    def score(a):
        n = val[a].get("normalized") or {}
        if n.get("target") is None or n.get("control") is None:
            return -np.inf
        return weight * n["target"] + n["control"]

    best = max(sorted(val), key=lambda a: (score(a), a))
    return {"alpha": best, "rule": f"max {weight:g} x normalized target + normalized control accuracy on val "
            "(LiNeS' trade-off; normalized: target / fine-tuned, control / base)", "eligible": sorted(val),
            "score": float(score(best))}


def pareto_area(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the upper-right Pareto frontier of the points (x, y) in [0, 1]² (the base (0, 1) and the fine-tune
    (1, 0) among them), linear between frontier points, constant left of the first."""
    order = np.lexsort((-y, x))  # by x, then higher y first
    xs, ys = x[order], y[order]
    front_x, front_y = [], []
    best = -np.inf
    for xi, yi in zip(xs[::-1], ys[::-1], strict=True):  # from the right: a point is on the frontier if it beats
        if yi > best:                                     # every point with a larger x
            front_x.append(xi)
            front_y.append(yi)
            best = yi
    fx, fy = np.array(front_x[::-1]), np.array(front_y[::-1])
    area = fx[0] * fy[0]
    area += float(np.sum((fx[1:] - fx[:-1]) * (fy[1:] + fy[:-1]) / 2))
    return float(area)


def _box(t, s, anchors):
    """Normalized coordinates of accuracies ``t`` (target) and ``s`` (supported) in the base/fine-tune box."""
    (tb, sb), (tf, sf) = anchors
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.clip((t - tb) / (tf - tb), 0, 1)
        y = np.clip((s - sf) / (sb - sf), 0, 1)
    return x, y


def _by_cluster(matrix: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``[models, items]`` → per-cluster sums ``[models, clusters]`` and item counts (each item its own cluster when
    ``clusters`` is None)."""
    if clusters is None:
        return matrix, np.ones(matrix.shape[1])
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    k = int(codes.max()) + 1 if codes.size else 0
    sums = np.stack([np.bincount(codes, weights=row, minlength=k) for row in matrix])
    return sums, np.bincount(codes, minlength=k).astype(float)


def curve_areas(target: np.ndarray, supported: np.ndarray, curves: Mapping[str, Sequence[int]],
                n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0, chunk: int = 256,
                target_clusters: np.ndarray | None = None, supported_clusters: np.ndarray | None = None) -> dict:
    """The area of each curve, with a paired stratified bootstrap CI, and the paired difference of every pair.

    Args:
        target, supported: per-item correctness ``[models, items]`` (fractional allowed: seed means) on the target
            (fine-grained) and the supported items; row 0 is the base, row 1 the fine-tune.
        curves: ``{method: rows of its sweep points}`` (the base and fine-tune rows are added to each).
        target_clusters, supported_clusters: the image of each item: the images are resampled, each with all of
            its items (image-clustered); None resamples the items themselves.
    Returns ``{"areas": {method: {value, low, high, n_points}}, "pairs": {"a vs b": {value, low, high, p}},
    "undefined": reason or None}``.
    """
    target, supported = np.asarray(target, float), np.asarray(supported, float)
    t_hat, s_hat = target.mean(1), supported.mean(1)
    if not (t_hat[1] > t_hat[0] and s_hat[0] > s_hat[1]):
        why = ("the fine-tune did not gain on its target" if not t_hat[1] > t_hat[0] else
               "the fine-tune lost nothing on the supported datasets")
        return {"areas": {}, "pairs": {}, "undefined": f"no trade-off to measure: {why} (the box between base and "
                                                       "fine-tune is empty)"}
    rows = {m: sorted(set(r) | {0, 1}) for m, r in curves.items()}

    def areas(t, s):
        x, y = _box(t, s, ((t[0], s[0]), (t[1], s[1])))
        return {m: pareto_area(x[r], y[r]) for m, r in rows.items()}

    point = areas(t_hat, s_hat)
    rng = np.random.default_rng(seed)
    (t_sums, t_counts), (s_sums, s_counts) = _by_cluster(target, target_clusters), _by_cluster(supported,
                                                                                              supported_clusters)
    k_t, k_s = len(t_counts), len(s_counts)
    draws = {m: [] for m in rows}
    degenerate = 0
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        ct = rng.multinomial(k_t, np.full(k_t, 1 / k_t), size=size).astype(float)
        cs = rng.multinomial(k_s, np.full(k_s, 1 / k_s), size=size).astype(float)
        tt = (ct @ t_sums.T) / (ct @ t_counts)[:, None]  # [size, models]
        ss = (cs @ s_sums.T) / (cs @ s_counts)[:, None]
        for i in range(size):
            if not (tt[i, 1] > tt[i, 0] and ss[i, 0] > ss[i, 1]):
                degenerate += 1  # this resample has no gain or no loss: the box is empty, the area undefined
                for m in rows:
                    draws[m].append(np.nan)
                continue
            for m, v in areas(tt[i], ss[i]).items():
                draws[m].append(v)
    draws = {m: np.array(v) for m, v in draws.items()}
    ok = ~np.isnan(next(iter(draws.values())))
    out = {"areas": {}, "pairs": {}, "undefined": None, "resamples": int(n_resamples),
           "degenerate_resamples": int(degenerate),
           "interval": ("image-clustered basic bootstrap, stratified by target/supported images"
                        if target_clusters is not None else "item-level basic bootstrap, stratified")}
    for m, v in point.items():
        lo, hi = basic_interval(v, draws[m][ok], confidence)
        out["areas"][m] = {"value": v, "low": float(max(lo, 0.0)), "high": float(min(hi, 1.0)),
                           "n_points": len(rows[m])}
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d_hat = point[a] - point[b]
            d = draws[a][ok] - draws[b][ok]
            lo, hi = basic_interval(d_hat, d, confidence)
            # the p-value of the basic interval itself (it excludes 0 at level 1 − p): 2·P*(Δ* beyond 2·Δ̂)
            beyond = np.sum(d >= 2 * d_hat - 1e-12) if d_hat > 0 else np.sum(d <= 2 * d_hat + 1e-12)
            p = 1.0 if d_hat == 0 else 2 * (1 + int(beyond)) / (1 + d.size)
            out["pairs"][f"{a} vs {b}"] = {"a": a, "b": b, "value": float(d_hat), "low": float(lo),
                                           "high": float(hi), "p": float(min(p, 1.0)),
                                           "significant": bool(lo > 0 or hi < 0)}
    return out
