"""Hugging Face transformers CLIP-family models (CLIPModel, AlignModel, SiglipModel, ...), an optional extra."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from microbench.models.backbones.base import Backbone, BackboneError


class _ProcessorTransform:
    """PIL image → pixel tensor [3, H, W] with the model's own image processor (picklable for workers)."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.image_processor).__name__})"


class HFClipBackbone(Backbone):
    """A transformers dual encoder loaded with ``AutoModel`` + ``AutoProcessor``.

    Args:
        name: a Hub id (``openai/clip-vit-base-patch32``, ``vinid/plip``, ``kakaobrain/align-base``) or a local folder
            written by ``save_pretrained``.
        revision: Hub revision to pin.
        padding: tokenizer padding; ALIGN was evaluated with ``"max_length"``, CLIP-likes with ``True``.
        dtype: torch dtype name for the weights (``float32``, ``bfloat16``).
    """

    kind = "hf"

    def __init__(self, name: str, revision: str | None = None, padding: str | bool = True,
                 dtype: str = "float32", cache_dir: str | None = None) -> None:
        try:
            from transformers import AutoModel, AutoProcessor
        except ImportError as err:  # pragma: no cover - depends on the extra
            raise BackboneError("Hugging Face models need transformers: pip install -e '.[hf]'") from err
        try:
            model = AutoModel.from_pretrained(name, revision=revision, cache_dir=cache_dir,
                                              dtype=getattr(torch, dtype))
            processor = AutoProcessor.from_pretrained(name, revision=revision, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackboneError(f"cannot load transformers model {name!r}@{revision or 'main'}: {reason}") from err
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise BackboneError(f"{name!r} ({type(model).__name__}) is not a dual image-text encoder")
        tf = _ProcessorTransform(processor.image_processor)
        super().__init__(name, tf, tf, source={"library": "transformers", "revision": revision,
                                               "architecture": type(model).__name__})
        self.model = model
        self.tokenizer = processor.tokenizer
        self.padding = padding
        self.max_length = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77)

    @property
    def embed_dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_text(self, tokens: dict) -> torch.Tensor:
        out = self.model.get_text_features(**tokens)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def tokenize(self, texts: Sequence[str]) -> dict:
        enc = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def logit_scale_parameter(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_scale", None)

    IMAGE_PARTS = ("vision_model", "visual_projection")  # CLIP, SigLIP, ALIGN (vision_model only), Chinese-CLIP...

    def image_tower(self) -> torch.nn.Module:
        parts = [m for m in (getattr(self.model, n, None) for n in self.IMAGE_PARTS) if m is not None]
        return torch.nn.ModuleList(parts)

    def image_tower_keys(self) -> list[str]:
        prefixes = tuple(f"model.{n}." for n in self.IMAGE_PARTS if getattr(self.model, n, None) is not None)
        return [k for k in self.state_dict() if k.startswith(prefixes)]

    @property
    def logit_scale(self) -> torch.Tensor:
        if hasattr(self.model, "logit_scale"):
            return self.model.logit_scale.detach().exp()
        if hasattr(self.model, "temperature"):  # ALIGN
            return 1.0 / self.model.temperature.detach()
        return torch.tensor(1.0)

    def image_feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = getattr(self.model, "vision_model", None)
        if vision is None:
            return super().image_feature_map(pixels)
        hidden = vision(pixel_values=pixels).last_hidden_state
        if hidden.ndim == 4:  # CNN towers (ALIGN's EfficientNet) are already [B, C, h, w]
            return hidden
        b, n, c = hidden.shape
        side = int((n - 1) ** 0.5)
        if side * side != n - 1:
            raise BackboneError(f"{self.name!r}: {n} vision tokens are not a class token plus a square patch grid")
        return hidden[:, 1:].transpose(1, 2).reshape(b, c, side, side)

    def pixel_config(self) -> dict:
        proc = self.preprocess.image_processor
        size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        return {"mean": list(map(float, proc.image_mean)), "std": list(map(float, proc.image_std)),
                "size": int(side or 224)}
