"""Build any backbone from a small config: the one factory behind every ``model=`` preset."""

from __future__ import annotations

from typing import Any

from microbench.models.backbones.base import Backbone, BackboneError
from microbench.options import signature_options


def build_backbone(kind: str = "open_clip", name: str | None = None, **kwargs: Any) -> Backbone:
    """Build a backbone adapter.

    Args:
        kind: ``open_clip`` | ``hf`` | ``timm``.
        name: model name or id for that library (see each adapter).
        kwargs: passed to the adapter (``pretrained``, ``revision``, ``seed``, ``precision``...).
    """
    if name is None:
        raise BackboneError("no model name given: set model.name, or pick a preset model=<name> (configs/model/)")
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


#: ``model.kind`` -> the adapter that builds it (imported when used)
ADAPTERS = {"open_clip": "microbench.models.backbones.open_clip_backbone.OpenClipBackbone",
            "hf": "microbench.models.backbones.hf_backbone.HFClipBackbone",
            "timm": "microbench.models.backbones.timm_backbone.TimmImageBackbone"}


def adapter(kind: str) -> type[Backbone]:
    import importlib

    if kind not in ADAPTERS:
        raise BackboneError(f"unknown backbone kind {kind!r}; kinds: open_clip, hf, timm (or model=random)")
    module, _, name = ADAPTERS[kind].rpartition(".")
    return getattr(importlib.import_module(module), name)


def _build(kind: str, name: str, kwargs: dict) -> Backbone:
    return adapter(kind)(name, **kwargs)


def backbone_options(node) -> set[str] | None:
    """What a ``model`` node may set: ``kind``, ``name`` and the options of the adapter of its kind."""
    kind = str(node.get("kind", "open_clip"))
    if kind not in ADAPTERS:
        return None  # building it says which kinds exist
    options = signature_options(adapter(kind))
    return None if options is None else options | {"kind", "name"}


build_backbone.family = "contrastive"  # the family of what it builds, read by microbench.tasks without building
build_backbone.options = backbone_options  # what a model node may set (tasks/validate.py)
build_backbone.builds = lambda node: (adapter(str(node.get("kind", "open_clip")))  # whose annotations bound values
                                      if str(node.get("kind", "open_clip")) in ADAPTERS else None)
