"""Data-layer benchmarks (figures for the README and closing notes; never timed in unit tests).

1. Question table for a synthetic copy with the real release's size (17,315 rows) and per-row structure (12 caption
   sets + 6 questions, nulls where the real data has them): wall time and extra peak memory (RSS high-water mark).
2. PerceptionDataModule decode throughput (images/s, 224 px transform) with 0 and 2 workers, on the sample's
   96 px images and on 512 px PNGs (closer to the real 224-2,050 px images).

Usage: .venv/bin/python benchmarks/bench_data.py [--rows 17315] [--out benchmarks/results/data.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from microbench.data.datamodule import PerceptionDataModule  # noqa: E402
from microbench.data.loading import load_ubench  # noqa: E402
from microbench.data.questions import build_question_table  # noqa: E402
from microbench.data.sample import sample_features, write_hub_layout  # noqa: E402
from microbench.results.io import write_json  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def scaled_copy(n_rows: int, folder: Path, image_px: int | None = None) -> Path:
    """Tile the sample's rows (fresh image ids) to n_rows and write them in the Hub layout (7 shards)."""
    ds, _ = load_ubench("sample")
    table = ds.data.table
    idx = np.arange(n_rows) % len(ds)
    big = table.take(pa.array(idx))
    rng = np.random.default_rng(0)
    ids = [str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)), version=4))
           for _ in range(len(ds))]
    # keep the sample's id sharing (Burgess) pattern within each tile, new ids per tile
    tile = np.arange(n_rows) // len(ds)
    orig_ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    id_map = {v: i for i, v in enumerate(dict.fromkeys(orig_ids))}
    new_ids = [f"{ids[id_map[orig_ids[j]] % len(ids)][:-6]}{t:06d}" for j, t in zip(idx, tile, strict=True)]
    big = big.set_column(0, "image_id", pa.array(new_ids))
    if image_px:
        images = big.column("image").to_pylist()
        cache: dict[int, bytes] = {}
        for k, j in enumerate(idx):
            if j not in cache:
                img = Image.open(io.BytesIO(images[k]["bytes"])).convert("RGB").resize((image_px, image_px))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                cache[j] = buf.getvalue()
            images[k] = {"bytes": cache[j], "path": images[k]["path"]}
        big = big.set_column(1, "image", pa.array(images, type=big.schema.field("image").type))
    rows = big.to_pylist()
    write_hub_layout(rows, folder, sample_features(), n_shards=7)
    return folder


def bench_question_table(n_rows: int, tmp: Path) -> dict:
    folder = scaled_copy(n_rows, tmp / "rows")
    ds, src = load_ubench(folder)
    build_question_table(ds.select(range(100)))  # warm imports
    rss0 = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    table = build_question_table(ds)
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"rows": len(ds), "unique_images": int(table.rows["image_id"].nunique()),
            "items": len(table.frame), "seconds": round(dt, 3),
            "extra_peak_mb": round((peak - rss0) / 2**20, 1), "problems": len(table.problems)}


def bench_decode(folder: Path | str, label: str, n_images: int | None = None) -> dict:
    out = {}
    for workers in (0, 2):
        dm = PerceptionDataModule(str(folder), batch_size=32, num_workers=workers, image_size=224)
        dm.setup()
        loader = dm.test_dataloader()
        n = 0
        t0 = time.perf_counter()
        for batch in loader:
            n += len(batch["image_index"])
            if n_images and n >= n_images:
                break
        out[f"workers_{workers}"] = {"images": n, "images_per_s": round(n / (time.perf_counter() - t0), 1)}
    return {label: out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=17_315)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/data.json"))
    args = ap.parse_args()
    res: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res["question_table"] = bench_question_table(args.rows, tmp)
        print("question table:", res["question_table"], flush=True)
        res["decode"] = bench_decode("sample", "sample_96px")
        big = scaled_copy(640, tmp / "px512", image_px=512)
        res["decode"].update(bench_decode(big, "png_512px"))
        print("decode:", res["decode"], flush=True)
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
