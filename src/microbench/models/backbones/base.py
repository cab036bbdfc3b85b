"""One small interface over every CLIP-style backbone (open_clip, Hugging Face transformers, timm image towers).

Everything downstream (zero-shot scoring, probes, fine-tuning, weight interpolation) talks to this interface only:
``encode_image`` / ``encode_text`` return *unnormalised* embeddings, ``tokenize`` turns strings into whatever
``encode_text`` takes, ``preprocess`` / ``train_transform`` are the model's own PIL → tensor transforms, and
``state_dict`` gives the weights for merging.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from microbench.errors import UserError


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict (names, shapes, dtypes, values): equal fingerprints mean identical weights."""
    h = hashlib.blake2b(digest_size=8)
    for key, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class BackboneError(UserError):
    """A backbone cannot be built or used as asked; the message says why and what to do instead."""


class Backbone(nn.Module):
    """Base class of the adapters. Subclasses set ``model``, ``name``, ``kind``, ``embed_dim`` and transforms."""

    family = "contrastive"  # what the task registry dispatches on (microbench.tasks.registry)

    kind: str = "base"
    has_text: bool = True

    def __init__(self, name: str, preprocess: Callable, train_transform: Callable | None = None,
                 source: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name = name
        self.preprocess = preprocess
        self.train_transform = train_transform or preprocess
        self.source = dict(source or {})
        self._fingerprint: str | None = None
        self._fingerprint_signature: tuple | None = None

    # --- the interface ------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: Any) -> torch.Tensor:
        raise self.no_text_error()

    def tokenize(self, texts: Sequence[str]) -> Any:
        raise self.no_text_error()

    @property
    def logit_scale(self) -> torch.Tensor:
        """Multiplier of cosine similarities (exp of the learnt log-scale where the model has one)."""
        return torch.tensor(1.0)

    def image_tower(self) -> nn.Module:
        """The image encoder module (for freezing blocks and for image-only merges)."""
        raise NotImplementedError

    def logit_scale_parameter(self) -> torch.Tensor | None:
        """The trainable log logit scale, if the model has one (contrastive fine-tuning trains it)."""
        return None

    def image_tower_keys(self) -> list[str]:
        """The keys of :meth:`state_dict` that belong to the image tower (image-only merges, ``study.towers=image``):
        by default those whose tensor is a parameter or buffer of :meth:`image_tower`, matched by identity of the
        tensors (never of modules, which an adapter may build anew on each call). Adapters with a fixed layout
        override it with their prefixes."""
        try:
            tower = self.image_tower()
        except NotImplementedError:
            raise BackboneError(
                f"{self.kind} backbone {self.name!r} does not say which of its weights are the image tower: "
                "implement image_tower() (or image_tower_keys()) in the adapter, or use study.towers=both") from None
        ids = {id(t) for t in (*tower.parameters(), *tower.buffers())}
        return [k for k, t in self.state_dict(keep_vars=True).items() if id(t) in ids]

    def residual_block_depths(self) -> dict[str, tuple[int, int]]:
        """``key -> (ℓ, L)`` for the state-dict keys inside residual block ℓ of a tower of L blocks (LiNeS); each
        tower (image, text) its own stack, read from the key names
        (:func:`microbench.studies.merging.residual_block_depths`)."""
        from microbench.studies.merging import residual_block_depths

        try:
            image = self.image_tower_keys()
        except BackboneError:
            image = []
        return residual_block_depths(self.state_dict().keys(), image)

    def image_feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """Spatial features of the image tower's last block, ``[B, C, h, w]`` (patch tokens for ViTs, the last
        stage for CNNs), for detection and segmentation heads."""
        raise BackboneError(f"{self.kind} backbone {self.name!r} does not expose spatial features for localization")

    def pixel_config(self) -> dict[str, Any]:
        """``{"mean", "std", "size"}``: the normalisation and (square) input size the image tower expects."""
        tfs = getattr(self.preprocess, "transforms", [])
        norm = next((t for t in tfs if hasattr(t, "mean") and hasattr(t, "std")), None)
        crop = next((t for t in tfs if type(t).__name__ == "CenterCrop"), None)
        if norm is None or crop is None:
            raise BackboneError(f"cannot read the input normalisation/size of {self.name!r} from its transform")
        size = crop.size if isinstance(crop.size, int) else crop.size[0]
        return {"mean": [float(v) for v in norm.mean], "std": [float(v) for v in norm.std], "size": int(size)}

    def freeze_text_tower(self) -> int:
        """Freeze every parameter outside the image tower (except the logit scale); returns how many tensors."""
        keep = {id(p) for p in self.image_tower().parameters()}
        scale = self.logit_scale_parameter()
        if scale is not None:
            keep.add(id(scale))
        frozen = 0
        for p in self.parameters():
            if id(p) not in keep and p.requires_grad:
                p.requires_grad_(False)
                frozen += 1
        return frozen

    # --- shared behaviour ------------------------------------------------------------------------------------------
    def no_text_error(self) -> BackboneError:
        return BackboneError(
            f"{self.kind} backbone {self.name!r} is an image tower without a text encoder: zero-shot scoring needs a "
            "CLIP-style model (model=tiny|clip|openclip|biomedclip|plip|quiltnet|align); use it for linear probes or "
            "fine-tuning instead"
        )

    def _weights_signature(self) -> tuple:
        """Cheap identity of the current weights: every in-place update (optimizer step, load_state_dict) bumps a
        tensor's version counter, so a cached fingerprint is reused only while no weight has changed."""
        return tuple((k, t.data_ptr(), None if t.is_inference() else t._version)  # an inference tensor (e.g. a
                     for k, t in self.state_dict(keep_vars=True).items())  # weight peft re-binds) cannot change

    def fingerprint(self, refresh: bool = False) -> str:
        """Hash of the weights (names, shapes, values): equal fingerprints mean identical models."""
        signature = self._weights_signature()
        if self._fingerprint is None or refresh or signature != self._fingerprint_signature:
            self._fingerprint = state_fingerprint(self.state_dict())
            self._fingerprint_signature = signature
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """What a results file records about the model."""
        n_params = sum(p.numel() for p in self.parameters())
        return {"name": self.name, "kind": self.kind, "embed_dim": self.embed_dim, "has_text": self.has_text,
                "parameters": int(n_params), "fingerprint": self.fingerprint(), **self.source}
