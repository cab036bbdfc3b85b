"""The continual-learning scalars of an accuracy matrix, with the field's definitions.

``R[i][j]`` is the accuracy on task (group) ``j`` of the model after training step ``i`` (row ``i`` = the i-th
specialist of a chain, each fine-tuned from the one before; columns in the same order). Each function is pinned to
its definition in ``tests/test_specialists.py``:

- :func:`backward_transfer`: GEM (Lopez-Paz & Ranzato, 2017), as mammoth computes it: the mean over every task but
  the last of R[T−1][i] − R[i][i] (what later training did to a task, after learning it; < 0 is forgetting).
- :func:`average_forgetting`: mammoth's ``forgetting``: the mean over every task but the last of
  max_l R[l][j] − R[T−1][j], the maximum over every row (the final one included, so each term is ≥ 0).
- :func:`forward_transfer`: GEM's FWT with the base (zero-shot) accuracy as the reference: the mean over every task
  but the first of R[i−1][i] − base[i].
- :func:`zscl_scalars`: ZSCL's MTIL metrics (Zheng et al., ICCV 2023): ``transfer`` = for each task j ≥ 1 the mean
  of R[i][j] over the steps before it (i < j), averaged over those tasks; ``avg`` = each task's accuracy averaged
  over every step, averaged over tasks; ``last`` = the final model's mean accuracy.

A merged model of independent specialists is read as the final step after all of them (:func:`merged_as_last`):
its backward transfer is the mean over groups of R[merge][i] − R[i][i] and its forgetting the mean of
max(R[every specialist and the merge][j]) − R[merge][j], the same definitions with the merge as the last row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _square(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"an accuracy matrix is T×T (step × task), got shape {R.shape}")
    return R


def backward_transfer(R) -> float | None:
    R = _square(R)
    T = len(R)
    return float(np.mean([R[-1, i] - R[i, i] for i in range(T - 1)])) if T > 1 else None


def average_forgetting(R) -> float | None:
    R = _square(R)
    T = len(R)
    best = R.max(axis=0)
    return float(np.mean([best[j] - R[-1, j] for j in range(T - 1)])) if T > 1 else None


def forward_transfer(R, base: Sequence[float]) -> float | None:
    R = _square(R)
    T = len(R)
    return float(np.mean([R[i - 1, i] - base[i] for i in range(1, T)])) if T > 1 else None


def zscl_scalars(R) -> dict:
    R = _square(R)
    T = len(R)
    transfer = [float(np.mean(R[:j, j])) for j in range(1, T)]
    return {"transfer": float(np.mean(transfer)) if transfer else None,
            "avg": float(R.mean(axis=0).mean()), "last": float(R[-1].mean()),
            "per_task": {"transfer": [None, *transfer], "avg": R.mean(axis=0).tolist(), "last": R[-1].tolist()}}


def chain_scalars(R, base: Sequence[float]) -> dict:
    """Every scalar of a chain's matrix (rows: steps; columns: the same tasks) and the base's accuracies."""
    return {"backward_transfer": backward_transfer(R), "average_forgetting": average_forgetting(R),
            "forward_transfer_vs_base": forward_transfer(R, base), **zscl_scalars(R),
            "matrix": _square(R).tolist(), "base": [float(b) for b in base]}


def merged_as_last(R, merged: Sequence[float]) -> dict:
    """Backward transfer and average forgetting of a merge of independent specialists (``R``: specialist i's
    accuracy on group j; ``merged``: the merge's accuracy on each group), the merge read as the final step."""
    R = _square(R)
    m = np.asarray(merged, dtype=float)
    best = np.vstack([R, m]).max(axis=0)
    return {"backward_transfer": float(np.mean(m - np.diag(R))),
            "average_forgetting": float(np.mean(best - m))}
