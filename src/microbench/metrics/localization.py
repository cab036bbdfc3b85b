"""Scoring localization predictions: COCO bbox/segm AP (pycocotools) and the GRIT localization score per
(dataset, class), from one prediction record per image.

A prediction record is ``{"boxes": [N, 4] xyxy pixels, "scores": [N], "labels": [N] (1..K), "masks": optional
list of N COCO RLEs}``; images without a record (failed decodes, generative non-answers) count as no prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from microbench.data.localization import LocImage, coco_ground_truth
from microbench.metrics.coco import STAT_NAMES, coco_evaluate
from microbench.metrics.grit import GritLocalization, localization_score


def encode_masks(masks: np.ndarray, threshold: float = 0.5) -> list[dict]:
    """Soft or binary masks [N, H, W] → COCO RLEs (JSON-ready counts)."""
    from pycocotools import mask as mask_utils

    out = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray((m >= threshold).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(rle)
    return out


def coco_detections(preds: Mapping[int, dict], n_images: int, with_masks: bool) -> list[dict]:
    """COCO result dicts (image_id = position, bbox xywh, RLE ``segmentation`` if ``with_masks``)."""
    dets = []
    for idx, rec in preds.items():
        if idx >= n_images:
            continue
        boxes = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        masks = rec.get("masks")
        for j in range(len(boxes)):
            x1, y1, x2, y2 = boxes[j]
            det = {"image_id": int(idx), "category_id": int(rec["labels"][j]), "score": float(rec["scores"][j]),
                   "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if with_masks:
                det["segmentation"] = masks[j]
            dets.append(det)
    return dets


def grit_table(images: Sequence[LocImage], class_names: Sequence[str], preds: Mapping[int, dict],
               score_threshold: float = 0.5) -> pd.DataFrame:
    """One row per (image, ground-truth class), as the official evaluation asks one question per class present:
    the image's predictions of that class with score ≥ ``score_threshold`` against its ground truth boxes."""
    rows = []
    label = {c: i + 1 for i, c in enumerate(class_names)}
    for idx, im in enumerate(images):
        rec = preds.get(idx)
        for c in sorted(set(im.classes)):
            gt = im.boxes[[k == c for k in im.classes]]
            if rec is None:
                pred = np.zeros((0, 4))
            else:
                keep = (np.asarray(rec["labels"]) == label[c]) & (np.asarray(rec["scores"]) >= score_threshold)
                pred = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)[keep]
            rows.append({"index": idx, "image_id": im.image_id, "dataset": im.dataset, "class": c,
                         "n_gt": len(gt), "n_pred": len(pred), "answered": rec is not None,
                         "grit": localization_score(pred, gt)})
    return pd.DataFrame(rows, columns=["index", "image_id", "dataset", "class", "n_gt", "n_pred", "answered",
                                       "grit"])


def grit_metrics(table: pd.DataFrame) -> dict[str, float]:
    """``grit/<dataset>/<class>`` means over images, their macro mean and the pooled mean, via the Metric."""
    names = [f"{d}/{c}" for d, c in zip(table["dataset"], table["class"], strict=True)]
    metric = GritLocalization(sorted(set(names)), sync_on_compute=False)  # scores are already gathered
    metric.update(None, None, names, scores=table["grit"].tolist())
    return {f"grit/{k}": v for k, v in metric.compute().items()}


def score_localization(images: Sequence[LocImage], class_names: Sequence[str], preds: Mapping[int, dict],
                       iou_types: Sequence[str] = ("bbox",), max_dets: int = 1000,
                       grit_score_threshold: float = 0.5) -> dict:
    """COCO metrics for each IoU type + GRIT; returns ``{"metrics", "per_image", "counts"}``."""
    gt = coco_ground_truth(list(images), list(class_names))
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        res = coco_evaluate(gt, coco_detections(preds, len(images), iou_type == "segm"), iou_type, max_dets)
        for k in STAT_NAMES:
            metrics[f"{iou_type}/{k}"] = res[k]
        for c, v in res["per_class_AP"].items():
            metrics[f"{iou_type}/per_class/{c}"] = v
    table = grit_table(images, class_names, preds, grit_score_threshold)
    metrics.update(grit_metrics(table) if len(table) else {"grit/macro": float("nan"), "grit/pooled": float("nan")})
    counts = {"images": len(images), "ground_truth": int(sum(im.n for im in images)),
              "predicted_images": int(sum(1 for i in preds if i < len(images))),
              "detections": int(sum(len(r["boxes"]) for r in preds.values())), "max_dets": int(max_dets),
              "grit_score_threshold": float(grit_score_threshold),
              "max_ground_truth_per_image": int(max((im.n for im in images), default=0))}
    return {"metrics": metrics, "per_image": table, "counts": counts}


#: COCO AP's image bootstrap re-accumulates per resample (about 5 ms for 200 images): at most this many resamples
AP_RESAMPLES = 1000


def grit_intervals(table: pd.DataFrame, boot: dict) -> dict[str, dict]:
    """Image-clustered percentile intervals of the GRIT numbers of a per-(image, class) table: ``grit/pooled``,
    every ``grit/<dataset>/<class>`` and ``grit/macro`` (the mean of the group means, groups absent from a
    resample left out), the images resampled with all their questions."""
    from microbench.metrics.bootstrap import CLUSTERED, ClusterBootstrap

    if not len(table):
        return {}
    cluster = table["index"] if "index" in table else table["image_id"]
    bs = ClusterBootstrap(cluster.astype(str).to_numpy(), int(boot["n_resamples"]), float(boot["confidence"]),
                          int(boot["seed"]))
    groups = (table["dataset"].astype(str) + "/" + table["class"].astype(str)).to_numpy()
    masks = {f"grit/{g}": groups == g for g in sorted(set(groups))}
    names, point, n, resampled = bs.resampled(table["grit"].to_numpy(dtype=float), {
        "grit/pooled": np.ones(len(table), dtype=bool), **masks})
    out = {m: bs.percentile_interval(float(point[j]), resampled[:, j], int(n[j])) for j, m in enumerate(names)}
    group_cols = [j for j, m in enumerate(names) if m != "grit/pooled"]
    with np.errstate(all="ignore"):
        macro = np.nanmean(resampled[:, group_cols], axis=1)
    out["grit/macro"] = bs.percentile_interval(float(point[group_cols].mean()), macro, len(table))
    return {k: {"low": e.low, "high": e.high, "ci": e.ci, "se": e.se, "interval": CLUSTERED} for k, e in out.items()}


def localization_intervals(ground_truth: dict, detections: list[dict] | None, per_image: pd.DataFrame,
                           iou_types, max_dets: int, boot: dict) -> dict[str, dict]:
    """The image-clustered interval of every localization headline (names without ``loc/``): COCO AP, AP50 and AP75
    of each IoU type (:func:`~microbench.metrics.coco.image_bootstrap`, at most :data:`AP_RESAMPLES` resamples) and
    the GRIT numbers (:func:`grit_intervals`)."""
    out = grit_intervals(per_image, boot)
    n_ap = min(int(boot["n_resamples"]), AP_RESAMPLES)
    for iou_type in iou_types if detections is not None else ():
        dets = detections if iou_type == "segm" else [{k: v for k, v in d.items() if k != "segmentation"}
                                                      for d in detections]
        res = coco_evaluate(ground_truth, dets, iou_type, max_dets, per_class=False, bootstrap={
            "n_resamples": n_ap, "confidence": float(boot["confidence"]), "seed": int(boot["seed"])})
        out.update({f"{iou_type}/{k}": v for k, v in res["intervals"].items()})
    return out
