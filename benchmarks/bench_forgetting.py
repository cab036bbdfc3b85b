"""Forgetting-study benchmark (figures for the README and closing notes; never timed in unit tests).

An 11-α WiSE-FT sweep with ``InterpolationScorer`` (each image decoded once for the whole sweep) against 11 separate
zero-shot evaluations (each decoding every image again), on 512 px PNGs (the real release has 224-2,050 px images),
with decode counts; then the cost of a forgetting study comparing four merge methods (WiSE-FT, LiNeS, TIES trim,
DARE with 3 seeds) in one run against running each method's study alone (images decoded, seconds).

Usage: .venv/bin/python benchmarks/bench_forgetting.py [--rows 400] [--model microbench-tiny] [--skip-sweep]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_data import scaled_copy  # noqa: E402

from microbench.data import datamodule as dmod  # noqa: E402
from microbench.models.backbones import build_backbone  # noqa: E402
from microbench.models.zero_shot import ZeroShotScorer  # noqa: E402
from microbench.results.io import write_json  # noqa: E402
from microbench.studies.merging import wise_ft  # noqa: E402
from microbench.studies.sweep import InterpolationScorer  # noqa: E402

DECODES = {"n": 0}
_orig = dmod.UniqueImageDataset.__getitem__


def _counting(self, i):
    DECODES["n"] += 1
    return _orig(self, i)


dmod.UniqueImageDataset.__getitem__ = _counting


def _trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--model", default="microbench-tiny")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/forgetting.json"))
    ap.add_argument("--skip-sweep", action="store_true", help="only the multi-method study part")
    ap.add_argument("--n-resamples", type=int, default=999, help="bootstrap resamples of the studies' CIs")
    args = ap.parse_args()
    if args.skip_sweep:
        with tempfile.TemporaryDirectory() as d:
            res = methods_cost(args, Path(d))
        print(res)
        write_json(args.out.with_name("forgetting_methods.json"), res)
        return
    alphas = [round(a, 1) for a in np.linspace(0, 1, 11)]
    with tempfile.TemporaryDirectory() as d:
        folder = scaled_copy(args.rows, Path(d) / "copy", image_px=512)
        bb = build_backbone("open_clip", args.model, pretrained=None)
        base = {k: v.clone() for k, v in bb.state_dict().items()}
        g = torch.Generator().manual_seed(0)
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
              for k, v in base.items()}
        dm = dmod.PerceptionDataModule(str(folder), transform=bb.preprocess, batch_size=64)
        dm.setup()
        n_images = len(dm.images())
        DECODES["n"] = 0
        t0 = time.perf_counter()
        sweep = InterpolationScorer(bb, base, ft, alphas, progress=False)
        _trainer().test(sweep, datamodule=dm, verbose=False)
        sweep_s, sweep_decodes = time.perf_counter() - t0, DECODES["n"]
        DECODES["n"] = 0
        t0 = time.perf_counter()
        agree = True
        for a in alphas:
            bb.load_state_dict(wise_ft(base, ft, a))
            s = ZeroShotScorer(bb, progress=False)
            _trainer().test(s, datamodule=dm, verbose=False)
            agree &= bool((s.predictions["pred_idx"].to_numpy() == sweep.predictions_by_alpha[a]["pred_idx"]
                           .to_numpy()).all())
        separate_s, separate_decodes = time.perf_counter() - t0, DECODES["n"]
    res = {"model": args.model, "rows": args.rows, "images": n_images, "image_px": 512, "alphas": len(alphas),
           "sweep_s": round(sweep_s, 2), "sweep_decodes": sweep_decodes, "sweep_timings": sweep.timings,
           "separate_s": round(separate_s, 2), "separate_decodes": separate_decodes,
           "speedup": round(separate_s / sweep_s, 2), "predictions_identical": agree}
    print(res)
    write_json(args.out, res)
    with tempfile.TemporaryDirectory() as d:
        methods = methods_cost(args, Path(d))
    print(methods)
    write_json(args.out.with_name("forgetting_methods.json"), methods)


def methods_cost(args, tmp: Path) -> dict:
    """One study of four methods against four one-method studies on the same copy (val + test splits)."""
    from microbench.studies.forgetting import StudySpec, run_study

    folder = scaled_copy(args.rows, tmp / "copy", image_px=512)
    bb = build_backbone("open_clip", args.model, pretrained=None)
    base = {k: v.clone() for k, v in bb.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
          for k, v in base.items()}

    def make_dm(split):
        return dmod.PerceptionDataModule(str(folder), transform=bb.preprocess, batch_size=64, split=split)

    def study(methods, name):
        DECODES["n"] = 0
        t0 = time.perf_counter()
        s = run_study(bb, base, ft, make_dm=make_dm, out_dir=tmp / name, target_datasets=["kather_et_al_2016"],
                      spec=StudySpec(methods=tuple(methods), n_resamples=args.n_resamples))
        return {"seconds": round(time.perf_counter() - t0, 2), "decoded_images": DECODES["n"],
                "models_scored": sum(s["splits"][sp]["sweep"]["models"] for sp in ("val", "test")),
                "sweep_seconds": round(sum(s["splits"][sp]["sweep"]["seconds"] for sp in ("val", "test")), 2)}

    methods = ["wise_ft", "lines", "ties_trim", "dare"]
    together = study(methods, "together")
    alone = {m: study([m], m) for m in methods}
    return {"methods": methods, "n_resamples": args.n_resamples, "together": together, "alone": alone,
            "alone_total": {k: round(sum(a[k] for a in alone.values()), 2) for k in together}}


if __name__ == "__main__":
    main()
