"""Merge methods as plug-ins of the forgetting study: each supplies the paths in weight space the sweep walks.

A method is one function registered with :func:`merge_method` (and one ``configs/study/<name>.yaml``): given the
base, the fine-tuned weights, the tower selection and the model's residual-block depths, it returns one or more
:class:`MergePath` — two end points θ_start (α = 0) and θ_end (α = 1) of a line θ(α) = θ_start + α·(θ_end −
θ_start). The study's :class:`~microbench.studies.sweep.InterpolationScorer` walks every path at every α on the same
decoded images (one decode per image for every method). Each method's end points are the pure merges of
:mod:`microbench.studies.merging`, pinned to their papers there:

- ``wise_ft``: base → fine-tuned (Wortsman et al., 2022);
- ``lines``: θ(α) = base + λ(ℓ)·τ, λ(ℓ) = α + (1 − α)·ℓ/(L − 1) per residual block (Wang et al., ICLR 2025), a line
  from base + (ℓ/(L − 1))·τ to the fine-tune;
- ``ties_trim``: base → base + trim_k(τ) (TIES' trim on the one task vector; Yadav et al., 2023);
- ``dare``: base → base + DARE_p(τ), one path per seed (Yu et al., 2024);
- ``model_stock``: base → θ_H = t·θ̄_ft + (1 − t)·base from two or more fine-tunes (Jang et al., 2024).

The specialists study merges *many* fine-tunes of one base into one model; its merges are plug-ins too, registered
with :func:`specialists_merge` (:data:`SPECIALIST_MERGES`): given the base and every specialist, each returns the
path(s) base → θ_merge whose scale λ the study chooses on val (``scaled=True``), or the merged point alone:

- ``uniform_soup``: the specialists' mean (Wortsman et al., 2022), not scaled;
- ``task_arithmetic``: base + λ·Σ_i τ_i (Ilharco et al., 2023);
- ``ties``: base + λ·TIES(τ_1..τ_n; k), one path per density k (Yadav et al., 2023);
- ``dare``: base + λ·Σ_i DARE_p(τ_i), DARE then task arithmetic, one path per seed (Yu et al., 2024);
- ``model_stock``: t·θ̄ + (1 − t)·base over the specialists (Jang et al., 2024), not scaled.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

from annotated_types import MinLen

from microbench.errors import UserError
from microbench.options import Density, DropProbability, Seeds, check_value, options_annotations, settable
from microbench.studies.merging import (
    StateDict,
    add_vector,
    dare,
    lines,
    model_stock,
    task_arithmetic,
    task_vector,
    ties_merge,
    uniform_soup,
)


@dataclass(frozen=True)
class MergePath:
    """One line in weight space: θ(α) = θ_start + α·(θ_end − θ_start) on the selected float tensors."""

    method: str
    label: str  # the method, or e.g. ``dare[seed=1]`` for one of several paths
    start: StateDict
    end: StateDict
    starts_at_base: bool = True  # θ(0) is the base: α = 0 is not evaluated again
    ends_at_finetuned: bool = False  # θ(1) is the fine-tune: α = 1 is not evaluated again
    seed: int | None = None


@dataclass(frozen=True)
class MergeInputs:
    """What a method may read: the two models, the selected keys (None: every float tensor), ``key -> (ℓ, L)`` of
    the residual blocks, and further fine-tunes of the same base (Model Stock)."""

    base: StateDict
    finetuned: StateDict
    keys: Callable[[str], bool] | None = None
    depths: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    more_finetuned: Sequence[StateDict] = ()


@dataclass(frozen=True)
class MergeMethod:
    name: str
    paths: Callable[..., list[MergePath]]
    defaults: dict
    summary: str
    check: Callable[..., None] | None = None  # (**options) -> None, raising UserError: before any work is done
    scaled: bool = True  # specialists merges: the study scans λ along each path (else it scores θ_end alone)


METHODS: dict[str, MergeMethod] = {}
#: merges of many fine-tunes (the specialists study), ``fn(inputs: SpecialistsInputs, **options) -> [MergePath]``
SPECIALIST_MERGES: dict[str, MergeMethod] = {}


@dataclass(frozen=True)
class SpecialistsInputs:
    """What a specialists merge may read: the base, every specialist (fine-tunes of that base, in order) and the
    selected keys (None: every float tensor)."""

    base: StateDict
    finetuned: Sequence[StateDict]
    keys: Callable[[str], bool] | None = None


def merge_method(name: str, summary: str, check: Callable[..., None] | None = None) -> Callable:
    """Register ``fn(inputs: MergeInputs, **options) -> list[MergePath]`` as the study method ``name``; its keyword
    defaults are the method's options (``study.options.<name>`` in the config). ``check(**options)`` refuses bad
    option values in one line when the study is configured (before a fit, not after it)."""

    def register(fn: Callable) -> Callable:
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        METHODS[name] = MergeMethod(name, fn, defaults, summary, check)
        return fn

    return register


def specialists_merge(name: str, summary: str, check: Callable[..., None] | None = None,
                      scaled: bool = True) -> Callable:
    """Register ``fn(inputs: SpecialistsInputs, **options) -> list[MergePath]`` as the specialists-study merge
    ``name`` (``merges=[..., name]``; options ``merge_options.<name>.<key>``). Each path runs base → θ_merge;
    ``scaled``: the study scores it at every λ of ``lambdas`` and chooses λ on val, else at θ_merge alone."""

    def register(fn: Callable) -> Callable:
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        SPECIALIST_MERGES[name] = MergeMethod(name, fn, defaults, summary, check, scaled)
        return fn

    return register


def option_problems(method: MergeMethod, given: Mapping | None, prefix: str, values: bool = True) -> list[str]:
    """One clause per option of ``given`` that ``method`` does not take, then (``values``) per value its function's
    annotation refuses (``density: Density``, :mod:`microbench.options`), then what its ``check`` says of the whole
    (a file that must exist): the option's range is stated once, in the method's signature."""
    given = dict(given or {})
    problems = [f"{prefix}.{k} is not an option of {method.name}; its options: "
                f"{', '.join(method.defaults) or 'none'}" for k in sorted(set(given) - set(method.defaults))]
    if not values or problems:
        return problems
    hints = options_annotations(method.paths)
    problems += [p for k, v in given.items() if k in hints and settable(hints[k])
                 for p in [check_value(f"{prefix}.{k}", hints[k], v)[1]] if p]
    if not problems and method.check is not None:
        try:
            method.check(**{**method.defaults, **given})
        except UserError as err:
            problems.append(str(err))
    return problems


def _registry_problems(registry: Mapping[str, MergeMethod], names, options, key: str, options_key: str,
                       unknown_hint: str, noun: str = "merge") -> tuple[list[str], list[str]]:
    """(names, every problem) of a list of registered merges and their options: unknown names, repeats, unknown
    options and refused values (those of the named merges)."""
    names = [names] if isinstance(names, str) else [str(n) for n in names or []]
    options = dict(options or {})
    known = ", ".join(registry)
    problems = [f"{key}: unknown {noun} {n!r}; known: {known} ({unknown_hint})" for n in names if n not in registry]
    problems += [f"{options_key}.{n}: no {noun} {n!r}; known: {known}" for n in options if n not in registry]
    if len(set(names)) != len(names):
        problems.append(f"{key}={names} names a {noun.split()[-1]} twice")
    for n, opts in options.items():
        if n in registry:
            problems += option_problems(registry[n], opts, f"{options_key}.{n}", values=n in names)
    for n in dict.fromkeys(names):
        if n in registry and n not in options:
            problems += option_problems(registry[n], {}, f"{options_key}.{n}")
    return names, problems


def specialists_merges_problems(names: Sequence[str], options: Mapping[str, Mapping] | None = None
                                ) -> tuple[list[str], list[str]]:
    """(names, every problem) of the specialists study's merges and ``merge_options``."""
    return _registry_problems(SPECIALIST_MERGES, names, options, "merges", "merge_options",
                              "a new one is a function registered with microbench.studies.methods.specialists_merge, "
                              "imported with plugins=[<module>]")


