"""Model merging as pure functions over state dicts (WiSE-FT interpolation, uniform soups, task arithmetic, TIES).

Every function checks that its inputs have the same keys and shapes (or raises :class:`MergeError` naming the first
mismatch), interpolates floating-point tensors only, and copies non-float buffers (step counters, token ids, masks)
from the first / base model unchanged. ``keys`` restricts merging to a subset (e.g. the image tower); the rest is
taken from the base (WiSE-FT, task arithmetic, TIES) or from the first model (soups).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from microbench.errors import UserError

StateDict = Mapping[str, torch.Tensor]


class MergeError(UserError):
    """Checkpoints that cannot be merged; the message names the first mismatch."""


def check_compatible(*states: StateDict, names: Sequence[str] | None = None) -> None:
    names = list(names or [f"model {i}" for i in range(len(states))])
    ref = states[0]
    for name, sd in zip(names[1:], states[1:], strict=True):
        missing = sorted(set(ref) - set(sd))
        extra = sorted(set(sd) - set(ref))
        if missing or extra:
            first = missing[0] if missing else extra[0]
            where = f"missing from {name}" if missing else f"only in {name}"
            raise MergeError(f"cannot merge {names[0]} and {name}: key {first!r} is {where} "
                             f"({len(missing)} missing, {len(extra)} extra): they are different architectures")
        for k in ref:
            if ref[k].shape != sd[k].shape:
                raise MergeError(f"cannot merge {names[0]} and {name}: {k!r} has shape {tuple(ref[k].shape)} vs "
                                 f"{tuple(sd[k].shape)}")


def _selector(keys: Iterable[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if keys is None:
        return lambda k: True
    if callable(keys):
        return keys
    wanted = set(keys)
    return lambda k: k in wanted


def tower_selector(tower: str, image_prefixes: Sequence[str]) -> Callable[[str], bool] | None:
    """``both`` → every key; ``image`` → keys under one of the image-tower prefixes."""
    if tower == "both":
        return None
    if tower == "image":
        return lambda k: any(k.startswith(p) for p in image_prefixes)
    raise MergeError(f"towers must be 'both' or 'image', got {tower!r}")


def wise_ft(base: StateDict, finetuned: StateDict, alpha: float, keys=None) -> dict[str, torch.Tensor]:
    """θ(α) = (1 − α)·θ_base + α·θ_ft on floating-point tensors (α = 0: base, α = 1: fine-tuned, exactly)."""
    check_compatible(base, finetuned, names=["base", "fine-tuned"])
    sel = _selector(keys)
    out = {}
    for k, b in base.items():
        f = finetuned[k]
        if not (b.is_floating_point() and sel(k)) or alpha == 0:
            out[k] = b.clone()
        elif alpha == 1:
            out[k] = f.clone()
        else:
            out[k] = torch.lerp(b.float(), f.float(), float(alpha)).to(b.dtype)
    return out


def uniform_soup(states: Sequence[StateDict], keys=None) -> dict[str, torch.Tensor]:
    """Mean of N checkpoints (a soup of identical checkpoints is that checkpoint)."""
    if not states:
        raise MergeError("a soup needs at least one checkpoint")
    check_compatible(*states)
    sel = _selector(keys)
    out = {}
    for k, first in states[0].items():
        if first.is_floating_point() and sel(k):
            # first + mean of differences: exact (not just close) when every checkpoint is the same
            diffs = torch.stack([s[k].float() - first.float() for s in states]).mean(0)
            out[k] = (first.float() + diffs).to(first.dtype)
        else:
            out[k] = first.clone()
    return out


def task_vector(base: StateDict, finetuned: StateDict, keys=None) -> dict[str, torch.Tensor]:
    check_compatible(base, finetuned, names=["base", "fine-tuned"])
    sel = _selector(keys)
    return {k: (finetuned[k].float() - b.float()) for k, b in base.items() if b.is_floating_point() and sel(k)}


def task_arithmetic(base: StateDict, finetuned: Sequence[StateDict], scale: float = 1.0,
                    keys=None) -> dict[str, torch.Tensor]:
    """θ = θ_base + λ·Σ_i (θ_i − θ_base) (Ilharco et al., 2023)."""
    vectors = [task_vector(base, ft, keys) for ft in finetuned]
    out = {k: v.clone() for k, v in base.items()}
    for k in vectors[0] if vectors else []:
        out[k] = (base[k].float() + scale * sum(v[k] for v in vectors)).to(base[k].dtype)
    return out


def ties_merge(base: StateDict, finetuned: Sequence[StateDict], density: float = 0.2, scale: float = 1.0,
               keys=None) -> dict[str, torch.Tensor]:
    """TIES merging (Yadav et al., 2023): trim each task vector to its top-``density`` magnitudes, elect a sign per
    parameter by total mass, average only the entries that agree with it, add ``scale`` times that to the base."""
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    vectors = [task_vector(base, ft, keys) for ft in finetuned]
    out = {k: v.clone() for k, v in base.items()}
    for k in vectors[0] if vectors else []:
        stacked = torch.stack([v[k].flatten() for v in vectors])  # [T, P]
        keep = max(1, int(round(density * stacked.shape[1])))
        trimmed = torch.zeros_like(stacked)
        for t in range(stacked.shape[0]):
            idx = stacked[t].abs().topk(keep).indices
            trimmed[t, idx] = stacked[t, idx]
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = (base[k].float() + scale * merged.view_as(base[k])).to(base[k].dtype)
    return out
