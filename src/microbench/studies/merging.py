"""Model merging as pure functions over state dicts: WiSE-FT interpolation, uniform soups, task arithmetic, TIES
(global or per-tensor trim), DARE, Model Stock and LiNeS, each pinned to its paper in ``tests/test_merging.py``.

Every function checks that its inputs have the same keys and shapes (or raises :class:`MergeError` naming the first
mismatch), interpolates floating-point tensors only, and copies non-float buffers (step counters, token ids, masks)
from the first / base model unchanged. ``keys`` restricts merging to a subset (e.g. the image tower); the rest is
taken from the base (WiSE-FT, task arithmetic, TIES) or from the first model (soups).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes in: the tensor's own when it is at least float32 (float64 stays float64), else
    float32 (bf16/fp16 tensors are merged in float32 and rounded once at the end)."""
    return torch.promote_types(dtype, torch.float32)


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(compute_dtype(t.dtype))


def wise_ft(base: StateDict, finetuned: StateDict, alpha: float, keys=None) -> dict[str, torch.Tensor]:
    """θ(α) = (1 − α)·θ_base + α·θ_ft (Wortsman et al., 2022) on the selected floating-point tensors, computed in
    ``compute_dtype`` and cast back. α = 0 is the base exactly; α = 1 gives the fine-tuned *floating-point* tensors
    exactly, while non-float buffers (step counters, token ids, masks) and unselected keys always stay the base's,
    so α = 1 equals the fine-tuned model only where those agree (they do for a fine-tune of the same base)."""
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
            out[k] = torch.lerp(_up(b), f.to(compute_dtype(b.dtype)), float(alpha)).to(b.dtype)
    return out


def uniform_soup(states: Sequence[StateDict], keys=None) -> dict[str, torch.Tensor]:
    """Mean of N checkpoints (Wortsman et al., 2022; a soup of identical checkpoints is that checkpoint)."""
    if not states:
        raise MergeError("a soup needs at least one checkpoint")
    check_compatible(*states)
    sel = _selector(keys)
    out = {}
    for k, first in states[0].items():
        if first.is_floating_point() and sel(k):
            # first + mean of differences: exact (not just close) when every checkpoint is the same
            dt = compute_dtype(first.dtype)
            diffs = torch.stack([s[k].to(dt) - first.to(dt) for s in states]).mean(0)
            out[k] = (first.to(dt) + diffs).to(first.dtype)
        else:
            out[k] = first.clone()
    return out


def task_vector(base: StateDict, finetuned: StateDict, keys=None) -> dict[str, torch.Tensor]:
    """τ = θ_ft − θ_base on the selected floating-point tensors, in ``compute_dtype``."""
    check_compatible(base, finetuned, names=["base", "fine-tuned"])
    sel = _selector(keys)
    return {k: (finetuned[k].to(compute_dtype(b.dtype)) - _up(b)) for k, b in base.items()
            if b.is_floating_point() and sel(k)}


def add_vector(base: StateDict, vector: Mapping[str, torch.Tensor], scale: float | Mapping[str, float] = 1.0
               ) -> dict[str, torch.Tensor]:
    """θ_base + scale·τ on the keys of ``vector`` (``scale`` one number or one per key), the rest the base's."""
    out = {k: v.clone() for k, v in base.items()}
    for k, v in vector.items():
        s = scale[k] if isinstance(scale, Mapping) else scale
        out[k] = (_up(base[k]) + s * v).to(base[k].dtype)
    return out


def task_arithmetic(base: StateDict, finetuned: Sequence[StateDict], scale: float = 1.0,
                    keys=None) -> dict[str, torch.Tensor]:
    """θ = θ_base + λ·Σ_i (θ_i − θ_base) (Ilharco et al., 2023)."""
    vectors = [task_vector(base, ft, keys) for ft in finetuned]
    total = {k: sum(v[k] for v in vectors) for k in (vectors[0] if vectors else {})}
    return add_vector(base, total, scale)