def check_specialists_merges(names: Sequence[str], options: Mapping[str, Mapping] | None = None) -> list[str]:
    """The specialists study's merges, checked: every problem in one line."""
    names, problems = specialists_merges_problems(names, options)
    if problems:
        raise UserError("; ".join(problems))
    return names


def specialists_merge_paths(name: str, inputs: SpecialistsInputs, options: Mapping | None = None) -> list[MergePath]:
    """The paths of specialists merge ``name`` with ``options`` over its defaults (labels unique per merge)."""
    method = SPECIALIST_MERGES[name]
    return method.paths(inputs, **{**method.defaults, **dict(options or {})})


def methods_problems(names: Sequence[str], options: Mapping[str, Mapping] | None = None
                     ) -> tuple[list[str], list[str]]:
    """(names, every problem) of the study's methods and ``study.options``: none named, unknown names, repeats,
    unknown options, refused values."""
    names, problems = _registry_problems(METHODS, names, options, "study.methods", "study.options",
                                         "a new one is a function registered with "
                                         "microbench.studies.methods.merge_method", noun="merge method")
    if not names:
        problems.insert(0, f"study.methods=[] studies nothing: name one or more of {', '.join(METHODS)}")
    return names, problems


def check_methods(names: Sequence[str], options: Mapping[str, Mapping] | None = None) -> list[str]:
    """The study's methods, checked: every problem in one line."""
    names, problems = methods_problems(names, options)
    if problems:
        raise UserError("; ".join(problems))
    return names


