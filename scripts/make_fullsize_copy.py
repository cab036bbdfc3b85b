"""Write a synthetic copy shaped like the whole μ-Bench release (microbench.data.fullsize) for benchmarks.

Usage: .venv/bin/python scripts/make_fullsize_copy.py <folder> [--scale 1.0] [--seed 0]
Then e.g. python src/eval.py data.path=<folder> (a Hub-layout copy, like the sample).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from microbench.data.fullsize import make_fullsize_copy
from microbench.errors import UserError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--scale", type=float, default=1.0, help="share of each dataset's rows (at least one each)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.scale <= 0:
        sys.exit(f"error: --scale must be > 0 (1.0: the release's 17,315 rows), got {args.scale}")
    t = time.perf_counter()
    try:
        stats = make_fullsize_copy(args.folder, scale=args.scale, seed=args.seed)
    except UserError as err:
        sys.exit(f"error: {err}")
    except OSError as err:
        sys.exit(f"error: cannot write the copy to {args.folder} ({err.strerror}): pass a writable folder")
    print(json.dumps({**stats, "seconds": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
