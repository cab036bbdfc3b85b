"""Statistics benchmarks (figures for the README and closing notes; never timed in unit tests).

On synthetic predictions of the real release's size and structure (15,407 images, each with 5 coarse caption types
and 1 fine in two variants plus the 6 question items: 277k items, 24 datasets):

1. every closed-VQA metric with and without the image-clustered intervals (9,999 resamples);
2. one leaderboard pairing: coarse and fine Δ of two models, image-clustered, 9,999 resamples;
3. ``rescore`` of a perception run (read, recompute every metric, compare);
4. COCO AP's image bootstrap (1,000 resamples) for 500 images of about 20 objects each.

Usage: .venv/bin/python benchmarks/bench_statistics.py [--out benchmarks/results/statistics.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from microbench.data import schema
from microbench.data.localization import LocImage, coco_ground_truth
from microbench.metrics.closed_vqa import closed_vqa_metrics
from microbench.metrics.coco import evaluated, image_bootstrap
from microbench.metrics.localization import coco_detections
from microbench.results.compare import paired_deltas
from microbench.results.io import write_json, write_parquet
from microbench.results.rescore import rescore

COARSE = ("modality", "submodality", "domain", "subdomain", "stain")


def release_like(n_images: int = 15_407, seed: int = 0, skill: float = 0.4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    datasets = sorted(schema.OFFICIAL_DATASETS)[:23] + ["opencell"]
    rows = []
    for t in (*COARSE, "classification"):
        for source, variants in (("captions", (0, 1)), ("questions", (-1,))):
            for v in variants:
                rows.append((source, t, f"{t}_{v}" if v >= 0 else t, v))
    per = len(rows)
    img = np.repeat(np.arange(n_images), per)
    spec = np.tile(np.arange(per), n_images)
    ability = rng.uniform(0, 1, n_images)  # answers on one image agree
    correct = rng.uniform(size=img.size) < (skill * ability[img] + 0.1)
    return pd.DataFrame({
        "row_idx": img, "image_id": [f"img{i}" for i in img], "dataset": np.asarray(datasets)[img % len(datasets)],
        "source": [rows[s][0] for s in spec], "question_type": [rows[s][1] for s in spec],
        "key": [rows[s][2] for s in spec], "variant": np.array([rows[s][3] for s in spec], dtype=np.int8),
        "gold_idx": 0, "correct": correct})


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/statistics.json"))
    args = ap.parse_args()
    a, b = release_like(seed=0), release_like(seed=1, skill=0.45)
    res: dict = {"items": len(a), "images": int(a["image_id"].nunique())}
    _, res["closed_vqa_metrics_official_only_s"] = timed(lambda: closed_vqa_metrics(a, clustered=False))
    metrics, res["closed_vqa_metrics_with_clustered_s"] = timed(lambda: closed_vqa_metrics(a))
    res["metrics"] = len(metrics)
    boot = {"n_resamples": 9999, "confidence": 0.95, "seed": 0}
    names = {"coarse": "captions/official/coarse", "fine": "captions/official/fine"}
    cap = lambda f: f[f["source"] == "captions"]  # noqa: E731
    d, res["leaderboard_pairing_coarse_fine_s"] = timed(lambda: paired_deltas(cap(a), cap(b), "perception", names,
                                                                              boot))
    res["pairing_example"] = {k: {kk: round(100 * v[kk], 2) for kk in ("value", "low", "high")} | {"p": v["p"]}
                              for k, v in d.items() if k != "_unpaired"}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        write_parquet(run / "predictions.parquet", a)
        write_json(run / "metrics.json", {"task": "zero_shot_perception", "metrics": metrics, "bootstrap": boot})
        r, res["rescore_perception_s"] = timed(lambda: rescore(run, "record"))
        res["rescore_values_compared"], res["rescore_equal"] = r.compared, r.ok
    rng = np.random.default_rng(0)
    images, preds = [], {}
    for i in range(500):
        k = int(rng.integers(10, 30))
        xy, wh = rng.uniform(0, 900, (k, 2)), rng.uniform(10, 80, (k, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        images.append(LocImage(row=i, image_id=f"im{i}", dataset="d", split="test", width=1000, height=1000,
                               classes=["nucleus"] * k, boxes=boxes, polygons=None))
        preds[i] = {"boxes": boxes + rng.normal(0, 6, boxes.shape), "scores": rng.uniform(0.2, 1, k),
                    "labels": np.ones(k, int)}
    ev = evaluated(coco_ground_truth(images, ["nucleus"]), coco_detections(preds, len(images), False))
    iv, res["coco_image_bootstrap_1000_s"] = timed(lambda: image_bootstrap(ev, 1000))
    res["coco_objects"] = int(sum(im.n for im in images))
    res["coco_ap_interval"] = {k: [round(100 * v["low"], 2), round(100 * v["high"], 2)] for k, v in iv.items()}
    write_json(args.out, res)
    print(res)


if __name__ == "__main__":
    main()
