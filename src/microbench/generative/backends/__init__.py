"""Generative VLM backends behind one interface (:class:`GenerativeBackend`): any OpenAI-compatible chat-completions
server (:mod:`.openai`) and local transformers models (:mod:`.hf`).

Both take :class:`Request` objects (prompt + image bytes) and return :class:`Result` objects, and both go through a
:class:`ResponseCache` on disk (SQLite) keyed by (model, prompt, image hashes, generation parameters), so an
interrupted or repeated run resumes without asking again.
"""

from __future__ import annotations

from microbench.generative.backends.base import (
    BackendStats,
    GenerativeBackend,
    GenerativeBackendError,
    Request,
    ResponseCache,
    Result,
    request_key,
)
from microbench.generative.backends.hf import HFVisionBackend
from microbench.generative.backends.openai import OpenAICompatibleBackend, data_url
from microbench.options import signature_options

__all__ = ["BACKENDS", "BackendStats", "GenerativeBackend", "GenerativeBackendError", "HFVisionBackend",
           "OpenAICompatibleBackend", "Request", "ResponseCache", "Result", "build_generative_backend", "data_url",
           "request_key"]

BACKENDS = {"openai": OpenAICompatibleBackend, "hf": HFVisionBackend}


def build_generative_backend(backend: str = "openai", **kwargs) -> GenerativeBackend:
    """Hydra target of ``configs/model/openai_compatible.yaml`` / ``hf_vlm.yaml``; what a node may set is checked
    before any work (:func:`generative_options`, ``tasks/validate.py``)."""
    if backend not in BACKENDS:
        raise GenerativeBackendError(f"generative backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    kwargs.pop("kind", None)
    return BACKENDS[backend](**kwargs)


def generative_options(node) -> set[str] | None:
    """What a generative ``model`` node may set: ``backend``, ``kind`` and the options of that backend."""
    backend = str(node.get("backend", "openai"))
    options = signature_options(BACKENDS[backend]) if backend in BACKENDS else None
    return None if options is None else options | {"backend", "kind"}


build_generative_backend.family = "generative"  # read by microbench.tasks without building
build_generative_backend.options = generative_options
build_generative_backend.builds = lambda node: BACKENDS.get(str(node.get("backend", "openai")))  # its annotations
