"""timm image towers: image-only backbones for linear probes and fine-tuning (no zero-shot)."""

from __future__ import annotations

import timm
import torch

from microbench.models.backbones.base import Backbone, BackboneError


class TimmImageBackbone(Backbone):
    """Any ``timm.create_model`` name (``hf-hub:`` ids included) as a pooled-feature image encoder."""

    kind = "timm"
    has_text = False

    def __init__(self, name: str, pretrained: bool = False, seed: int = 0, checkpoint_path: str | None = None,
                 **model_kwargs) -> None:
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=0,
                                      checkpoint_path=checkpoint_path or "", **model_kwargs)
        except Exception as err:  # noqa: BLE001
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackboneError(f"cannot build timm model {name!r} (pretrained={pretrained}): {reason}") from err
        cfg = timm.data.resolve_data_config({}, model=model)
        super().__init__(name, timm.data.create_transform(**cfg, is_training=False),
                         timm.data.create_transform(**cfg, is_training=True),
                         source={"library": "timm", "pretrained": pretrained, "timm_version": timm.__version__})
        self.model = model
        self._data_cfg = cfg

    @property
    def embed_dim(self) -> int:
        return int(self.model.num_features)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def image_tower(self) -> torch.nn.Module:
        return self.model

    def image_tower_keys(self) -> list[str]:
        return list(self.state_dict())  # an image tower and nothing else

    def image_feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.model, "forward_intermediates"):
            return super().image_feature_map(pixels)
        return self.model.forward_intermediates(pixels, indices=1, intermediates_only=True, output_fmt="NCHW")[-1]

    def pixel_config(self) -> dict:
        cfg = self._data_cfg
        return {"mean": list(map(float, cfg["mean"])), "std": list(map(float, cfg["std"])),
                "size": int(cfg["input_size"][-1])}
