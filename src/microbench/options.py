"""What a config node may set for the target it builds, and what values it may take (read by the pre-run check,
``tasks/validate.py``, and by :func:`checked` when a target is built from Python).

A target states its options in its signature, and the range of a numeric option in its annotation
(``batch_size: PositiveInt = 32``), as pydantic reads ``Annotated`` constraints: one statement serves the check of a
composed config before any work and the check of a direct call, and the hand-written checks per option go.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

from annotated_types import Ge, Gt

#: an integer >= 1 (a batch size, a number of epochs, a concurrency)
PositiveInt = Annotated[int, Ge(1)]
#: an integer >= 0 (workers, retries)
NonNegativeInt = Annotated[int, Ge(0)]
#: a number > 0 (a learning rate, a timeout in seconds)
PositiveFloat = Annotated[float, Gt(0)]


def signature_options(target) -> set[str] | None:
    """The keyword parameters of ``target`` (a class: of its ``__init__``), or None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _constraint(annotation) -> tuple[type, list] | None:
    """(base type, bounds) of an ``Annotated[int | float, Ge/Gt ...]`` annotation (optional or not), else None."""
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is Annotated:
            base, *meta = typing.get_args(arg)
            bounds = [m for m in meta if isinstance(m, Ge | Gt)]
            if base in (int, float) and bounds:
                return base, bounds
    return None


@functools.cache
def constrained_options(target) -> dict[str, tuple[type, list, bool]]:
    """The options of ``target`` whose annotation bounds their value: name -> (int | float, bounds, None allowed)."""
    fns = ([c.__dict__["__init__"] for c in reversed(target.__mro__) if "__init__" in c.__dict__]
           if inspect.isclass(target) else [target])  # a subclass passing **kwargs up keeps its parents' bounds
    out = {}
    for fn in fns:
        try:
            hints = typing.get_type_hints(inspect.unwrap(fn), include_extras=True)
        except Exception:  # noqa: BLE001 - a target whose annotations do not resolve states no bounds
            continue
        for name, annotation in hints.items():
            found = _constraint(annotation)
            if found:
                out[name] = (*found, type(None) in typing.get_args(annotation))
    return out


def _describe(base: type, bounds: list) -> str:
    what = "an integer" if base is int else "a number"
    return " ".join([what, *(f">= {b.ge}" if isinstance(b, Ge) else f"> {b.gt}" for b in bounds)])


def check_value(name: str, spec: tuple[type, list, bool], value: Any) -> tuple[Any, str | None]:
    """(the value as its type, None) or (value, the one-clause problem: ``data.batch_size must be an integer >= 1,
    got 'abc'``). Validated by pydantic (lax: ``"8"`` and ``8.0`` are 8); a bool is not a number here."""
    from pydantic import ValidationError

    base, bounds, optional = spec
    if value is None and optional:
        return None, None
    try:
        if isinstance(value, bool):
            raise ValueError("a bool")
        return _adapter(base, tuple(bounds)).validate_python(value), None
    except (ValidationError, ValueError, TypeError):
        return value, f"{name} must be {_describe(base, bounds)}, got {value!r}"


@functools.cache
def _adapter(base: type, bounds: tuple):
    from pydantic import TypeAdapter

    return TypeAdapter(Annotated[(base, *bounds)])


def value_problems(target, values: dict, prefix: str) -> list[str]:
    """One clause per bounded option of ``target`` in ``values`` whose value is out of its range."""
    specs = constrained_options(target)
    return [p for k, v in values.items() if k in specs
            for p in [check_value(f"{prefix}.{k}" if prefix else k, specs[k], v)[1]] if p]


def checked(prefix: str, error: type[Exception] | None = None) -> Callable:
    """Decorate a target (its ``__init__``, or a function): its bounded options (:data:`PositiveInt`, ...) are
    checked and converted when it is called, every problem in one ``error`` (default ``UserError``) naming the
    option as a config names it (``prefix.name``). The pre-run check reports the same problems before any work."""
    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            specs = constrained_options(fn)
            problems = []
            for name, value in list(bound.arguments.items()):
                if name in specs:
                    bound.arguments[name], problem = check_value(f"{prefix}.{name}", specs[name], value)
                    if problem:
                        problems.append(problem)
            if problems:
                from microbench.errors import UserError

                raise (error or UserError)("; ".join(problems))
            return fn(*bound.args, **bound.kwargs)
        return inner
    return wrap
