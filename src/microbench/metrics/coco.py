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

#: the AP numbers that get an image-bootstrap interval
BOOTSTRAPPED = ("AP", "AP50", "AP75")
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR_max",
              "AR_small", "AR_medium", "AR_large")


def coco_evaluate(ground_truth: dict, detections: list[dict], iou_type: str = "bbox", max_dets: int = 1000,
                  per_class: bool = True, bootstrap: dict | None = None) -> dict:
    """COCO metrics of ``detections`` (COCO result dicts: image_id, category_id, score, and bbox xywh or an RLE
    ``segmentation``) against a COCO ground-truth dict. Returns the 12 standard numbers (``STAT_NAMES``, AR_max
    at ``max_dets``), per-class AP if asked, and counts. With no detection at all every number is 0. With
    ``bootstrap`` (``{n_resamples, confidence, seed}``), ``intervals`` holds AP, AP50 and AP75 with their image
    bootstrap interval (:func:`image_bootstrap`)."""
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
        if bootstrap:  # nothing detected (or nothing to detect): 0 in every resample
            from microbench.metrics.bootstrap import CLUSTERED

            out["intervals"] = {k: {"low": 0.0, "high": 0.0, "ci": 0.0, "interval": CLUSTERED, "resamples": 0}
                                for k in BOOTSTRAPPED}
        return out
    ev = evaluated(ground_truth, detections, iou_type, max_dets)
    out.update(summarize(ev))
    if bootstrap:
        out["intervals"] = image_bootstrap(ev, **bootstrap)
    if per_class:
        # precision: [iou thresholds, recall points, classes, area ranges (0 = all), max dets (-1 = max_dets)]
        prec = ev.eval["precision"][:, :, :, 0, -1]
        out["per_class_AP"] = {}
        for k, cat in enumerate(ev.params.catIds):
            p = prec[:, :, k]
            p = p[p > -1]
            out["per_class_AP"][names[cat]] = float(p.mean()) if p.size else 0.0
    return out


def evaluated(ground_truth: dict, detections: list[dict], iou_type: str = "bbox", max_dets: int = 1000):
    """A ``COCOeval`` of ``detections`` against ``ground_truth``, evaluated and accumulated (pycocotools' printing
    silenced), detection limits 1, 10 and ``max_dets``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
    return ev


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



def resampled_ap(ev, picks: np.ndarray) -> dict[str, np.ndarray]:
    """AP, AP50 and AP75 of an evaluated ``COCOeval`` on resampled image sets: each row of ``picks``
    (``[resamples, images]``, positions into ``ev.params.imgIds``, repeats allowed) is one set, scored as if its
    images (with all their ground truth and detections) were the dataset. The per-image matching of
    ``ev.evaluate()`` is reused; only ``accumulate()`` runs per set, on the 'all' area range at the last detection
    limit. A class without ground truth in a set is left out of that set's mean, as COCO does (NaN: no class)."""
    p = ev.params
    n_img, n_area, n_cat = len(p.imgIds), len(p.areaRng), len(p.catIds)
    area_all = p.areaRngLbl.index("all")
    per_cat = [ev.evalImgs[k * n_area * n_img + area_all * n_img:k * n_area * n_img + (area_all + 1) * n_img]
               for k in range(n_cat)]
    sub = copy.copy(ev)
    sub.params = copy.deepcopy(p)
    sub.params.areaRng, sub.params.areaRngLbl = [p.areaRng[area_all]], ["all"]
    sub.params.maxDets = [p.maxDets[-1]]
    iou50, iou75 = (int(np.argmin(np.abs(p.iouThrs - t))) for t in (0.5, 0.75))
    draws: dict[str, list[float]] = {name: [] for name in BOOTSTRAPPED}
    with contextlib.redirect_stdout(io.StringIO()):
        for pick in np.atleast_2d(picks):
            sub.params.imgIds = list(range(len(pick)))
            sub._paramsEval = copy.deepcopy(sub.params)
            sub.evalImgs = [cat[j] for cat in per_cat for j in pick]
            sub.accumulate()
            prec = sub.eval["precision"][:, :, :, 0, 0]  # [T, R, K]
            for name, x in (("AP", prec), ("AP50", prec[iou50]), ("AP75", prec[iou75])):
                x = x[x > -1]
                draws[name].append(float(x.mean()) if x.size else np.nan)
    return {k: np.asarray(v) for k, v in draws.items()}


def image_bootstrap(ev, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """AP, AP50 and AP75 of an evaluated ``COCOeval`` with an image-clustered percentile interval: images are
    resampled with replacement, each with all its ground truth and detections (:func:`resampled_ap`). Returns
    ``{name: {low, high, ci, interval, resamples}}``."""
    from microbench.metrics.bootstrap import CLUSTERED

    n_img = len(ev.params.imgIds)
    rng = np.random.default_rng(seed)
    draws = resampled_ap(ev, rng.integers(0, n_img, (int(n_resamples), n_img)))
    point = summarize(ev)
    alpha = (1 - confidence) / 2
    out = {}
    for name, r in draws.items():
        r = r[~np.isnan(r)]
        lo, hi = np.percentile(r, [100 * alpha, 100 * (1 - alpha)]) if r.size else (np.nan, np.nan)
        lo, hi = min(float(lo), point[name]), max(float(hi), point[name])
        out[name] = {"low": lo, "high": hi, "ci": abs(hi - point[name]),
                     "se": float(np.std(r, ddof=1)) if r.size > 1 else float("nan"), "interval": CLUSTERED,
                     "resamples": int(r.size)}
    return out
