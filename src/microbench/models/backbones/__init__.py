"""Backbone adapters behind one interface (:class:`Backbone`) and the factory :func:`build_backbone`."""

from microbench.models.backbones.base import Backbone, BackboneError
from microbench.models.backbones.registry import build_backbone

__all__ = ["Backbone", "BackboneError", "build_backbone"]
