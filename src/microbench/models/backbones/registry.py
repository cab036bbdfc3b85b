"""Build any backbone from a small config: the one factory behind every ``model=`` preset."""

from __future__ import annotations

from typing import Any

from microbench.models.backbones.base import Backbone, BackboneError

#: Presets with the exact ids of the paper (ubench-format.md §9); each is also a Hydra file in configs/model/.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"kind": "open_clip", "name": "microbench-tiny", "pretrained": None},
    "clip": {"kind": "hf", "name": "openai/clip-vit-base-patch32"},
    "openclip": {"kind": "open_clip", "name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
    "openclip_openai": {"kind": "open_clip", "name": "ViT-B-32", "pretrained": "openai"},
    "biomedclip": {"kind": "open_clip", "name": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"},
    "plip": {"kind": "hf", "name": "vinid/plip"},
    "quiltnet": {"kind": "open_clip", "name": "hf-hub:wisdomik/QuiltNet-B-32"},
    "align": {"kind": "hf", "name": "kakaobrain/align-base", "padding": "max_length"},
}
KINDS = ("open_clip", "hf", "timm", "random")


def build_backbone(kind: str = "open_clip", name: str | None = None, preset: str | None = None,
                   **kwargs: Any) -> Backbone:
    """Build a backbone adapter.

    Args:
        kind: ``open_clip`` | ``hf`` | ``timm``.
        name: model name or id for that library (see each adapter).
        preset: a key of :data:`PRESETS`; its settings are defaults that ``name``/``kwargs`` override.
        kwargs: passed to the adapter (``pretrained``, ``revision``, ``seed``, ``precision``...).
    """
    if preset is not None:
        if preset not in PRESETS:
            raise BackboneError(f"unknown model preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
        base = dict(PRESETS[preset])
        kind = base.pop("kind")
        name = name or base.pop("name")
        kwargs = {**base, **kwargs}
    if name is None:
        raise BackboneError(f"no model name given: set model.name or pick a preset ({', '.join(sorted(PRESETS))})")
    if kind == "open_clip":
        from microbench.models.backbones.open_clip_backbone import OpenClipBackbone

        return OpenClipBackbone(name, **kwargs)
    if kind == "hf":
        from microbench.models.backbones.hf_backbone import HFClipBackbone

        return HFClipBackbone(name, **kwargs)
    if kind == "timm":
        from microbench.models.backbones.timm_backbone import TimmImageBackbone

        return TimmImageBackbone(name, **kwargs)
    raise BackboneError(f"unknown backbone kind {kind!r}; kinds: open_clip, hf, timm (or model=random)")
