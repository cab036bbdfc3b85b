"""Localization scoring benchmark: COCO (pycocotools) + GRIT for 1,000 images × 50 objects on this CPU.

Synthetic ground truth (50 boxes or polygons per 512 px image, several classes and datasets) and predictions
(60 per image: the 50 objects jittered, plus 10 false positives, random scores), scored with
:func:`microbench.metrics.localization.score_localization` exactly as a run scores them. Reports seconds for COCO
bbox, COCO segm (masks as RLE) and GRIT separately.

Usage: .venv/bin/python benchmarks/bench_localization.py [--images 1000] [--objects 50] [--segm]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from microbench.data.localization import LocImage, coco_ground_truth
from microbench.metrics.coco import coco_evaluate
from microbench.metrics.localization import coco_detections, encode_masks, grit_metrics, grit_table
from microbench.results.io import write_json

CLASSES = ["nucleus", "cell", "mitochondria"]


def synthetic(n_images: int, n_objects: int, size: int, rng: np.random.Generator, segm: bool):
    images, preds = [], {}
    for i in range(n_images):
        xy = rng.uniform(0, size - 40, (n_objects, 2))
        wh = rng.uniform(8, 40, (n_objects, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        classes = [CLASSES[k] for k in rng.integers(0, len(CLASSES), n_objects)]
        polys = [[x1, y1, x2, y1, x2, y2, x1, y2] for x1, y1, x2, y2 in boxes.tolist()] if segm else None
        images.append(LocImage(row=i, image_id=f"img{i}", dataset=f"ds{i % 4}", split="test", width=size,
                               height=size, classes=classes, boxes=boxes, polygons=polys))
        jitter = boxes + rng.normal(0, 2.0, boxes.shape)
        fp_xy = rng.uniform(0, size - 40, (10, 2))
        fp = np.concatenate([fp_xy, fp_xy + 20], 1)
        pb = np.concatenate([jitter, fp]).clip(0, size)
        labels = np.array([CLASSES.index(c) + 1 for c in classes] + list(rng.integers(1, 4, 10)))
        rec = {"boxes": pb, "scores": rng.uniform(0.3, 1.0, len(pb)), "labels": labels}
        if segm:
            masks = np.zeros((len(pb), size, size), dtype=np.float32)
            for j, (x1, y1, x2, y2) in enumerate(pb.astype(int)):
                masks[j, y1:y2, x1:x2] = 1
            rec["masks"] = encode_masks(masks)
        preds[i] = rec
    return images, preds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--objects", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--segm", action="store_true", help="also time mask AP (RLE masks)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "localization.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    images, preds = synthetic(args.images, args.objects, args.size, rng, args.segm)
    build_s = time.perf_counter() - t
    gt = coco_ground_truth(images, CLASSES)
    result = {"images": args.images, "objects_per_image": args.objects, "detections_per_image": args.objects + 10,
              "size": args.size, "synthetic_build_s": round(build_s, 2)}
    t = time.perf_counter()
    box = coco_evaluate(gt, coco_detections(preds, len(images), False), "bbox", max_dets=1000)
    result["coco_bbox_s"] = round(time.perf_counter() - t, 2)
    result["bbox_AP"], result["bbox_AP50"] = round(box["AP"], 4), round(box["AP50"], 4)
    if args.segm:
        t = time.perf_counter()
        seg = coco_evaluate(gt, coco_detections(preds, len(images), True), "segm", max_dets=1000)
        result["coco_segm_s"] = round(time.perf_counter() - t, 2)
        result["segm_AP"] = round(seg["AP"], 4)
    t = time.perf_counter()
    table = grit_table(images, CLASSES, preds, score_threshold=0.5)
    grit = grit_metrics(table)
    result["grit_s"] = round(time.perf_counter() - t, 2)
    result["grit_pairs"] = len(table)
    result["grit_macro"] = round(grit["grit/macro"], 4)
    result["total_scoring_s"] = round(result["coco_bbox_s"] + result["grit_s"] + result.get("coco_segm_s", 0), 2)
    write_json(args.out, result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
