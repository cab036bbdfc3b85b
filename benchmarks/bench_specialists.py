"""Specialists-study benchmark (figures for the README and closing notes; never timed in unit tests).

The study of three specialists of one base with their merges (the default: uniform soup, task arithmetic at 5 λ,
TIES at 2 densities × 5 λ; 20 models with the base) on the sample's val and test splits, scored

1. in one pass per split (what ``src/specialists.py`` does: each image decoded once for every model), and
2. model by model, one sweep per model (what scoring each model separately costs),

with the decodes and wall time of each, and whether the predictions agree. The specialists are the tiny
generalist's weights moved along random directions (the scoring cost does not depend on how they were trained).

Usage: .venv/bin/python benchmarks/bench_specialists.py [--model tiny_generalist] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from microbench.data.config import make_eval_dm, whole_benchmark_cfg  # noqa: E402
from microbench.results.io import write_json  # noqa: E402
from microbench.studies.forgetting import ResultCache, aligned_correct, sweep_split  # noqa: E402
from microbench.studies.specialists import Specialist, plan_models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/specialists.json"))
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import compose_config
    from microbench.tasks.trainer import build_model

    cfg = compose_config("train", ["experiment=specialist"])
    bb = build_model(cfg.model)
    base = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sps = []
    for name, ds in (("pathology", ["kather_et_al_2016"]), ("fluorescence", ["opencell"]),
                     ("electron", ["empiar_sbfsem"])):
        sps.append(Specialist(name, {k: v + 0.3 * torch.randn(v.shape, generator=gen) * v.std()
                                     if v.is_floating_point() and v.ndim > 1 else v.clone()
                                     for k, v in base.items()}, ds))
    paths, points, _ = plan_models(base, sps)
    make_dm = partial(make_eval_dm, whole_benchmark_cfg(cfg.data), bb.preprocess)
    res: dict = {"models": len(points), "splits": {}}
    for split in ("val", "test"):
        dm = make_dm(split)
        t = time.perf_counter()
        one, info = sweep_split(bb, base, sps[0].state, [], dm, None, ResultCache(None), paths=paths, points=points)
        one_s = time.perf_counter() - t
        t, decoded, agree = time.perf_counter(), 0, True
        for p in points:
            sep, inf = sweep_split(bb, base, sps[0].state, [], make_dm(split), None, ResultCache(None), paths=paths,
                                   points=[p])
            decoded += inf["decoded_images"]
            agree &= bool((aligned_correct(one[p], sep[p])[1] == one[p]["correct"].to_numpy(dtype=float)).all())
        res["splits"][split] = {"images": len(dm.images()), "one_pass": {"seconds": round(one_s, 2),
                                                                        "decoded_images": info["decoded_images"]},
                                "separately": {"seconds": round(time.perf_counter() - t, 2),
                                               "decoded_images": decoded}, "same_predictions": agree}
    write_json(args.out, res)
    print(res)


if __name__ == "__main__":
    main()
