"""Zero-shot evaluation benchmarks (figures for the README and closing notes; never timed in unit tests).

1. Real ``ViT-B-32`` architecture (random init) on CPU over a few hundred sample images, side by side in one run:
   (a) the full zero-shot evaluation (``ZeroShotScorer`` via ``trainer.test``: decode, encode images once, encode
   unique texts once, score every caption set); (b) decoding and encoding the unique images alone; (c) the naive
   protocol that re-encodes the image (and its texts) for every caption set, timed on a subset.
   Targets: (a) <= 1.3 x (b); (c) per image >= 4 x slower than (a).
2. Peak memory (max RSS of a fresh process) of a full evaluation with the tiny model on 1x and 4x copies.

Usage: .venv/bin/python benchmarks/bench_eval.py [--images 240] [--naive-images 40] [--model ViT-B-32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from microbench.data.datamodule import PerceptionDataModule  # noqa: E402
from microbench.models.backbones import build_backbone  # noqa: E402
from microbench.models.zero_shot import ZeroShotScorer  # noqa: E402
from microbench.results.io import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _dm(path: str, bb, n_images: int, batch_size: int) -> PerceptionDataModule:
    dm = PerceptionDataModule(path, transform=bb.preprocess, batch_size=batch_size)
    dm.setup()
    keep = set(dm.images().image_id[:n_images])
    dm2 = PerceptionDataModule(path, transform=bb.preprocess, batch_size=batch_size)
    dm2.setup()
    rows = dm2.rows[dm2.rows["image_id"].isin(keep)].reset_index(drop=True)
    dm2.rows = rows
    from microbench.data.datamodule import unique_images

    dm2._images = {"all": unique_images(rows)}
    return dm2


@torch.no_grad()
def time_full(dm, bb) -> float:
    scorer = ZeroShotScorer(bb, progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.test(scorer, datamodule=dm, verbose=False)
    dt = time.perf_counter() - t0
    return dt, len(scorer.predictions), {**scorer.timings, "unique_texts": scorer.unique_texts}


@torch.no_grad()
def time_images_only(dm, bb) -> float:
    bb.eval()
    t0 = time.perf_counter()
    for batch in dm.test_dataloader():
        bb.encode_image(batch["pixel_values"])
    return time.perf_counter() - t0


@torch.no_grad()
def time_naive(dm, bb, n_images: int) -> tuple[float, int]:
    """Per caption set: decode + preprocess + encode the image, encode its option texts, argmax."""
    bb.eval()
    q = dm.questions()
    q = q[q["source"] == "captions"]
    imgs = dm.images()
    row_to_img = {int(r): i for i, rows in enumerate(imgs.rows) for r in rows}
    q = q[q["row_idx"].map(row_to_img) < n_images]
    t0 = time.perf_counter()
    for row_idx, options in zip(q["row_idx"], q["options"], strict=True):
        img = bb.preprocess(dm.hf[int(row_idx)]["image"].convert("RGB"))[None]
        ie = torch.nn.functional.normalize(bb.encode_image(img), dim=-1)
        te = torch.nn.functional.normalize(bb.encode_text(bb.tokenize(list(options))), dim=-1)
        int((ie @ te.T).argmax())
    return time.perf_counter() - t0, len(q)


def peak_memory(rows: int, tmp: Path) -> dict:
    """Full tiny-model evaluation of a `rows`-row copy in a fresh process, with anonymous memory (heap, not the
    page cache of the memory-mapped shards) at each phase: after data setup (question table), at the end of the
    image loop, after scoring; and the peak RSS. The copy is written beforehand by this process."""
    from bench_data import scaled_copy

    folder = scaled_copy(rows, tmp / f"copy{rows}")
    code = f"""
from pathlib import Path
import lightning as L
from microbench.data.datamodule import PerceptionDataModule
from microbench.models.backbones import build_backbone
from microbench.models.zero_shot import ZeroShotScorer
def st(field):
    return next(int(l.split()[1]) // 1024 for l in Path('/proc/self/status').read_text().splitlines()
                if l.startswith(field + ':'))
bb = build_backbone("open_clip", "microbench-tiny", pretrained=None)
phase = {{"baseline_anon": st("RssAnon")}}
Path('/proc/self/clear_refs').write_text('5')
base_rss = st("VmRSS")
dm = PerceptionDataModule({str(folder)!r}, transform=bb.preprocess, batch_size=64)
dm.setup()
phase["after_setup_anon"] = st("RssAnon")
class Scorer(ZeroShotScorer):
    def on_test_epoch_end(self):
        phase["after_image_loop_anon"] = st("RssAnon")
        super().on_test_epoch_end()
        phase["after_scoring_anon"] = st("RssAnon")
s = Scorer(bb, progress=False)
L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
          enable_model_summary=False).test(s, datamodule=dm, verbose=False)
phase["extra_peak_rss"] = st("VmHWM") - base_rss
print("RESULT", len(dm.images()), len(s.predictions), *[f"{{k}}={{v}}" for k, v in phase.items()])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    _, n_img, n_pred, *kv = line.split()
    ph = {k: int(v) for k, v in (x.split("=") for x in kv)}
    return {"rows": rows, "images": int(n_img), "predictions": int(n_pred),
            "setup_question_table_mb": ph["after_setup_anon"] - ph["baseline_anon"],
            "image_loop_mb": ph["after_image_loop_anon"] - ph["after_setup_anon"],
            "scoring_mb": ph["after_scoring_anon"] - ph["after_image_loop_anon"],
            "extra_peak_rss_mb": ph["extra_peak_rss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--naive-images", type=int, default=40)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--memory-rows", type=int, nargs=2, default=[1000, 4000])
    ap.add_argument("--memory-only", action="store_true", help="skip the ViT-B-32 speed part")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    res: dict = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "model": args.model}
    if args.memory_only:
        previous = json.loads(args.out.read_text()) if args.out.exists() else {}
        res["speed"] = previous.get("speed")
    else:
        res["speed"] = run_speed(args)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    with tempfile.TemporaryDirectory() as d:
        res["memory"] = [peak_memory(r, Path(d)) for r in args.memory_rows]
    print("memory:", res["memory"], flush=True)
    write_json(args.out, res)
    print(f"wrote {args.out}")


def run_speed(args) -> dict:
    bb = build_backbone("open_clip", args.model, pretrained=None)
    dm = _dm("sample", bb, args.images, args.batch_size)
    n = len(dm.images())
    time_images_only(_dm("sample", bb, 16, args.batch_size), bb)  # warm-up
    full, n_pred, phases = time_full(dm, bb)
    images_only = time_images_only(dm, bb)
    naive, n_naive_items = time_naive(dm, bb, args.naive_images)
    speed = {
        "images": n, "scored_items": n_pred, "full_eval_s": round(full, 2), "decode_encode_images_s": round(images_only, 2),
        "full_over_images_only": round(full / images_only, 3),
        "naive_images": args.naive_images, "naive_items": n_naive_items, "naive_s": round(naive, 2),
        "full_s_per_image": round(full / n, 4), "naive_s_per_image": round(naive / args.naive_images, 4),
        "speedup_vs_naive": round((naive / args.naive_images) / (full / n), 2),
        "full_eval_phases_s": phases,
    }
    print("speed:", speed, flush=True)
    return speed


if __name__ == "__main__":
    main()
