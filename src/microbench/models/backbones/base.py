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
import torch.nn.functional as F
from torch import nn

from microbench.errors import UserError
from microbench.models.inference import InferenceSettings, prepare_image_tower


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
        self._fingerprints: dict[str, tuple[tuple, str]] = {}  # what -> (weights signature, fingerprint)
        self.inference = InferenceSettings()
        self._prepared: InferenceSettings | None = None
        self._inference_dtype: torch.dtype | None = None  # what embed_images last ran in (for the record)

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

    def _weights_signature(self, keys: set[str] | None = None) -> tuple:
        """Cheap identity of the current weights: every in-place update (optimizer step, load_state_dict) bumps a
        tensor's version counter, so a cached fingerprint is reused only while no weight has changed."""
        return tuple((k, t.data_ptr(), None if t.is_inference() else t._version)  # an inference tensor (e.g. a
                     for k, t in self.state_dict(keep_vars=True).items()  # weight peft re-binds) cannot change
                     if keys is None or k in keys)

    def _cached_fingerprint(self, what: str, keys: set[str] | None, refresh: bool) -> str:
        signature = self._weights_signature(keys)
        cached = self._fingerprints.get(what)
        if cached is None or refresh or cached[0] != signature:
            state = self.state_dict()
            cached = (signature, state_fingerprint(state if keys is None else {k: state[k] for k in keys}))
            self._fingerprints[what] = cached
        return cached[1]

    def fingerprint(self, refresh: bool = False) -> str:
        """Hash of the weights (names, shapes, values): equal fingerprints mean identical models."""
        return self._cached_fingerprint("all", None, refresh)

    def text_fingerprint(self) -> str:
        """Hash of the weights outside the image tower (what a text embedding depends on); the whole model's when
        the adapter cannot say which weights are the image tower."""
        try:
            image = set(self.image_tower_keys())
        except BackboneError:
            return self.fingerprint()
        return self._cached_fingerprint("text", set(self.state_dict(keep_vars=True)) - image, False)

    # --- evaluation encoders (microbench.models.inference) -------------------------------------------------------
    def set_inference(self, settings: InferenceSettings) -> None:
        """How :meth:`embed_images` / :meth:`embed_texts` run (precision, channels-last, compile)."""
        self.inference = settings

    def _prepare(self) -> None:
        if self._prepared != self.inference and (self.inference.channels_last or self.inference.compile):
            try:
                tower = self.image_tower()
            except NotImplementedError:
                raise BackboneError(f"{self.kind} backbone {self.name!r} does not expose its image tower: "
                                    "inference.channels_last / inference.compile need image_tower()") from None
            prepare_image_tower(tower, self.inference)
        self._prepared = self.inference

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings, encoded as :attr:`inference` says (evaluation, no grad)."""
        self._prepare()
        if self.inference.channels_last and pixels.dim() == 4:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        self._inference_dtype = self.inference.dtype(pixels.device)
        with torch.no_grad(), self.inference.autocast(pixels.device):
            emb = self.encode_image(pixels)
        return F.normalize(emb.float(), dim=-1)

    def embed_texts(self, tokens: Any, device: torch.device | str) -> torch.Tensor:
        """L2-normalised float32 text embeddings, encoded as :attr:`inference` says (evaluation, no grad)."""
        with torch.no_grad(), self.inference.autocast(device):
            emb = self.encode_text(tokens)
        return F.normalize(emb.float(), dim=-1)

    def text_cache_key(self, device: torch.device | str) -> tuple:
        """What a text embedding of this model depends on, besides the text
        (:data:`microbench.models.inference.TEXT_CACHE`)."""
        return (self.kind, self.name, self.text_fingerprint(), str(self.inference.dtype(device)))

    def describe(self) -> dict[str, Any]:
        """What a results file records about the model."""
        n_params = sum(p.numel() for p in self.parameters())
        inference = {**self.inference.describe(), "dtype": None if self._inference_dtype is None
                     else str(self._inference_dtype).removeprefix("torch.")}
        return {"name": self.name, "kind": self.kind, "embed_dim": self.embed_dim, "has_text": self.has_text,
                "parameters": int(n_params), "fingerprint": self.fingerprint(), **self.source,
                "inference": inference}
