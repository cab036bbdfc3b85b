"""Atomic writers for run records: a crash mid-write never leaves a truncated results file behind."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _json_default(obj: Any):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False, allow_nan=False) + "\n"
    return _atomic(Path(path), lambda p: p.write_text(text))


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(Path(path), lambda p: p.write_text(text))


def write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    return _atomic(Path(path), lambda p: frame.to_parquet(p, index=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def start_run(cfg) -> tuple[float, Path]:
    """The common start of every task: a start time, the seed (``cfg.seed``, default 0) and ``paths.output_dir``
    (created)."""
    import time

    import lightning as L

    t0 = time.perf_counter()
    L.seed_everything(int(cfg.get("seed", 0)), workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return t0, out_dir