def method_paths(name: str, inputs: MergeInputs, options: Mapping | None = None) -> list[MergePath]:
    """The paths of method ``name`` with ``options`` over its defaults."""
    method = METHODS[name]
    return method.paths(inputs, **{**method.defaults, **dict(options or {})})


# --- the methods ----------------------------------------------------------------------------------------------------

@merge_method("wise_ft", "WiSE-FT: (1 − α)·θ_base + α·θ_ft (Wortsman et al., 2022)")
def _wise_ft(inputs: MergeInputs) -> list[MergePath]:
    return [MergePath("wise_ft", "wise_ft", inputs.base, inputs.finetuned, True, True)]


@merge_method("lines", "LiNeS: task vector scaled by α + (1 − α)·ℓ/(L − 1) per residual block (Wang et al., 2025)")
def _lines(inputs: MergeInputs) -> list[MergePath]:
    if not inputs.depths:
        raise UserError("lines: no residual blocks found in the model's weights (keys like '...resblocks.<i>.', "
                        "'...layers.<i>.', '...blocks.<i>.'): LiNeS needs a layered model; drop it from study.methods")
    start = lines(inputs.base, inputs.finetuned, 0.0, inputs.depths, inputs.keys)
    return [MergePath("lines", "lines", start, inputs.finetuned, starts_at_base=False, ends_at_finetuned=True)]


def _check_model_stock(finetuned: Sequence[str] = ()) -> None:
    from pathlib import Path

    files = [finetuned] if isinstance(finetuned, str) else list(finetuned or [])
    if not files:
        raise UserError("model_stock needs a second fine-tune of the same base (e.g. another seed): pass "
                        "'study.options.model_stock.finetuned=[<its .ckpt>]'")
    missing = [f for f in files if not Path(str(f)).is_file()]
    if missing:
        raise UserError(f"study.options.model_stock.finetuned: {missing[0]} is not a file: pass the .ckpt of another "
                        "fine-tune of the same base")


@merge_method("ties_trim", "TIES trim: the top-k share of the task vector's magnitudes, × α (Yadav et al., 2023)")
def _ties_trim(inputs: MergeInputs, density: Density = 0.2, per_tensor: bool = False) -> list[MergePath]:
    end = ties_merge(inputs.base, [inputs.finetuned], density=float(density), keys=inputs.keys,
                     per_tensor=bool(per_tensor))
    return [MergePath("ties_trim", "ties_trim", inputs.base, end)]


