"""How the encoders run in evaluation: precision, memory format, compilation, and the text-embedding cache.

``inference.precision`` (``fp32`` | ``bf16`` | ``auto``), ``inference.channels_last`` and ``inference.compile`` set
how every evaluation encodes (zero-shot scoring, weight-space sweeps, probes' features, feature probes) through
:meth:`~microbench.models.backbones.base.Backbone.embed_images` / ``embed_texts``. ``fp32`` (the default) is what the
official numbers are computed in; ``bf16`` autocasts the encoders (on a GPU with bf16 support, or the CPU), ``auto``
picks ``bf16`` on a CUDA device that supports it and ``fp32`` elsewhere. What was used is recorded in every run
record (``inference``). ``tests/test_inference.py`` pins bf16 against fp32 within :data:`BF16_TOLERANCE`.

Text embeddings are kept in :data:`TEXT_CACHE`, keyed by (model, *text-tower* weights fingerprint, precision) and by
text: a model whose text tower did not move (an image-only fine-tune or merge, every α of a ``towers=image`` sweep,
the base scored again by a study) never encodes the same prompt twice in a process.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from microbench import distributed
from microbench.errors import UserError
from microbench.options import value_problems

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "auto")
#: bf16 vs fp32 on the same model and images (``tests/test_inference.py``): every embedding's cosine to its fp32
#: counterpart is at least ``min_cosine``; predictions differ only where fp32's top two options are closer than
#: ``margin`` (cosine units), i.e. where bf16's rounding (~2⁻⁸ relative) can reorder them.
BF16_TOLERANCE = {"min_cosine": 0.99, "margin": 0.02}


@dataclass(frozen=True)
class InferenceSettings:
    """``precision``: fp32 | bf16 | auto; ``channels_last``: the image tower and its input in NHWC memory format
    (faster convolutions on GPUs; a ViT's patch embedding is one); ``compile``: ``torch.compile`` the image tower."""

    precision: Literal[PRECISIONS] = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:  # the same annotations the pre-run check reads (the `inference` group's schema)
        problems = value_problems(InferenceSettings, {"precision": self.precision}, "inference")
        if problems:
            raise UserError("; ".join(problems))

    @classmethod
    def of(cls, cfg) -> InferenceSettings:
        """From a mapping (a config node) or None (the defaults)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, InferenceSettings):
            return cfg
        return cls(**{k: cfg[k] for k in ("precision", "channels_last", "compile") if k in cfg})

    def dtype(self, device: torch.device | str) -> torch.dtype:
        """The autocast dtype on ``device`` (float32: no autocast)."""
        kind = torch.device(device).type
        if self.precision == "fp32":
            return torch.float32
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            if self.precision == "bf16":
                raise UserError("inference.precision=bf16: this GPU has no bf16 support; use inference.precision=fp32 "
                                "(or auto, which falls back to fp32)")
            return torch.float32
        if self.precision == "auto" and kind != "cuda":
            return torch.float32
        return torch.bfloat16

    def autocast(self, device: torch.device | str):
        dtype = self.dtype(device)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

    def describe(self, device: torch.device | str | None = None) -> dict:
        out = asdict(self)
        if device is not None:
            out["dtype"] = str(self.dtype(device)).removeprefix("torch.")
            out["device"] = str(device)
        return out


def prepare_image_tower(tower: torch.nn.Module, settings: InferenceSettings) -> None:
    """Apply ``channels_last`` and ``compile`` to an image tower in place (weights and state-dict keys unchanged)."""
    if settings.channels_last:
        tower.to(memory_format=torch.channels_last)
    if settings.compile:
        tower.compile()  # nn.Module.compile: in place, its state dict keeps its keys


class TextEmbeddingCache:
    """``(model key, text) -> embedding`` for the last :attr:`max_models` text towers seen (least recently used
    dropped). The model key is (kind, name, text-tower weights fingerprint, autocast dtype)."""

    def __init__(self, max_models: int = 8) -> None:
        self.max_models = max_models
        self._models: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._models.clear()
        self.hits = self.misses = 0

    def lookup(self, key: tuple, texts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Embeddings of ``texts`` ([len(texts), D]); ``encode(missing)`` is called once for the texts not cached
        (and not at all when every text is). Under DDP every rank asks for the same texts, and the ranks decide
        together: when any rank misses one, every rank encodes them all (``encode`` is sharded and gathered, so a
        rank that skipped it would leave the others waiting)."""
        memo = self._models.setdefault(key, {})
        self._models.move_to_end(key)
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        missing = list(dict.fromkeys(t for t in texts if t not in memo))
        if distributed.is_distributed() and any(distributed.gather_objects(len(missing))):
            missing = list(dict.fromkeys(texts))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            for t, e in zip(missing, encode(missing), strict=True):
                memo[t] = e
        if not texts:
            return torch.zeros(0, 0)
        return torch.stack([memo[t] for t in texts])


TEXT_CACHE = TextEmbeddingCache()
