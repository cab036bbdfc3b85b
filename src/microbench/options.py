"""What a config node may set for the target it builds, and what values it may take (read by the pre-run check,
``tasks/validate.py``, and by :func:`checked` when a target is built from Python).

A target states its options in its signature, and what an option may hold in its annotation: a range
(``batch_size: PositiveInt = 32``, as pydantic reads ``Annotated`` constraints), a choice (``towers:
Literal["both", "image"]``), a list of either. The root settings of an entry and its config groups state theirs in a
dataclass (:mod:`microbench.tasks.settings`) read the same way. One statement serves the check of a composed config
before any work and the check of a direct call, and the hand-written checks per option go.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, Union

from annotated_types import Ge, Gt, Le, Lt, MinLen

from microbench.errors import UserError

#: an integer >= 1 (a batch size, a number of epochs, a concurrency)
PositiveInt = Annotated[int, Ge(1)]
#: an integer >= 0 (workers, retries)
NonNegativeInt = Annotated[int, Ge(0)]
#: a number > 0 (a learning rate, a timeout in seconds)
PositiveFloat = Annotated[float, Gt(0)]
#: a number >= 0 (a weight)
NonNegativeFloat = Annotated[float, Ge(0)]
#: a share in [0, 1] (a fraction kept, a drop probability)
Share = Annotated[float, Ge(0), Le(1)]
#: a probability strictly inside (0, 1) (a confidence level)
OpenShare = Annotated[float, Gt(0), Lt(1)]
#: a share in (0, 1] (a density: the share of a task vector kept)
Density = Annotated[float, Gt(0), Le(1)]
#: a probability in [0, 1) (a drop probability)
DropProbability = Annotated[float, Ge(0), Lt(1)]
#: one integer seed or a non-empty list of them
Seeds = int | Annotated[tuple[int, ...], MinLen(1)]

_BOUNDS = (Ge, Gt, Le, Lt)


def signature_options(target) -> set[str] | None:
    """The keyword parameters of ``target`` (a class: of its ``__init__``), or None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _members(annotation) -> tuple:
    """The members of a union (``X | None``, ``Optional[X]``), else the annotation alone."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def settings_group(annotation):
    """The settings dataclass a group field holds (``BootstrapSettings``, ``SpecialtySettings | None``), else
    None."""
    return next((m for m in _members(annotation) if dataclasses.is_dataclass(m)), None)


def _bounds(annotation) -> tuple[type, list] | None:
    if typing.get_origin(annotation) is Annotated:
        base, *meta = typing.get_args(annotation)
        bounds = [m for m in meta if isinstance(m, _BOUNDS)]
        if base in (int, float) and bounds:
            return base, bounds
    return None


def _unwrap(annotation):
    """An ``Annotated`` annotation's base type (``Annotated[tuple[int, ...], MinLen(1)]`` → ``tuple[int, ...]``)."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def _is_list(annotation) -> bool:
    """``list[X]``, ``Sequence[X]`` or ``tuple[X, ...]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, Sequence):
        return len(args) == 1
    return origin is tuple and len(args) == 2 and args[1] is Ellipsis


def checkable(annotation) -> bool:
    """Whether an annotation states what a value may be beyond its type: a range, a choice, or a list of them (a
    plain ``int`` or ``str`` is left to the target, so no option is refused that the target would take)."""
    for member in _members(annotation):
        if member is type(None):
            continue
        if _bounds(member) or typing.get_origin(member) is Literal:
            return True
        base = _unwrap(member)
        if _is_list(base) and checkable(typing.get_args(base)[0]):
            return True
    return False


def settable(annotation) -> bool:
    """What the check of a settings dataclass reads (:func:`microbench.tasks.validate.settings_problems`): a
    :func:`checkable` annotation, or a bool, an integer or a number (optional, or a list of them). Strings and
    paths are left to what reads them."""
    if checkable(annotation):
        return True
    members = [m for m in _members(annotation) if m is not type(None)]
    return bool(members) and all(
        m in (bool, int, float) or (_is_list(_unwrap(m)) and settable(typing.get_args(_unwrap(m))[0]))
        for m in members)


def describe(annotation) -> str:
    """What a value of ``annotation`` must be, as a problem line says it: ``an integer >= 1``, ``one of both,
    image``, ``a list, each one of captions, questions``."""
    members = [m for m in _members(annotation) if m is not type(None)]
    if len(members) > 1:
        return " or ".join(describe(m) for m in members)
    (member,) = members
    found = _bounds(member)
    if found:
        base, bounds = found
        what = "an integer" if base is int else "a number"
        lo = next((b for b in bounds if isinstance(b, Ge | Gt)), None)
        hi = next((b for b in bounds if isinstance(b, Le | Lt)), None)
        if lo is not None and hi is not None:
            return (f"{what} in {'[' if isinstance(lo, Ge) else '('}{getattr(lo, 'ge', getattr(lo, 'gt', None))}, "
                    f"{getattr(hi, 'le', getattr(hi, 'lt', None))}{']' if isinstance(hi, Le) else ')'}")
        return " ".join([what, *(f">= {b.ge}" if isinstance(b, Ge) else f"> {b.gt}" if isinstance(b, Gt)
                                 else f"<= {b.le}" if isinstance(b, Le) else f"< {b.lt}" for b in bounds)])
    if typing.get_origin(member) is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(member))
    if _is_list(member):
        return f"a list, each {describe(typing.get_args(member)[0])}"
    if typing.get_origin(member) is Annotated:
        base, *meta = typing.get_args(member)
        non_empty = any(isinstance(m, MinLen) and m.min_length >= 1 for m in meta)
        return ("a non-empty " if non_empty else "") + describe(base).removeprefix("a ")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        member, getattr(member, "__name__", str(member)))


def _is_number(annotation) -> bool:
    return any((_bounds(m) or (m, []))[0] in (int, float) for m in _members(annotation))


@functools.cache
def options_annotations(target) -> dict[str, Any]:
    """Every annotated option of ``target`` (a function, a class's ``__init__`` up its MRO, a dataclass's fields):
    name -> annotation with its ``Annotated`` extras."""
    if dataclasses.is_dataclass(target):
        return dict(typing.get_type_hints(target, include_extras=True))
    fns = ([c.__dict__["__init__"] for c in reversed(target.__mro__) if "__init__" in c.__dict__]
           if inspect.isclass(target) else [target])  # a subclass passing **kwargs up keeps its parents' bounds
    out: dict[str, Any] = {}
    for fn in fns:
        try:
            out.update(typing.get_type_hints(inspect.unwrap(fn), include_extras=True))
        except Exception:  # noqa: BLE001 - a target whose annotations do not resolve states nothing
            continue
    out.pop("return", None)
    return out


@functools.cache
def constrained_options(target) -> dict[str, Any]:
    """The options of ``target`` whose annotation says what their value may be (:func:`checkable`): name ->
    annotation."""
    return {k: a for k, a in options_annotations(target).items() if checkable(a)}


def check_value(name: str, annotation, value: Any) -> tuple[Any, str | None]:
    """(the value as its type, None) or (value, the one-clause problem: ``data.batch_size must be an integer >= 1,
    got 'abc'``). Validated by pydantic (lax: ``"8"`` and ``8.0`` are 8); a bool is not a number here. A config's
    lists reach it as plain lists (the pre-run check converts them)."""
    from pydantic import ValidationError

    try:
        if isinstance(value, bool) and _is_number(annotation):
            raise ValueError("a bool")
        return _adapter(annotation).validate_python(value), None
    except (ValidationError, ValueError, TypeError):
        return value, f"{name} must be {describe(annotation)}, got {value!r}"


@functools.cache
def _adapter(annotation):
    from pydantic import TypeAdapter

    return TypeAdapter(annotation)


def value_problems(target, values: Mapping, prefix: str) -> list[str]:
    """One clause per checkable option of ``target`` in ``values`` whose value it may not take."""
    specs = constrained_options(target)
    return [p for k, v in values.items() if k in specs
            for p in [check_value(f"{prefix}.{k}" if prefix else k, specs[k], v)[1]] if p]


def checked(prefix: str, error: type[Exception] | None = None) -> Callable:
    """Decorate a target (its ``__init__``, or a function): its checkable options (:data:`PositiveInt`, a
    ``Literal``, ...) are checked and converted when it is called, every problem in one ``error`` (default
    ``UserError``) naming the option as a config names it (``prefix.name``; a root key: ``prefix=""``). The pre-run
    check reports the same problems before any work."""
    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            specs = constrained_options(fn)
            problems = []
            for name, value in list(bound.arguments.items()):
                if name in specs:
                    bound.arguments[name], problem = check_value(f"{prefix}.{name}" if prefix else name,
                                                                 specs[name], value)
                    if problem:
                        problems.append(problem)
            if problems:
                raise (error or UserError)("; ".join(problems))
            return fn(*bound.args, **bound.kwargs)
        return inner
    return wrap
