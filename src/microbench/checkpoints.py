"""Reading the checkpoints a user points a run at (``finetuned=``, ``checkpoint=``, ``ckpt_path=``), with one line
for each way they go wrong: missing, a folder, empty, truncated or not a PyTorch file, or a checkpoint of another
kind (a localization head where a fine-tune is expected, another model)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from microbench.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why and what to pass instead."""


def read_checkpoint(path: str | Path, key: str, hint: str) -> Any:
    """``torch.load`` of ``path`` (weights only, on CPU), or a :class:`CheckpointError` naming ``key`` (the config
    key the path came from) and ``hint`` (what to pass)."""
    import torch

    p = Path(str(path)).expanduser()
    if not p.exists():
        raise CheckpointError(f"{key}={path} does not exist: {hint}")
    if p.is_dir():
        raise CheckpointError(f"{key}={path} is a folder, not a checkpoint file: {hint}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{key}={path} is empty (0 bytes: an interrupted save?): {hint}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError,
            AttributeError, KeyError, IndexError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{key}={path} is not a readable PyTorch checkpoint (truncated, or another kind of "
                              f"file: {type(err).__name__}: {reason}): {hint}") from err


def checkpoint_kind(blob: Any) -> str | None:
    """``finetune`` / ``localization`` for a Lightning checkpoint written by ``src/train.py``, else None."""
    if not isinstance(blob, dict) or "state_dict" not in blob:
        return None
    hp = blob.get("hyper_parameters") or {}
    if "class_names" in hp:
        return "localization"
    if "microbench" in blob or any(str(k).startswith("backbone.") for k in blob["state_dict"]):
        return "finetune"
    return None


def check_resume_checkpoint(path: str | Path, kind: str, model_name: str | None = None) -> dict:
    """A checkpoint to resume a ``kind`` fit from (``ckpt_path=``): readable, a Lightning checkpoint of that kind and,
    when it records one, of the same model."""
    hint = (f"pass ckpt_path=<last.ckpt of an earlier {kind} run of src/train.py>, or leave it unset to start "
            "afresh")
    blob = read_checkpoint(path, "ckpt_path", hint)
    got = checkpoint_kind(blob)
    if got is None or "loops" not in blob and "epoch" not in blob:
        raise CheckpointError(f"ckpt_path={path} is not a Lightning training checkpoint of src/train.py (a plain "
                              f"state dict or another library's file cannot be resumed): {hint}")
    if got != kind:
        raise CheckpointError(f"ckpt_path={path} is a {got} checkpoint, but this run is a {kind} fit: {hint}")
    recorded = ((blob.get("microbench") or {}).get("backbone") or {}).get("name") or (
        ((blob.get("hyper_parameters") or {}).get("record") or {}).get("backbone") or {}).get("name")
    if model_name and recorded and recorded != model_name:
        raise CheckpointError(f"ckpt_path={path} was trained with model {recorded!r}, but this run builds "
                              f"{model_name!r}: pass the same model=... as that run")
    return blob
