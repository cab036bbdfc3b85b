"""Evaluation throughput at the physical limit (issue 24 §2): the image tower alone vs the whole zero-shot evaluation.

For each model (random init is fine for speed: ViT-B-32 and ViT-L-14 by default) on the chosen device:

1. ``encoder``: image-tower throughput on synthetic input already on the device (images/s), fp32 and (where the
   device has it) bf16: the ceiling.
2. ``eval_cold`` / ``eval_warm``: the full evaluation (``ZeroShotScorer`` under ``trainer.test``: decode, encode
   every unique image once, encode the unique texts once, score every caption set) on a full-benchmark-shaped
   synthetic copy (``microbench.data.fullsize``), first with an empty pixel cache (every PNG decoded), then warm
   (the uint8 pixels read back, finished on the device). ``warm_over_encoder`` is warm end-to-end images/s over (1).
3. ``ddp``: the warm evaluation over every GPU (Lightning DDP), when there is more than one.

Goals (one H100-class GPU): the full benchmark in <= 30 s cold and <= 10 s warm, warm end-to-end >= 70 % of (1).

Usage:
  .venv/bin/python benchmarks/bench_gpu.py [--copy <folder>] [--scale 1.0] [--images N] [--models ViT-B-32 ViT-L-14]
      [--precision fp32 bf16] [--workers 8] [--batch-size 256] [--seconds S] [--out benchmarks/results/gpu.json]
Without --copy a copy is generated in a temporary folder (scripts/make_fullsize_copy.py writes one to keep);
--images limits the evaluation to the first N unique images (a CPU cannot encode 17,315 images through ViT-L-14 in a
benchmark's time). Writes a JSON and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from microbench.data.datamodule import PerceptionDataModule, unique_images  # noqa: E402
from microbench.data.fullsize import make_fullsize_copy  # noqa: E402
from microbench.models.backbones import build_backbone  # noqa: E402
from microbench.models.inference import TEXT_CACHE, InferenceSettings  # noqa: E402
from microbench.models.zero_shot import ZeroShotScorer  # noqa: E402
from microbench.results.io import write_json, write_text  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def encoder_throughput(bb, device: str, batch_size: int, seconds: float | None = None) -> float:
    """Images/s of ``embed_images`` on random input already on ``device`` (after two warm-up batches), over at
    least ``seconds`` (3 on a GPU, 20 on a CPU, where one batch can take seconds)."""
    seconds = seconds if seconds is not None else 3.0 if device.startswith("cuda") else 20.0
    size = bb.pixel_config()["size"]
    x = torch.randn(batch_size, 3, size, size, device=device)
    for _ in range(2):
        bb.embed_images(x)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        bb.embed_images(x)
        n += batch_size
    _sync(device)
    return n / (time.perf_counter() - t0)


def _datamodule(copy: str, bb, cache: str | None, n_images: int | None, batch_size: int, workers: int):
    dm = PerceptionDataModule(copy, transform=bb.preprocess, batch_size=batch_size, num_workers=workers,
                              pixel_cache=cache, pin_memory=torch.cuda.is_available())
    dm.setup("test")
    if n_images:
        keep = set(dm.images().image_id[:n_images])
        dm.rows = dm.rows[dm.rows["image_id"].isin(keep)].reset_index(drop=True)
        dm._images = {"all": unique_images(dm.rows)}
    return dm


def evaluate(copy: str, bb, cache: str | None, n_images: int | None, batch_size: int, workers: int,
             accelerator: str, devices: int = 1) -> dict:
    TEXT_CACHE.clear()  # every timed evaluation encodes its texts
    dm = _datamodule(copy, bb, cache, n_images, batch_size, workers)
    scorer = ZeroShotScorer(bb, progress=False)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        strategy="ddp" if devices > 1 else "auto")
    t0 = time.perf_counter()
    trainer.test(scorer, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - t0
    n = len(dm.images())
    return {"images": n, "items": 0 if scorer.predictions is None else len(scorer.predictions),
            "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1), "phases_s": scorer.timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copy", default=None)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="also time inference.compile=true (warm)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="how long to time the encoder alone (default 3 s on a GPU, 20 s on a CPU)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, accelerator = ("cuda", "gpu") if cuda else ("cpu", "cpu")
    res: dict = {"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "workers": args.workers,
                 "encoder_seconds": args.seconds,
                 "batch_size": args.batch_size, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        copy = args.copy
        if copy is None:
            t = time.perf_counter()
            res["copy"] = make_fullsize_copy(Path(tmp) / "copy", scale=args.scale)
            res["copy"]["generate_s"] = round(time.perf_counter() - t, 1)
            copy = res["copy"]["folder"]
            print("copy:", res["copy"], flush=True)
        for name in args.models:
            bb = build_backbone("open_clip", name, pretrained=None).to(device).eval()
            out: dict = {"encoder_images_per_s": {}}
            for precision in args.precision:
                settings = InferenceSettings(precision=precision)
                if precision != "fp32" and settings.dtype(device) == torch.float32:
                    continue
                bb.set_inference(settings)
                out["encoder_images_per_s"][precision] = round(
                    encoder_throughput(bb, device, args.batch_size, args.seconds), 1)
                cache = Path(tmp) / f"pixels-{name}-{precision}"
                out[precision] = {"eval_cold": evaluate(copy, bb, str(cache), args.images, args.batch_size,
                                                        args.workers, accelerator),
                                  "eval_warm": evaluate(copy, bb, str(cache), args.images, args.batch_size,
                                                        args.workers, accelerator)}
                warm = out[precision]["eval_warm"]["images_per_s"]
                out[precision]["warm_over_encoder"] = round(warm / out["encoder_images_per_s"][precision], 3)
                out[precision]["warm_over_cold"] = round(
                    out[precision]["eval_cold"]["seconds"] / out[precision]["eval_warm"]["seconds"], 2)
                if cuda and torch.cuda.device_count() > 1:
                    out[precision]["ddp"] = evaluate(copy, bb, str(cache), args.images, args.batch_size,
                                                     args.workers, accelerator, torch.cuda.device_count())
                if args.compile:
                    bb.set_inference(InferenceSettings(precision=precision, compile=True))
                    evaluate(copy, bb, str(cache), args.images, args.batch_size, args.workers, accelerator)
                    out[precision]["eval_warm_compiled"] = evaluate(copy, bb, str(cache), args.images,
                                                                    args.batch_size, args.workers, accelerator)
                print(name, precision, out[precision], flush=True)
            res["models"][name] = out
    if not cuda:
        res["note"] = "no GPU in this run: CPU figures (the goals are for one H100-class GPU)"
    write_json(args.out, res)
    write_text(args.out.with_suffix(".md"), table(res))
    print(table(res))


def table(res: dict) -> str:
    lines = [f"Evaluation throughput on {res['device']} (batch {res['batch_size']}, {res['workers']} workers)", "",
             "| model | precision | encoder img/s | cold s | warm s | warm img/s | warm / encoder | cold / warm |",
             "|---|---|---|---|---|---|---|---|"]
    for name, out in res["models"].items():
        for precision, enc in out["encoder_images_per_s"].items():
            r = out[precision]
            lines.append(f"| {name} | {precision} | {enc} | {r['eval_cold']['seconds']} | {r['eval_warm']['seconds']} "
                         f"| {r['eval_warm']['images_per_s']} | {r['warm_over_encoder']:.0%} | {r['warm_over_cold']}× |")
    images = next((r["eval_warm"]["images"] for out in res["models"].values() for k, r in out.items()
                   if isinstance(r, dict) and "eval_warm" in r), None)
    lines += ["", f"{images} unique images per evaluation."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