def top_k_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of exactly ``keep`` entries of the 1-D ``values`` with the largest magnitudes. Tie rule: among
    entries of equal magnitude at the threshold, those at earlier positions are kept (the order of a stable
    descending sort)."""
    n = values.numel()
    keep = int(min(max(keep, 0), n))
    if keep == 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    mag = values.abs()
    threshold = torch.kthvalue(mag, n - keep + 1).values  # the keep-th largest magnitude
    mask = mag > threshold
    at = (mag == threshold).nonzero().flatten()[: keep - int(mask.sum())]
    mask[at] = True
    return mask


def trim(vector: Mapping[str, torch.Tensor], density: float, per_tensor: bool = False) -> dict[str, torch.Tensor]:
    """TIES' trim step (Yadav et al., 2023): keep the ``density`` share of the task vector's entries of largest
    magnitude, zero the rest. By default over the *whole* task vector (the paper, FusionBench): exactly
    ⌈density·n⌉ of its n entries are kept, ties at the threshold going to earlier keys (state-dict order), then
    earlier positions in a tensor. ``per_tensor=True`` trims each tensor on its own (⌈density·n_k⌉ entries of each).
    FusionBench's ``topk_values_mask`` keeps the entries ≥ the threshold: the same ⌈density·n⌉ entries when
    density·n is not an integer and there are no ties, one more when it is an integer, every tie at the threshold."""
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1] (the share of the task vector kept), got {density}")
    keys = list(vector)
    if per_tensor:
        return {k: v * top_k_mask(v.flatten(), math.ceil(density * v.numel())).view_as(v) for k, v in vector.items()}
    if not keys:
        return {}
    dt = functools.reduce(torch.promote_types, (vector[k].dtype for k in keys), torch.float32)
    flat = torch.cat([vector[k].flatten().to(dt) for k in keys])
    mask = top_k_mask(flat, math.ceil(density * flat.numel()))
    out, at = {}, 0
    for k in keys:
        n = vector[k].numel()
        out[k] = vector[k] * mask[at:at + n].view_as(vector[k])
        at += n
    return out


def ties_merge(base: StateDict, finetuned: Sequence[StateDict], density: float = 0.2, scale: float = 1.0,
               keys=None, per_tensor: bool = False) -> dict[str, torch.Tensor]:
    """TIES merging (Yadav et al., 2023): trim each task vector to its top-``density`` magnitudes (:func:`trim`:
    over the whole task vector, or each tensor with ``per_tensor=True``), elect a sign per parameter by total mass
    (an elected sign of exactly 0, where the kept entries cancel or none is kept, gives 0), average the kept
    entries that agree with it, add ``scale`` times that to the base."""
    vectors = [trim(task_vector(base, ft, keys), density, per_tensor) for ft in finetuned]
    merged = {}
    for k in vectors[0] if vectors else []:
        stacked = torch.stack([v[k] for v in vectors])  # [T, ...]; empty tensors stay empty
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        merged[k] = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return add_vector(base, merged, scale)


def dare(vector: Mapping[str, torch.Tensor], p: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each entry of the task vector with
    probability ``p`` and rescale the survivors by 1 / (1 − p), so the expected vector is unchanged. Seeded: the
    masks are drawn from one ``torch.Generator(seed)`` over the keys in order, on the CPU (the same masks on any
    device)."""
    if not 0 <= p < 1:
        raise MergeError(f"dare: the drop rate p must be in [0, 1), got {p}")
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for k, v in vector.items():
        keep = torch.rand(v.shape, generator=gen) >= p  # P(keep) = 1 − p
        out[k] = v * keep.to(v.device) / (1 - p)
    return out


