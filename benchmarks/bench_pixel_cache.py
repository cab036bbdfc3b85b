"""Decode once per copy (issue 24 §1): the sample's images through the evaluation loader, cold (decoded and written
to the pixel cache) vs warm (read back), and the tiny model's image features end to end, each as a ratio in one
run. Writes ``benchmarks/results/pixel_cache.json``.

    .venv/bin/python benchmarks/bench_pixel_cache.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from microbench.data.datamodule import PerceptionDataModule, default_transform  # noqa: E402
from microbench.models.backbones import build_backbone  # noqa: E402
from microbench.models.features import compute_image_features  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return round(time.perf_counter() - t, 4)


def main() -> None:
    bb = build_backbone("open_clip", "microbench-tiny", pretrained=None)
    out = {}
    with tempfile.TemporaryDirectory() as root:
        for label, tf in (("open_clip tiny (64 px)", bb.preprocess), ("torchvision v2 224 px", default_transform())):
            def loader(cache, tf=tf):
                dm = PerceptionDataModule("sample", transform=tf, split="all", pixel_cache=cache)
                dm.setup()
                return lambda: [b for b in dm.image_loader("all")]
            none, cold, warm = timed(loader(None)), timed(loader(f"{root}/{len(out)}")), timed(
                loader(f"{root}/{len(out)}"))
            out[label] = {"no_cache_s": none, "cold_s": cold, "warm_s": warm, "warm_speedup": round(none / warm, 2)}

        def features(cache):
            dm = PerceptionDataModule("sample", transform=bb.preprocess, split="all", pixel_cache=cache)
            dm.setup()
            return lambda: compute_image_features(bb, dm, progress=False)
        none, cold, warm = timed(features(None)), timed(features(f"{root}/f")), timed(features(f"{root}/f"))
        out["tiny features end to end"] = {"no_cache_s": none, "cold_s": cold, "warm_s": warm,
                                           "warm_speedup": round(none / warm, 2)}
    dm = PerceptionDataModule("sample", transform=bb.preprocess, split="all")
    dm.setup()
    out["images"] = len(dm.images("all"))
    out["cpu_count"] = os.cpu_count()
    path = Path("benchmarks/results/pixel_cache.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
