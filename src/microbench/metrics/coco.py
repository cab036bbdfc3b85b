"""COCO detection / instance-segmentation metrics through pycocotools, with a high detections-per-image limit.

pycocotools' default limits (1, 10, 100 detections per image) truncate dense microscopy images (hundreds of nuclei
per field); here the last limit is ``max_dets`` (default 1000), and AP/AP50/AP75/APs/APm/APl are computed at that
limit, AR at all three.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

from microbench.errors import UserError

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR_max",
              "AR_small", "AR_medium", "AR_large")


def coco_evaluate(ground_truth: dict, detections: list[dict], iou_type: str = "bbox", max_dets: int = 1000,
                  per_class: bool = True) -> dict:
    """COCO metrics of ``detections`` (COCO result dicts: image_id, category_id, score, and bbox xywh or an RLE
    ``segmentation``) against a COCO ground-truth dict. Returns the 12 standard numbers (``STAT_NAMES``, AR_max
    at ``max_dets``), per-class AP if asked, and counts. With no detection at all every number is 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be bbox or segm, got {iou_type!r}")
    if max_dets < 10:
        raise UserError(f"max_dets must be >= 10, got {max_dets}")
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    out: dict = {"n_images": len(ground_truth["images"]), "n_ground_truth": len(ground_truth["annotations"]),
                 "n_detections": len(detections), "max_dets": max_dets}
    if not detections or not ground_truth["annotations"]:
        out.update(dict.fromkeys(STAT_NAMES, 0.0))
        if per_class:
            out["per_class_AP"] = dict.fromkeys(names.values(), 0.0)
        return out
    gt = copy.deepcopy(ground_truth)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.maxDets = [1, 10, int(max_dets)]
        ev.evaluate()
        ev.accumulate()
    out.update(summarize(ev))
    if per_class:
        # precision: [iou thresholds, recall points, classes, area ranges (0 = all), max dets (-1 = max_dets)]
        prec = ev.eval["precision"][:, :, :, 0, -1]
        out["per_class_AP"] = {}
        for k, cat in enumerate(ev.params.catIds):
            p = prec[:, :, k]
            p = p[p > -1]
            out["per_class_AP"][names[cat]] = float(p.mean()) if p.size else 0.0
    return out


def summarize(ev) -> dict[str, float]:
    """The 12 COCO numbers from an accumulated COCOeval, with AP at the *last* detection limit.

    (pycocotools' own ``summarize`` reads AP at a hard-coded 100 detections, which is -1 — "absent" — as soon as
    the limits are changed, so the numbers are read from ``ev.eval`` here; -1 entries, i.e. no ground truth in an
    area range, are left out of means and an empty mean reads 0.)
    """
    p = ev.params
    precision, recall = ev.eval["precision"], ev.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]
    area = {name: i for i, name in enumerate(p.areaRngLbl)}
    iou = {0.5: int(np.argmin(np.abs(p.iouThrs - 0.5))), 0.75: int(np.argmin(np.abs(p.iouThrs - 0.75)))}

    def mean(x: np.ndarray) -> float:
        x = x[x > -1]
        return float(x.mean()) if x.size else 0.0

    m = len(p.maxDets) - 1
    return {
        "AP": mean(precision[:, :, :, area["all"], m]),
        "AP50": mean(precision[iou[0.5], :, :, area["all"], m]),
        "AP75": mean(precision[iou[0.75], :, :, area["all"], m]),
        "AP_small": mean(precision[:, :, :, area["small"], m]),
        "AP_medium": mean(precision[:, :, :, area["medium"], m]),
        "AP_large": mean(precision[:, :, :, area["large"], m]),
        "AR1": mean(recall[:, :, area["all"], 0]),
        "AR10": mean(recall[:, :, area["all"], 1]),
        "AR_max": mean(recall[:, :, area["all"], m]),
        "AR_small": mean(recall[:, :, area["small"], m]),
        "AR_medium": mean(recall[:, :, area["medium"], m]),
        "AR_large": mean(recall[:, :, area["large"], m]),
    }

