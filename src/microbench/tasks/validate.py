"""One pass over the composed config before any work, as torchtune checks each node against its target: every
``_target_`` node's keys must be options of what it builds, and every problem is reported at once, each with its
fix (a typo in an experiment file otherwise reaches the target as a key it ignores, or fails after an hour of fit).

A target's options are its signature's parameters; a target that takes ``**kwargs`` and dispatches on them
declares its options per node with an ``options(node)`` attribute (``build_backbone``: the adapter of
``kind``; ``build_generative_backend``: the backend of ``backend``), or is not checked. The value of an option
whose annotation says what it may be (``batch_size: PositiveInt``, ``split: Literal[...]``,
:mod:`microbench.options`) must be one of those; a dispatching target names what a node builds with a
``builds(node)`` attribute, whose annotations are read.

The entry's root settings and its groups that build no target (``bootstrap``, ``cognition``, ``probe``,
``inference``, ...) have a dataclass schema each (:mod:`microbench.tasks.settings`), read the same way by
:func:`settings_problems`; a root key that is neither a setting nor a config group is named with the closest one.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from microbench.entry import RENAMED, RENAMED_IN_EVERY_JOB, WHY_RENAMED
from microbench.errors import UserError
from microbench.options import (
    check_value,
    options_annotations,
    settable,
    settings_group,
    signature_options,
    value_problems,
)
from microbench.resources import CONFIG_DIR

#: root keys of an older layout, each reported with its new name instead (moved_root_keys, the study's moved keys)
MOVED_ROOT_KEYS = set(RENAMED_IN_EVERY_JOB) | {k.split(".")[0] for k in RENAMED["forgetting"]}
#: keys of a node that Hydra's instantiate reads itself
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})


def options_of(target, node: DictConfig) -> set[str] | None:
    """What ``node`` may set for ``target``: its ``options(node)`` if it declares them, else its signature's."""
    declared = getattr(target, "options", None)
    return declared(node) if callable(declared) else signature_options(target)


def _targets(node, path: str) -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node and not OmegaConf.is_missing(node, "_target_"):
            yield path, node
        for key in node:
            if path == "" and key == "hydra":
                continue
            if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
                continue
            yield from _targets(node[key], f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_missing(node, i) and not OmegaConf.is_interpolation(node, i):
                yield from _targets(node[i], f"{path}[{i}]")


def unknown_keys(keys, known: set[str], path: str, what: str, their: str = "settings") -> list[str]:
    """One clause per key of ``keys`` not in ``known``: ``{path}.{key} is not {what} (did you mean {path}.{the
    closest}?)``, or the known keys when none is close."""
    problems = []
    for key in sorted(set(map(str, keys)) - set(known)):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        where = f"{path}." if path else ""
        hint = f"did you mean {where}{close[0]}?" if close else f"its {their}: {', '.join(sorted(known))}"
        problems.append(f"{where}{key} is not {what} ({hint})")
    return problems


def config_problems(cfg: DictConfig) -> list[str]:
    """One line per key of a ``_target_`` node that its target does not take, with the closest option."""
    problems = []
    for path, node in _targets(cfg, ""):
        try:
            target = get_object(str(node._target_))
        except Exception:  # noqa: BLE001 - an unimportable target is reported where it is built, with its fix
            continue
        options = options_of(target, node)
        if options is not None:  # None: takes **kwargs
            problems += unknown_keys(set(node.keys()) - HYDRA_KEYS, options, path, f"an option of {node._target_}",
                                     "options")
        problems += value_problems(_built(target, node), _plain_values(node), path)
    return problems


def _built(target, node: DictConfig):
    """What ``node`` builds: a dispatching target's ``builds(node)``, else the target itself."""
    builds = getattr(target, "builds", None)
    return (builds(node) or target) if callable(builds) else target


def _plain_values(node: DictConfig) -> dict:
    """The node's keys whose values are set (neither missing nor an interpolation that does not resolve yet)."""
    out = {}
    for key in node:
        if OmegaConf.is_missing(node, key):
            continue
        try:
            out[str(key)] = _plain(node[key])
        except Exception:  # noqa: BLE001 - an interpolation resolved only at run time is checked when built
            continue
    return out


def _plain(value):
    """A config's list or mapping as the plain value a target or a settings field receives."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def moved_root_keys(cfg: DictConfig) -> list[str]:
    """A config file that still sets a renamed root key (``task_name:``) would have it silently ignored."""
    return [f"{old} in the config is now {new} ({WHY_RENAMED[new]}): rename it in your config file"
            for old, new in RENAMED_IN_EVERY_JOB.items() if old in cfg]


def settings_problems(cfg: DictConfig, schema, prefix: str = "") -> list[str]:
    """One clause per value of ``cfg`` its settings dataclass refuses (a nested dataclass is a group, whose keys must
    be its fields: ``bootstrap.n_resample`` is named with its closest key), then the schema's ``more_problems``."""
    hints = options_annotations(schema)
    problems = []
    for f in dataclasses.fields(schema):
        required = f.metadata.get("required")
        absent = f.name not in cfg or OmegaConf.is_missing(cfg, f.name)
        if required and (absent or cfg.get(f.name) in (None, "", [])):
            problems.append(f"{prefix}{f.name} is required: {required}")
            continue
        if absent:
            continue
        name, annotation = f"{prefix}{f.name}", hints[f.name]
        try:
            value = cfg[f.name]
        except Exception:  # noqa: BLE001 - an interpolation resolved only at run time is checked where it is read
            continue
        group = settings_group(annotation)
        if group is not None:
            annotation = group
            known = [g.name for g in dataclasses.fields(annotation)]
            if isinstance(value, DictConfig):
                problems += unknown_keys(set(value), set(known), name, f"a setting of {name}")
                problems += settings_problems(value, annotation, f"{name}.")
            elif value is not None:
                problems.append(f"{name} must be a group of settings ({', '.join(known)}), got {value!r}")
        elif settable(annotation):
            try:
                plain = _plain(value)
            except Exception:  # noqa: BLE001 - an interpolation inside a list, resolved only at run time
                continue
            problem = check_value(name, annotation, plain)[1]
            problems += [problem] if problem else []
    if not prefix:  # a root key that is no setting and no config group (a typo in an experiment file, a +key=)
        raw = OmegaConf.to_container(cfg, resolve=False)
        fields = {f.name for f in dataclasses.fields(schema)}
        groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()} | {"hydra"}
        stray = [k for k, v in raw.items() if k not in fields and k not in MOVED_ROOT_KEYS and v is not None
                 and v != "???" and not (isinstance(v, dict) and k in groups)]
        problems += unknown_keys(stray, fields, "", f"a setting of {getattr(schema, 'entry', schema.__name__)}")
    more = getattr(schema, "more_problems", None)
    return problems + (list(more(cfg)) if callable(more) and not prefix else [])


def check_config(cfg: DictConfig, settings=None, first: list[str] | tuple = ()) -> None:
    """Every problem in one error, before anything is built: ``first`` (the entry's: a task its table lacks), moved
    root keys (:func:`moved_root_keys`), the root settings (:func:`settings_problems` of ``settings``, the entry's
    schema) and every ``_target_`` node (:func:`config_problems`)."""
    problems = [*first, *moved_root_keys(cfg), *(settings_problems(cfg, settings) if settings else []),
                *config_problems(cfg)]
    problems = list(dict.fromkeys(problems))  # a value read by two schemas (bootstrap.* by the study's too) once
    if problems:
        raise UserError(f"{len(problems)} config problem(s), nothing was run: " + "; ".join(problems))
