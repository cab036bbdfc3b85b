"""The schema of each entry's root settings and of its config groups that build no target: one dataclass each,
read by the pre-run check (:func:`microbench.tasks.validate.settings_problems`) as a target's signature is read, so
every problem of a composed config is reported at once, before any work, each with its fix.

A field states what it may hold in its annotation (:mod:`microbench.options`: ``PositiveInt``, a ``Literal``, a
list of them), and a required one how to give it (its ``required`` metadata). A nested dataclass is a group
(``bootstrap``; optional: ``specialty``) whose keys must be its fields; a root key that is neither a field nor a
config group is named with the closest field. ``task`` is checked by the entry's dispatch table
(:mod:`microbench.tasks.registry`), the ``study`` group by :func:`microbench.tasks.study.study_problems` wherever
a study will run, the specialists' merges by :func:`microbench.tasks.specialists.merges_problems`
(``more_problems``). The defaults are the YAML's (``configs/<entry>.yaml``); a test holds them equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from microbench.data.cognition import FORMATS
from microbench.data.specialty import AXES
from microbench.generative.boxes import PROMPTS
from microbench.models.inference import InferenceSettings
from microbench.models.zero_shot import SOURCES
from microbench.options import NonNegativeFloat, OpenShare, PositiveInt
from microbench.tasks.specialists import merges_problems
from microbench.tasks.study import study_problems


@dataclass(frozen=True)
class BootstrapSettings:
    """``bootstrap``: every confidence interval of a run (percentile/BCa resamples, level, seed)."""

    n_resamples: PositiveInt = 9999
    confidence: OpenShare = 0.95
    seed: int = 0


@dataclass(frozen=True)
class CognitionSettings:
    """``cognition`` (src/eval.py task=cognition): where the expert multiple-choice questions are."""

    path: str = "sample"
    format: Literal[FORMATS] = "auto"
    split: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class EvalSettings:
    """The root of ``configs/eval.yaml``."""

    entry: ClassVar[str] = "src/eval.py"
    run_name: str = "eval"
    task: str = "perception"
    box_format: Literal[tuple(PROMPTS)] | None = None
    checkpoint: str | None = None
    seed: int = 0
    sources: tuple[Literal[SOURCES], ...] = ("captions",)
    text_batch_size: PositiveInt = 256
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    cognition: CognitionSettings = field(default_factory=CognitionSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)


@dataclass(frozen=True)
class ProbeSettings:
    """``probe`` (src/train.py task=linear_probe): the shots, seeds and weight decays of every probe."""

    shots: tuple[Literal["full"] | PositiveInt, ...] = ("full", 1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    weight_decays: tuple[NonNegativeFloat, ...] | None = None  # 0: no penalty (a user may ask for it)
    zs_init: bool = False
    cache_dir: str | None = None


@dataclass(frozen=True)
class SpecialtySettings:
    """``specialty`` (configs/specialty/): the corner of μ-Bench a specialist is fine-tuned on."""

    name: str | None = None
    axis: Literal[AXES] | None = None
    value: str | None = None
    datasets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ForgettingSwitch:
    """``forgetting`` (src/train.py): whether a fit ends with the forgetting study."""

    enabled: bool = False


@dataclass(frozen=True)
class TrainSettings:
    """The root of ``configs/train.yaml`` (the ``study`` group is checked when ``forgetting.enabled``)."""

    entry: ClassVar[str] = "src/train.py"
    run_name: str = "train"
    task: str = "finetune"
    seed: int = 0
    checkpoint_dir: str | None = None
    ckpt_path: str | None = None
    init_from: str | None = None
    chain: bool = False
    test_after_fit: bool = True
    eval_in_domain: bool = True
    recipe_name: str | None = None  # a recipe names itself (configs/recipe/); experiment=compare_recipes reads it
    compare_recipes: bool = False  # -m: the recipes table when every job is done (tasks/hydra_callbacks.py)
    study_specialists: bool = False  # -m: the specialists study when every job is done
    specialists_overrides: tuple[str, ...] = ()
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    forgetting: ForgettingSwitch = field(default_factory=ForgettingSwitch)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    specialty: SpecialtySettings | None = None
    inference: InferenceSettings = field(default_factory=InferenceSettings)

    more_problems: ClassVar = staticmethod(
        lambda cfg: study_problems(cfg) if (cfg.get("forgetting") or {}).get("enabled") is True else [])


@dataclass(frozen=True)
class ForgettingSettings:
    """The root of ``configs/forgetting.yaml`` (and its ``study`` group, always)."""

    entry: ClassVar[str] = "src/forgetting.py"
    run_name: str = "forgetting"
    base: dict | None = None  # the base model's node (model@base: a preset of configs/model/), checked as a target
    finetuned: str | None = field(default=None, metadata={
        "required": "pass finetuned=<a .ckpt written by src/train.py (train_metrics.json names it)>"})
    base_checkpoint: str | None = None
    target_datasets: tuple[str, ...] | None = None
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)

    more_problems: ClassVar = staticmethod(study_problems)


@dataclass(frozen=True)
class SpecialistsSettings:
    """The root of ``configs/specialists.yaml`` (and its ``merges`` with their ``merge_options``, after ``plugins``
    are imported)."""

    entry: ClassVar[str] = "src/specialists.py"
    run_name: str = "specialists"
    runs: str | tuple[str, ...] | None = field(default=None, metadata={
        "required": "pass runs=<the multirun folder of experiment=specialist> (or runs=[<run>,<run>,...])"})
    data_path: str | None = None
    checkpoint: Literal["last", "best"] = "last"
    chain: bool = False
    lambdas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    merges: tuple[str, ...] = ("uniform_soup", "task_arithmetic", "ties")
    merge_options: dict | None = None  # {merge: {option: value}}: checked with the merges (studies.methods)
    plugins: tuple[str, ...] = ()
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)

    more_problems: ClassVar = staticmethod(lambda cfg: merges_problems(cfg)[2])


#: the schema of each entry point's root (``configs/<entry>.yaml``)
ENTRY_SETTINGS = {"eval": EvalSettings, "train": TrainSettings, "forgetting": ForgettingSettings,
                  "specialists": SpecialistsSettings}
