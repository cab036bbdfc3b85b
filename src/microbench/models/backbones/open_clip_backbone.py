"""open_clip models: built-in names with pretrained tags, ``hf-hub:`` ids, ``local-dir:`` folders, checkpoint files."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch

from microbench.models.backbones.base import Backbone, BackboneError
from microbench.results.io import write_json

log = logging.getLogger(__name__)

#: Model configs shipped with microbench (tiny random-init models for tests and the demo).
CONFIG_DIR = Path(__file__).with_name("configs")
_registered = False


def register_microbench_configs() -> None:
    """Make the shipped configs (e.g. ``microbench-tiny``) known to open_clip; idempotent."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


class OpenClipBackbone(Backbone):
    """An open_clip CLIP model with its own preprocessing and tokenizer.

    Args:
        name: an open_clip architecture (``ViT-B-32``), ``hf-hub:org/repo`` or ``local-dir:/path`` (a folder with
            ``open_clip_config.json`` and weights; ``pretrained`` is then ignored).
        pretrained: a pretrained tag (``laion2b_s34b_b79k``, ``openai``), a checkpoint file path, or None for random
            initialisation.
        seed: seeds the random initialisation so that ``pretrained=None`` models are reproducible.
        precision: open_clip precision (``fp32``, ``bf16``, ``fp16``, ``amp``...).
        cache_dir: where hub weights are cached.
        trim_text_padding: run the text tower only up to the longest text of each batch instead of the full
            context (77 tokens); exact for causal CLIP text towers (see :func:`_encode_text_trimmed`), 3-4x faster.
    """

    kind = "open_clip"

    def __init__(self, name: str, pretrained: str | None = None, seed: int = 0, precision: str = "fp32",
                 cache_dir: str | None = None, force_quick_gelu: bool = False,
                 trim_text_padding: bool = True) -> None:
        register_microbench_configs()
        if pretrained in ("", "none", "None"):
            pretrained = None
        schema = "local-dir" if name.startswith("local-dir:") else "hf-hub" if name.startswith("hf-hub:") else None
        if schema == "local-dir":
            folder = Path(name.removeprefix("local-dir:")).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise BackboneError(f"local-dir:{folder} needs an open_clip_config.json (with model_cfg) and weights "
                                    "(open_clip_model.safetensors or open_clip_pytorch_model.bin)")
        elif schema is None and name not in open_clip.list_models():
            raise BackboneError(
                f"unknown open_clip model {name!r}: use an open_clip architecture (open_clip.list_models(), e.g. "
                "ViT-B-32), hf-hub:<org/repo>, local-dir:<folder>, or a preset model=tiny|openclip|biomedclip|quiltnet"
            )
        if pretrained and schema is None and not Path(pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise BackboneError(f"{name} has no pretrained tag {pretrained!r}; known tags: {tags}, or give a "
                                    "checkpoint file path, or null for random init")
        torch.manual_seed(seed)
        try:
            model, train_tf, val_tf = open_clip.create_model_and_transforms(
                name, pretrained=pretrained if schema is None else None, precision=precision, cache_dir=cache_dir,
                force_quick_gelu=force_quick_gelu, load_weights=True,
            )
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir) if schema else open_clip.get_tokenizer(name)
        except Exception as err:  # noqa: BLE001 - network, missing weights, bad configs: one clear line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackboneError(f"cannot build open_clip model {name!r} (pretrained={pretrained!r}): {reason}") from err
        super().__init__(name, val_tf, train_tf, source={"library": "open_clip", "pretrained": pretrained,
                                                         "open_clip_version": open_clip.__version__})
        self.model = model
        self.tokenizer = tokenizer
        self.trim_text_padding = trim_text_padding

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        if proj is not None and hasattr(proj, "weight"):
            return int(proj.weight.shape[0])
        with torch.no_grad():
            return int(self.encode_text(self.tokenize(["x"])).shape[-1])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.trim_text_padding and _trimmable(self.model):
            return _encode_text_trimmed(self.model, tokens)
        return self.model.encode_text(tokens)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    def logit_scale_parameter(self) -> torch.Tensor:
        return self.model.logit_scale

    def image_tower(self) -> torch.nn.Module:
        return self.model.visual

    def image_tower_keys(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith("model.visual.")]

    def image_feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        if not hasattr(visual, "forward_intermediates"):
            return super().image_feature_map(pixels)
        out = visual.forward_intermediates(pixels, indices=1, intermediates_only=True, normalize_intermediates=True,
                                           output_fmt="NCHW")
        return out["image_intermediates"][-1]

    def pixel_config(self) -> dict:
        cfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        if not cfg.get("mean"):
            return super().pixel_config()
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        size = size if isinstance(size, int) else size[0]
        return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]], "size": int(size)}

    def save_local_dir(self, folder: str | Path) -> Path:
        """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` so ``local-dir:<folder>`` reloads it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = open_clip.get_model_config(self.name) if not self.name.startswith("local-dir:") else json.loads(
            (Path(self.name.removeprefix("local-dir:")) / "open_clip_config.json").read_text())["model_cfg"]
        pp = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        write_json(folder / "open_clip_config.json", {"model_cfg": cfg, "preprocess_cfg": pp})
        state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        return folder


def _trimmable(model) -> bool:
    """True for open_clip's standard CLIP text tower with a causal mask and EOT/argmax pooling, where tokens after
    the longest text of a batch cannot influence any pooled output."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos", "first")
    )


def _encode_text_trimmed(model, text: torch.Tensor) -> torch.Tensor:
    """``CLIP.encode_text`` on ``text[:, :L]``, L = last non-padding column of the batch.

    With a causal mask, position i attends only to positions <= i, so the hidden states of the first L positions —
    and the EOT token pooled from them — are the same as with the full context; the padding columns are never
    computed. Padding is token id 0 in open_clip's tokenizers.
    """
    nonpad = (text != 0).any(dim=0).nonzero()
    length = int(nonpad.max()) + 1 if len(nonpad) else 1
    text = text[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, text, model.text_pool_type,
                                               eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x
