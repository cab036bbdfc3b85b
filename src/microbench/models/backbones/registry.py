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
    hub_down = hub_unreachable() if needs_hub(kind, name, kwargs) else None
    try:
        return _build(kind, name, kwargs)
    except BackboneError as err:
        if hub_down is None:
            raise
        raise BackboneError(f"{err}; the Hub is unreachable ({hub_down}), so only the local HF cache was tried: "
                            "download the weights once on a machine with internet (they are then used with "
                            "HF_HUB_OFFLINE=1), or point model.name at a local copy (local-dir:<folder>)") from err


def needs_hub(kind: str, name: str, kwargs: dict) -> bool:
    """Whether building this model would download from the Hugging Face Hub (unless cached)."""
    from pathlib import Path

    if kind == "open_clip":
        pretrained = kwargs.get("pretrained")
        return name.startswith("hf-hub:") or (bool(pretrained) and pretrained not in ("none", "None")
                                              and not Path(str(pretrained)).expanduser().exists())
    if kind == "hf":
        return not Path(name).expanduser().exists()
    if kind == "timm":
        return name.startswith("hf-hub:") or bool(kwargs.get("pretrained"))
    return False


_HUB_STATE: dict = {}


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """None when the Hub can be asked (or offline mode is already on); else why not. Probed once per process, as
    the data loader does; when it is unreachable, the HF libraries are switched to offline mode, so a cached model
    still loads and a missing one fails at once instead of after a minute of retries."""
    import os

    from microbench.data.loading import hub_offline, hub_reachable

    if hub_offline():
        return None
    if "down" not in _HUB_STATE:
        ok, why = hub_reachable(timeout_s)
        _HUB_STATE["down"] = None if ok else why
        if not ok:
            os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                import huggingface_hub.constants as hub_constants

                hub_constants.HF_HUB_OFFLINE = True
            except ImportError:  # pragma: no cover - huggingface_hub is a dependency of open_clip
                pass
    return _HUB_STATE["down"]


def _build(kind: str, name: str, kwargs: dict) -> Backbone:
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


build_backbone.family = "contrastive"  # the family of what it builds, read by microbench.tasks without building
