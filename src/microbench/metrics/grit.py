"""The GRIT localization score, as the official μ-Bench evaluation computes it (a verbatim port of GRIT's
``metrics/localization.py``; see docs/evaluation.md).

For one image and one class: IoU(b, b') = inter / (area(b) + area(b') − inter + 1e-6), boxes with x2 ≤ x1 or
y2 ≤ y1 have zero area; predictions and ground truths are matched by the Hungarian algorithm on cost 1 − IoU
(:func:`scipy.optimize.linear_sum_assignment`), pairs with IoU = 0 are dropped, and

    score = Σ matched IoU / (#predictions + #missed ground truths)

so extra predictions and missed objects both cost. Both sides empty scores 1; exactly one side empty scores 0.
Scores are averaged over images per (dataset, class).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric


def _as_boxes(boxes) -> np.ndarray:
    arr = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be a list of [x1, y1, x2, y2], got shape {arr.shape}")
    return arr


def pairwise_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[P, G] IoU with GRIT's conventions (zero area for inverted boxes, +1e-6 in the union)."""
    p, g = _as_boxes(pred)[:, None, :], _as_boxes(gt)[None, :, :]
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    iw = np.clip(np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]), 0, None)
    ih = np.clip(np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]), 0, None)
    inter = iw * ih
    return inter / (area(p) + area(g) - inter + 1e-6)


def localization_score(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """GRIT localization score of one image: two lists of ``[x1, y1, x2, y2]`` pixel boxes."""
    pred, gt = _as_boxes(pred_boxes), _as_boxes(gt_boxes)
    if len(pred) == 0 and len(gt) == 0:
        return 1.0
    if len(pred) == 0 or len(gt) == 0:
        return 0.0
    iou = pairwise_iou(pred, gt)
    rows, cols = linear_sum_assignment(1.0 - iou)
    matched = iou[rows, cols]
    matched = matched[matched > 0]
    return float(matched.sum() / (len(pred) + len(gt) - len(matched)))


class GritLocalization(Metric):
    """GRIT localization score averaged over images per group (e.g. ``dataset/class``), as a torchmetrics Metric.

    ``update(pred_boxes, gt_boxes, groups)`` takes one box list per (image, class) pair and the group name of each;
    states are per-group sums and counts, so the metric reduces exactly across DDP ranks. ``compute()`` returns
    ``{group: mean score}`` plus ``macro`` (mean over groups) and ``pooled`` (mean over all pairs).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, groups: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = list(groups)
        self._index = {g: i for i, g in enumerate(self.groups)}
        self.add_state("total", default=torch.zeros(len(self.groups), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(len(self.groups), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_boxes: Sequence | None, gt_boxes: Sequence | None, groups: Sequence[str],
               scores: Sequence[float] | None = None) -> None:
        """One entry per (image, class): its predicted and ground-truth boxes, or already computed ``scores``
        (then pass ``None`` for the boxes)."""
        if scores is None:
            if not (len(pred_boxes) == len(gt_boxes) == len(groups)):
                raise ValueError("pred_boxes, gt_boxes and groups must have one entry per (image, class)")
            scores = [localization_score(p, g) for p, g in zip(pred_boxes, gt_boxes, strict=True)]
        elif len(scores) != len(groups):
            raise ValueError("scores and groups must have one entry per (image, class)")
        for score, name in zip(scores, groups, strict=True):
            if name not in self._index:
                raise KeyError(f"unknown group {name!r}; declared groups: {self.groups}")
            i = self._index[name]
            self.total[i] += float(score)
            self.count[i] += 1

    def compute(self) -> dict[str, float]:
        out = {g: float(self.total[i] / self.count[i]) for i, g in enumerate(self.groups) if self.count[i] > 0}
        seen = self.count > 0
        out["macro"] = float((self.total[seen] / self.count[seen]).mean()) if seen.any() else float("nan")
        out["pooled"] = float(self.total.sum() / self.count.sum()) if seen.any() else float("nan")
        return out
