"""Generative-harness benchmark: the OpenAI-compatible client against a loopback server answering in 100 ms.

Questions are the sample's perception ``questions`` (real images sent as data URLs, official prompt), repeated to
``--questions``; reports questions/s with ``--concurrency`` requests in flight, and a second, fully cached run's
request count (must be 0).

Usage: .venv/bin/python benchmarks/bench_generative.py [--questions 1600] [--concurrency 16] [--delay 0.1]
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

from datasets import Image  # noqa: E402

from microbench.data.loading import load_ubench  # noqa: E402
from microbench.data.questions import build_question_table  # noqa: E402
from microbench.generative.backends import OpenAICompatibleBackend  # noqa: E402
from microbench.generative.harness import run_generative  # noqa: E402
from microbench.generative.loopback import ScriptedChatServer  # noqa: E402
from microbench.results.io import write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=1600)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--delay", type=float, default=0.1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generative.json"))
    args = ap.parse_args()
    ds, _ = load_ubench("sample")
    qt = build_question_table(ds).frame
    base = qt[(qt["source"] == "questions") & qt["valid"]].reset_index(drop=True)
    reps = -(-args.questions // len(base))
    items = base.loc[base.index.repeat(reps)].head(args.questions).reset_index(drop=True)
    items["key"] = [f"{k}#{i}" for i, k in enumerate(items["key"])]
    items["question"] = [f"{q} [{i}]" for i, q in enumerate(items["question"])]  # distinct questions: no cache hits
    raw = ds.select_columns(["image"]).cast_column("image", Image(decode=False))

    def images_of(row: int) -> list[bytes]:
        return [raw[int(row)]["image"]["bytes"]]

    result = {"questions": len(items), "concurrency": args.concurrency, "server_delay_s": args.delay}
    with ScriptedChatServer(delay_s=args.delay) as srv, tempfile.TemporaryDirectory() as cache:
        be = OpenAICompatibleBackend("bench", base_url=srv.base_url, max_concurrency=args.concurrency,
                                     cache_dir=cache)
        t = time.perf_counter()
        preds = run_generative(items, images_of, be, progress=False)
        secs = time.perf_counter() - t
        result.update(first_run_s=round(secs, 2), questions_per_s=round(len(items) / secs, 1),
                      ideal_questions_per_s=round(args.concurrency / args.delay, 1),
                      requests_sent=be.stats.requests_sent, server_max_in_flight=srv.max_in_flight,
                      failed=be.stats.failed, answered=int(preds["response"].notna().sum()))
        before = srv.requests
        t = time.perf_counter()
        be2 = OpenAICompatibleBackend("bench", base_url=srv.base_url, max_concurrency=args.concurrency,
                                      cache_dir=cache)
        run_generative(items, images_of, be2, progress=False)
        result.update(cached_rerun_s=round(time.perf_counter() - t, 2), cached_rerun_requests=srv.requests - before,
                      cached_rerun_hits=be2.stats.cache_hits)
    write_json(args.out, result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
