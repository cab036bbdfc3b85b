"""What a config node may set for the target it builds (read by the pre-run check, ``tasks/validate.py``)."""

from __future__ import annotations

import inspect


def signature_options(target) -> set[str] | None:
    """The keyword parameters of ``target`` (a class: of its ``__init__``), or None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
