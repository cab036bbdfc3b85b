"""Which differences between models are real: paired, image-clustered deltas of the same items, bootstrap
p-values, Holm's correction, significance groups and mean ranks, for the leaderboard.

Two runs are paired only when they scored the same questions: the same copy (data fingerprint), split and filters
(:func:`microbench.results.leaderboard.scope_of`), matched item by item (``source``, ``row_idx``, ``key`` for
perception; ``row_idx`` for cognition). Δ = acc(model) − acc(baseline) on the items both answered, with the images
resampled jointly for both (:class:`~microbench.metrics.bootstrap.ClusterBootstrap`), a percentile interval and the
two-sided bootstrap p-value ``min(1, 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)))``, which is below 1 − confidence exactly when the
percentile interval leaves out 0. A model paired with itself has Δ = 0 in every resample: p = 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from microbench.errors import UserError
from microbench.metrics.bootstrap import CLUSTERED, ClusterBootstrap
from microbench.metrics.closed_vqa import metric_masks

#: how the items of two runs of a task are matched
ITEM_KEYS = {"perception": ["source", "row_idx", "key"], "cognition": ["row_idx"]}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979, "A simple sequentially rejective multiple test procedure"):
    sorted ascending, p₍ᵢ₎·(m − i + 1), made monotone by a running maximum and capped at 1; NaNs stay NaN and do
    not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if not m:
        return out
    order = np.argsort(p[ok], kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[ok][order] * (m - np.arange(m))))
    inner = np.empty(m)
    inner[order] = adjusted
    out[ok] = inner
    return out


def bootstrap_p(resampled: np.ndarray) -> float:
    """Two-sided bootstrap p-value of H0: Δ = 0 from resampled Δ* (NaNs left out)."""
    r = np.asarray(resampled, dtype=float)
    r = r[~np.isnan(r)]
    if not r.size:
        return float("nan")
    return float(min(1.0, 2 * min((r <= 0).mean(), (r >= 0).mean())))


def read_predictions(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / "predictions.parquet"
    if not path.is_file():
        raise UserError(f"{path} does not exist: the run did not finish writing its predictions (run it again)")
    return pd.read_parquet(path)


def paired_deltas(base: pd.DataFrame, other: pd.DataFrame, task: str, names: dict[str, str], boot: dict) -> dict:
    """Δ of ``other`` against ``base`` for each ``names`` entry (column → metric name: ``<source>/official/coarse``
    or ``cognition/all``), paired on the items both scored. Returns ``{column: {value, low, high, ci, se, n, p,
    interval}}`` and ``"_unpaired"``: items of either run without a partner (left out)."""
    keys = ITEM_KEYS[task]
    cols = [*keys, "correct", "image_id", *(c for c in ("dataset", "question_type", "variant", "gold_idx")
                                             if c in base and c in other)]
    a = base[[c for c in cols if c in base]]
    b = other[[*keys, "correct", *(["gold_idx"] if "gold_idx" in a and "gold_idx" in other else [])]]
    merged = a.merge(b, on=keys, how="inner", suffixes=("", "_other"), validate="one_to_one")
    if "gold_idx" in merged and (merged["gold_idx"] != merged["gold_idx_other"]).any():
        bad = int((merged["gold_idx"] != merged["gold_idx_other"]).sum())
        raise UserError(f"{bad} paired item(s) have different gold answers in the two runs: they did not score the "
                        "same copy (rerun both on one copy)")
    unpaired = len(base) + len(other) - 2 * len(merged)
    masks: dict[str, np.ndarray] = {}
    if task == "perception":
        for source, idx in merged.groupby("source", observed=True).groups.items():
            sub = merged.loc[idx]
            found = metric_masks(sub, str(source))
            for col, name in names.items():
                if name in found:
                    full = np.zeros(len(merged), dtype=bool)
                    full[merged.index.get_indexer(idx)] = found[name]
                    masks[col] = full
    else:
        masks = {col: np.ones(len(merged), dtype=bool) for col, name in names.items() if name == "cognition/all"}
    diff = merged["correct_other"].to_numpy(dtype=float) - merged["correct"].to_numpy(dtype=float)
    bs = ClusterBootstrap(merged["image_id"].astype(str).to_numpy(), int(boot["n_resamples"]),
                          float(boot["confidence"]), int(boot["seed"]))
    cols_, point, n, resampled = bs.resampled(diff, masks)
    out: dict = {"_unpaired": int(unpaired)}
    for j, col in enumerate(cols_):
        est = bs.percentile_interval(float(point[j]), resampled[:, j], int(n[j]))
        out[col] = {**est.to_dict(), "p": bootstrap_p(resampled[:, j]), "interval": CLUSTERED}
    return out


def mean_ranks(values: pd.DataFrame) -> pd.DataFrame:
    """Rank aggregation over slices (columns): each slice ranks the models that have it (1 = best, ties share the
    mean rank, ``scipy.stats.rankdata``), and a model's ``mean_rank`` is the mean over its slices (``slices``)."""
    ranks = pd.DataFrame(index=values.index, columns=values.columns, dtype=float)
    for col in values.columns:
        v = values[col].astype(float)
        ok = v.notna()
        if ok.sum():
            ranks.loc[ok, col] = stats.rankdata(-v[ok].to_numpy(), method="average")
    return pd.DataFrame({"mean_rank": ranks.mean(axis=1, skipna=True), "slices": ranks.notna().sum(axis=1)})
