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

__all__ = ["BACKENDS", "BackendStats", "GenerativeBackend", "GenerativeBackendError", "HFVisionBackend",
           "OpenAICompatibleBackend", "Request", "ResponseCache", "Result", "build_generative_backend", "data_url",
           "request_key"]

BACKENDS = {"openai": OpenAICompatibleBackend, "hf": HFVisionBackend}


def build_generative_backend(backend: str = "openai", **kwargs) -> GenerativeBackend:
    """Hydra target of ``configs/model/openai_compatible.yaml`` / ``hf_vlm.yaml``."""
    import inspect

    if backend not in BACKENDS:
        raise GenerativeBackendError(f"generative backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    kwargs.pop("kind", None)
    known = set(inspect.signature(BACKENDS[backend]).parameters)
    unknown = sorted(set(kwargs) - known)
    if unknown:  # a typo in model.<key> must not be silently ignored
        raise GenerativeBackendError(f"unknown option(s) {unknown} for the {backend} backend; known: {sorted(known)}")
    return BACKENDS[backend](**kwargs)


build_generative_backend.family = "generative"  # read by microbench.tasks without building
