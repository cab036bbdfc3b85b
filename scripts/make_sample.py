"""Regenerate the embedded μ-Bench sample under data/sample (deterministic: same seed, same content)."""

from __future__ import annotations

import argparse
from pathlib import Path

from microbench.data.loading import SAMPLE_DIR, load_ubench
from microbench.data.sample import make_sample
from microbench.data.sample_cognition import write_sample_cognition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output folder (default: data/sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    paths = make_sample(args.out, seed=args.seed, n_shards=args.shards)
    ds, src = load_ubench(args.out)
    size = sum(p.stat().st_size for p in paths) / 1e6
    cognition = write_sample_cognition(args.out, seed=args.seed)
    print(f"wrote the cognition example ({len(cognition)} files) to {args.out}/cognition")
    print(f"wrote {len(ds)} rows in {len(paths)} shards ({size:.2f} MB) to {args.out}; fingerprint {src.fingerprint}")


if __name__ == "__main__":
    main()