def model_stock_ratios(base: StateDict, finetuned: Sequence[StateDict], keys=None) -> dict[str, float]:
    """Model Stock's interpolation ratio per tensor (Jang et al., 2024, eq. 4): t = k·cos θ / ((k − 1)·cos θ + 1) for
    k fine-tunes, θ the angle between their task vectors (the mean over pairs for k > 2). A tensor the fine-tunes
    left unchanged (a zero task vector) gets t = 0."""
    if len(finetuned) < 2:
        raise MergeError(f"model_stock needs at least two fine-tunes of the same base (e.g. two seeds), got "
                         f"{len(finetuned)}")
    vectors = [task_vector(base, ft, keys) for ft in finetuned]
    k = len(vectors)
    ratios = {}
    for key in vectors[0]:
        flat = [v[key].flatten().double() for v in vectors]
        cos = []
        for i in range(k):
            for j in range(i + 1, k):
                ni, nj = flat[i].norm(), flat[j].norm()
                cos.append(float(flat[i] @ flat[j] / (ni * nj)) if ni > 0 and nj > 0 else 0.0)
        c = float(np.mean(cos))
        ratios[key] = k * c / ((k - 1) * c + 1) if (k - 1) * c + 1 > 1e-12 else 0.0
    return ratios


def model_stock(base: StateDict, finetuned: Sequence[StateDict], keys=None) -> dict[str, torch.Tensor]:
    """Model Stock (Jang et al., 2024): θ_H = t·θ̄_ft + (1 − t)·θ_base per tensor, θ̄_ft the mean of the fine-tunes
    and t from :func:`model_stock_ratios`."""
    ratios = model_stock_ratios(base, finetuned, keys)
    mean = uniform_soup(list(finetuned), keys=lambda k: k in ratios)
    return add_vector(base, {k: _up(mean[k]) - _up(base[k]) for k in ratios}, ratios)


def lines_scales(keys: Iterable[str], depths: Mapping[str, tuple[int, int]], alpha: float) -> dict[str, float]:
    """LiNeS' per-key scale (Wang et al., ICLR 2025): λ(ℓ) = α + (1 − α)·ℓ/(L − 1) for a key of residual block ℓ of
    a stack of L blocks (``depths[key] = (ℓ, L)``; L = 1 gives 1), α for keys outside the blocks."""
    out = {}
    for k in keys:
        if k in depths:
            ell, n = depths[k]
            out[k] = alpha + (1 - alpha) * (ell / (n - 1) if n > 1 else 1.0)
        else:
            out[k] = alpha
    return out


def lines(base: StateDict, finetuned: StateDict, alpha: float, depths: Mapping[str, tuple[int, int]],
          keys=None) -> dict[str, torch.Tensor]:
    """LiNeS: θ = θ_base + λ(ℓ)·τ with the depth-linear scales of :func:`lines_scales` (shallow blocks near the
    base, the last block fully fine-tuned)."""
    vector = task_vector(base, finetuned, keys)
    return add_vector(base, vector, lines_scales(vector, depths, alpha))


_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:resblocks|layers|blocks|layer\d*)\.\d+\.)")


def residual_block_depths(keys: Iterable[str], image_keys: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
    """``key -> (ℓ, L)`` for the keys inside a residual block: a key belongs to the block whose prefix ends in
    ``resblocks.<i>.`` (open_clip), ``layers.<i>.`` (transformers), ``blocks.<i>.`` (timm ViT, ConvNeXt stages) or
    ``layer<j>.<i>.`` (ResNets). The image-tower keys and the others (the text tower) are two stacks, each with its
    blocks numbered in state-dict order, so L is each tower's own depth."""
    image = set(image_keys)
    stacks: dict[bool, list[str]] = {True: [], False: []}
    block_of = {}
    for k in keys:
        m = _BLOCK.match(k)
        if m is None:
            continue
        prefix, tower = m.group(1), k in image
        if prefix not in stacks[tower]:
            stacks[tower].append(prefix)
        block_of[k] = (tower, prefix)
    index = {(t, p): i for t, ps in stacks.items() for i, p in enumerate(ps)}
    return {k: (index[tp], len(stacks[tp[0]])) for k, tp in block_of.items()}
