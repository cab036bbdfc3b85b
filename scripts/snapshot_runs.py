"""Behaviour snapshot: run a fixed-seed perception eval, cognition run, the demo fine-tune with its forgetting study,
a localization fit and a forgetting study from ``src/forgetting.py``, and keep what they wrote (predictions, metrics,
reports), minus what legitimately differs between two runs (timings, run ids, paths, dates).

    python scripts/snapshot_runs.py save /tmp/before       # on the old code
    python scripts/snapshot_runs.py compare /tmp/before    # on the new code: every file equal, or the differences

Used to check that a refactor changed no prediction, metric or file (issue 14). Runs on a CPU in about 2 minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
#: keys whose value differs between two identical runs (clock, ids, where the files went)
VOLATILE = {"timings_s", "timings", "seconds", "fit_seconds", "total_seconds", "run_id", "environment", "config",
            "best_checkpoint", "last_checkpoint", "checkpoint_dir", "tested_checkpoint", "report", "checkpoint",
            "finetuned_path", "created", "wall_s", "location_resolved", "duration_s", "backend_stats"}


def runs(tmp: Path) -> list[tuple[str, list[str]]]:
    ck = tmp / "ck"
    fast_fg = ["forgetting.alphas=[0,0.5,1]", "forgetting.n_resamples=199"]
    return [
        ("perception", ["src/eval.py", "bootstrap.n_resamples=199", "sources=[captions,questions]"]),
        ("perception_random", ["src/eval.py", "model=random", "bootstrap.n_resamples=199"]),
        ("cognition", ["src/eval.py", "task=cognition", "bootstrap.n_resamples=199"]),
        ("cognition_random", ["src/eval.py", "task=cognition", "model=random", "bootstrap.n_resamples=199"]),
        ("demo", ["src/train.py", "experiment=demo", "trainer.max_epochs=6", *fast_fg,
                  f"checkpoint_dir={ck}/demo", "+trainer.enable_progress_bar=false"]),
        ("localization", ["src/train.py", "experiment=detect_nuclei", "trainer.max_epochs=2", "forgetting.enabled=true",
                          *fast_fg, f"checkpoint_dir={ck}/loc", "+trainer.enable_progress_bar=false"]),
        ("localization_eval", ["src/eval.py", "task=localization", f"checkpoint={ck}/loc/last.ckpt"]),
        ("forgetting", ["src/forgetting.py", "base=tiny", f"finetuned={ck}/demo/last.ckpt", "alphas=[0,0.5,1]",
                        "bootstrap.n_resamples=199"]),
        ("linear_probe", ["src/train.py", "experiment=linear_probe", "model=tiny", "probe.seeds=[0]",
                          "probe.shots=[full,2]"]),
    ]


def scrub(obj, tmp: str):
    if isinstance(obj, dict):
        return {k: scrub(v, tmp) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [scrub(v, tmp) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(-\d+)?", "<time>", obj.replace(tmp, "<tmp>") if tmp else obj)
    return obj


def snapshot(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
        for name, argv in runs(tmp):
            out = tmp / "out" / name
            cmd = [sys.executable, *argv, f"paths.output_dir={out}", f"paths.root_dir={tmp}"]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode:
                raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            (dest / f"{name}.stdout.txt").write_text(scrub("".join(
                line for line in proc.stdout.splitlines(keepends=True) if "━" not in line), str(tmp)))
            for f in sorted(out.rglob("*")):
                rel = f.relative_to(out)
                if f.is_dir() or rel.parts[0] in (".hydra", "csv") or f.suffix in (".log", ".png"):
                    continue
                target = dest / name / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if f.suffix == ".json":
                    target.write_text(json.dumps(scrub(json.loads(f.read_text()), str(tmp)), indent=1,
                                                 sort_keys=True))
                elif f.suffix == ".parquet":
                    pd.read_parquet(f).to_pickle(target.with_suffix(".pkl"))
                else:
                    target.write_text(scrub(f.read_text(), str(tmp)))
            print(f"{name}: ok", flush=True)


def json_diff(old, new, path: str = "") -> tuple[list[str], list[str]]:
    """(differences, keys only in ``new``): every value of ``old`` must be equal in ``new``; added keys are listed."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs, added = [], [f"{path}/{k}" for k in new if k not in old]
        for k, v in old.items():
            if k not in new:
                diffs.append(f"{path}/{k} missing now")
                continue
            d, a = json_diff(v, new[k], f"{path}/{k}")
            diffs += d
            added += a
        return diffs, added
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        diffs, added = [], []
        for i, (u, v) in enumerate(zip(old, new, strict=True)):
            d, a = json_diff(u, v, f"{path}[{i}]")
            diffs += d
            added += a
        return diffs, added
    return ([] if old == new else [f"{path}: {str(old)[:60]} -> {str(new)[:60]}"]), []


def compare(before: Path, keep: Path | None = None) -> int:
    with tempfile.TemporaryDirectory() as t:
        after = keep or Path(t)
        snapshot(after)
        problems, notes = [], []
        old = {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
        new = {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
        problems += [f"missing now: {p}" for p in sorted(old - new)]
        problems += [f"new file: {p}" for p in sorted(new - old)]
        for rel in sorted(old & new):
            a, b = before / rel, after / rel
            if rel.suffix == ".pkl":
                try:
                    pd.testing.assert_frame_equal(pd.read_pickle(a), pd.read_pickle(b))
                except AssertionError as err:
                    problems.append(f"{rel}: {str(err).splitlines()[0]}")
            elif rel.suffix == ".json":
                diffs, added = json_diff(scrub(json.loads(a.read_text()), ""), json.loads(b.read_text()))
                problems += [f"{rel}: {d}" for d in diffs[:5]]
                notes += [f"{rel}: new key {k}" for k in added]
            elif rel.name.endswith(".stdout.txt"):
                if a.read_text() != b.read_text():
                    notes.append(f"{rel}: the console output changed (not compared; see the two files)")
            elif a.read_text() != b.read_text():
                problems.append(f"{rel}: differs")
        for p in notes:
            print("note:", p)
        for p in problems:
            print(p)
        print(f"{len(old & new)} files compared, {len(problems)} difference(s)")
        return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "compare"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "save":
        snapshot(Path(sys.argv[2]))
    else:
        raise SystemExit(compare(Path(sys.argv[2]), Path(os.environ["SNAPSHOT_KEEP"]) if os.environ.get(
            "SNAPSHOT_KEEP") else None))
