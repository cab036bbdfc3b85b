"""One pass over the composed config before any work, as torchtune checks each node against its target: every
``_target_`` node's keys must be options of what it builds, and every problem is reported at once, each with its
fix (a typo in an experiment file otherwise reaches the target as a key it ignores, or fails after an hour of fit).

A target's options are its signature's parameters; a target that takes ``**kwargs`` and dispatches on them
declares its options per node with an ``options(node)`` attribute (``build_backbone``: the adapter of
``kind``; ``build_generative_backend``: the backend of ``backend``), or is not checked. The value of an option whose
annotation bounds it (``batch_size: PositiveInt``, :mod:`microbench.options`) must lie in its range; a dispatching
target names what a node builds with a ``builds(node)`` attribute, whose annotations are read.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from microbench.errors import UserError
from microbench.options import signature_options, value_problems

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


def config_problems(cfg: DictConfig) -> list[str]:
    """One line per key of a ``_target_`` node that its target does not take, with the closest option."""
    problems = []
    for path, node in _targets(cfg, ""):
        try:
            target = get_object(str(node._target_))
        except Exception:  # noqa: BLE001 - an unimportable target is reported where it is built, with its fix
            continue
        options = options_of(target, node)
        unknown = set() if options is None else set(node.keys()) - options - HYDRA_KEYS  # None: takes **kwargs
        for key in sorted(unknown):
            close = difflib.get_close_matches(str(key), sorted(options), n=1)
            hint = f"did you mean {path}.{close[0]}?" if close else f"its options: {', '.join(sorted(options))}"
            problems.append(f"{path}.{key} is not an option of {node._target_} ({hint})")
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
            out[str(key)] = node[key]
        except Exception:  # noqa: BLE001 - an interpolation resolved only at run time is checked when built
            continue
    return out


def moved_root_keys(cfg: DictConfig) -> list[str]:
    """A config file that still sets a renamed root key (``task_name:``) would have it silently ignored."""
    from microbench.entry import RENAMED_IN_EVERY_JOB, WHY_RENAMED

    return [f"{old} in the config is now {new} ({WHY_RENAMED[new]}): rename it in your config file"
            for old, new in RENAMED_IN_EVERY_JOB.items() if old in cfg]


def check_config(cfg: DictConfig) -> None:
    """Every problem of :func:`config_problems` (and :func:`moved_root_keys`) in one error, before anything is
    built."""
    problems = moved_root_keys(cfg) + config_problems(cfg)
    if problems:
        raise UserError(f"{len(problems)} config problem(s), nothing was run: " + "; ".join(problems))
