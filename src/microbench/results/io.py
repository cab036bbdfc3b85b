"""Results files on disk: atomic writers (a crash mid-write never leaves a truncated results file behind), the
output folder checks, and reading back only this run's record."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microbench.errors import UserError


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


def cache_key(parts: Any, length: int | None = 20) -> str:
    """The one cache key: SHA-256 of ``parts`` as canonical JSON (sorted keys, anything else as ``str``), its first
    ``length`` hex digits (all 64 with None). Every cache (features, predictions, pixels, bases, responses) keys
    by this, over everything that changes what it holds."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest


def write_atomic(path: str | Path, write) -> Path:
    """The one atomic writer: ``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path``
    (readable as the umask allows); a crash leaves the old file or none, never half of one."""
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
    return write_atomic(path, lambda p: p.write_text(text))


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda p: p.write_text(text))


def write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    return write_atomic(path, lambda p: frame.to_parquet(p, index=False))


def write_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)``, atomically (weights, cached features)."""
    import torch

    return write_atomic(path, lambda p: torch.save(obj, p))


def write_figure(path: str | Path, fig, dpi: int = 120) -> Path:
    """A matplotlib figure, atomically (the format from the file's suffix), then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        return write_atomic(path, lambda p: fig.savefig(p, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def this_runs_record(path: Path, run_id: str, trainer=None) -> dict:
    """The record that rank 0 of this run wrote to ``path`` (in a spawned worker, or another process under torchrun
    / SLURM), read back only when its ``run_id`` is this run's: a results file of an earlier run in the same folder
    is never presented as this run's. With a ``trainer``, the other ranks take rank 0's run id and wait for it to
    finish writing (no-ops without a process group)."""
    if trainer is not None:
        run_id = trainer.strategy.broadcast(run_id, src=0)
        trainer.strategy.barrier("microbench-record-written")
    record = read_json(path) if Path(path).is_file() else {}
    if record.get("run_id") != run_id:
        raise UserError(f"this run wrote no results to {Path(path).parent} (nothing was scored); see the log above")
    return record


def check_output_dir(path: str | Path) -> Path:
    """Create ``paths.output_dir`` and make sure this run can write there, before any work (one line if not)."""
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"paths.output_dir={out_dir} is a file, not a folder: pass a folder path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-check-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to paths.output_dir={out_dir} ({err.strerror or type(err).__name__}): pass a "
                        "folder you can write to") from err
    return out_dir


def clean_stale_temporaries(out_dir: Path) -> list[str]:
    """Remove ``.<name>.<random>.tmp`` files that a killed run left behind in ``out_dir`` (and its ``predictions/``
    folder): every results file is written to such a temporary and renamed, so a leftover is never a result."""
    import logging

    removed = []
    for folder in (out_dir, out_dir / "predictions"):
        if not folder.is_dir():
            continue
        for tmp in folder.glob(".*.tmp"):
            if tmp.is_file():
                try:
                    tmp.unlink()
                    removed.append(tmp.name)
                except OSError:
                    pass
    if removed:
        logging.getLogger(__name__).warning("removed %d temporary file(s) an interrupted run left in %s: %s",
                                            len(removed), out_dir, ", ".join(sorted(removed)[:5]))
    return removed


def plain(obj: Any) -> Any:
    """``obj`` as it reads back from its JSON file (numpy scalars and arrays, paths made plain; NaN kept)."""
    return json.loads(json.dumps(obj, default=_json_default))