@merge_method("dare", "DARE: drop delta entries with probability p, rescale by 1/(1 − p), × α (Yu et al., 2024)")
def _dare(inputs: MergeInputs, p: DropProbability = 0.5, seeds: Seeds = (0, 1, 2)) -> list[MergePath]:
    seeds = [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    vector = task_vector(inputs.base, inputs.finetuned, inputs.keys)
    return [MergePath("dare", f"dare[seed={s}]", inputs.base, add_vector(inputs.base, dare(vector, float(p), s)),
                      seed=s) for s in seeds]


@merge_method("model_stock", "Model Stock: t·mean(θ_ft) + (1 − t)·θ_base per tensor, t from the angle between two "
              "fine-tunes' task vectors (Jang et al., 2024), × α", check=_check_model_stock)
def _model_stock(inputs: MergeInputs, finetuned: Sequence[str] = ()) -> list[MergePath]:
    if not inputs.more_finetuned:
        raise UserError("model_stock needs a second fine-tune of the same base (e.g. another seed): pass "
                        "'study.options.model_stock.finetuned=[<its .ckpt>]'")
    end = model_stock(inputs.base, [inputs.finetuned, *inputs.more_finetuned], inputs.keys)
    return [MergePath("model_stock", "model_stock", inputs.base, end)]


# --- merges of many specialists (the specialists study) ----------------------------------------------------------

def _as_list(x) -> list:
    return [x] if isinstance(x, int | float | str) else list(x or [])


#: one density or a non-empty list of them (one path each)
Densities = Density | Annotated[tuple[Density, ...], MinLen(1)]


@specialists_merge("uniform_soup", "uniform soup: the specialists' mean (Wortsman et al., 2022)", scaled=False)
def _soup(inputs: SpecialistsInputs) -> list[MergePath]:
    return [MergePath("uniform_soup", "uniform_soup", inputs.base,
                      {**inputs.base, **uniform_soup(inputs.finetuned, inputs.keys)})]


@specialists_merge("task_arithmetic", "task arithmetic: base + λ·Σ τ_i, λ on val (Ilharco et al., 2023)")
def _task_arithmetic(inputs: SpecialistsInputs) -> list[MergePath]:
    return [MergePath("task_arithmetic", "task_arithmetic", inputs.base,
                      task_arithmetic(inputs.base, inputs.finetuned, 1.0, inputs.keys))]


@specialists_merge("ties", "TIES: base + λ·TIES(τ_1..τ_n; k), k and λ on val (Yadav et al., 2023)")
def _ties(inputs: SpecialistsInputs, densities: Densities = (0.1, 0.2)) -> list[MergePath]:
    return [MergePath("ties", f"ties[k={float(k):g}]", inputs.base,
                      ties_merge(inputs.base, inputs.finetuned, float(k), 1.0, inputs.keys))
            for k in _as_list(densities)]


@specialists_merge("dare", "DARE + task arithmetic: base + λ·Σ DARE_p(τ_i), λ on val (Yu et al., 2024)")
def _dare_merge(inputs: SpecialistsInputs, p: DropProbability = 0.5, seeds: Seeds = (0,)) -> list[MergePath]:
    out = []
    for s in (int(x) for x in _as_list(seeds)):  # specialist i's mask: seed 1000·s + i (independent per model)
        vector: dict = {}
        for i, ft in enumerate(inputs.finetuned):
            for k, v in dare(task_vector(inputs.base, ft, inputs.keys), float(p), 1000 * s + i).items():
                vector[k] = vector[k] + v if k in vector else v
        out.append(MergePath("dare", f"dare[seed={s}]", inputs.base, add_vector(inputs.base, vector), seed=s))
    return out


@specialists_merge("model_stock", "Model Stock over the specialists: t·θ̄ + (1 − t)·base (Jang et al., 2024)",
                   scaled=False)
def _model_stock_merge(inputs: SpecialistsInputs) -> list[MergePath]:
    return [MergePath("model_stock", "model_stock", inputs.base,
                      model_stock(inputs.base, list(inputs.finetuned), inputs.keys))]
