"""Dispatch as data: (task, model family) → the task function. The entry points call :func:`train`,
:func:`evaluate` and :func:`forgetting`; a new task is one function and one row here.

The family of a model is declared by what its config builds (``model._target_``: a
:class:`~microbench.models.backbones.base.Backbone` or ``build_backbone`` is ``contrastive``, the generative
backends ``generative``, :class:`~microbench.models.zero_shot.RandomBaseline` ``random``), read without building
it (:func:`microbench.tasks.trainer.model_family`).
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from microbench.errors import UserError
from microbench.results.record import RunRecord
from microbench.tasks import cognition, finetune, linear_probe, localization, perception
from microbench.tasks import forgetting as forgetting_task
from microbench.tasks import specialists as specialists_task
from microbench.tasks.settings import EvalSettings, ForgettingSettings, SpecialistsSettings, TrainSettings
from microbench.tasks.trainer import model_family, run_task

Task = Callable[[DictConfig], tuple[RunRecord, dict]]

#: ``python src/eval.py task=<task> model=<a model of this family>``
EVALUATE: dict[tuple[str, str], Task] = {
    ("perception", "contrastive"): perception.zero_shot,
    ("perception", "random"): perception.random,
    ("perception", "generative"): perception.generative,
    ("cognition", "contrastive"): cognition.contrastive,
    ("cognition", "generative"): cognition.generative,
    ("cognition", "random"): cognition.random,
    ("localization", "contrastive"): localization.evaluate_head,
    ("localization", "generative"): localization.evaluate_generative,
}

#: ``python src/train.py task=<task>``: every training task fits a contrastive (CLIP-style) backbone
TRAIN: dict[tuple[str, str], Task] = {
    ("finetune", "contrastive"): finetune.run,
    ("linear_probe", "contrastive"): linear_probe.run,
    ("localization", "contrastive"): localization.train,
}

#: ``python src/forgetting.py``
FORGETTING: dict[tuple[str, str], Task] = {("forgetting", "contrastive"): forgetting_task.run}
#: ``python src/specialists.py``
SPECIALISTS: dict[tuple[str, str], Task] = {("specialists", "contrastive"): specialists_task.run}


def tasks_of(table: dict[tuple[str, str], Task]) -> list[str]:
    return list(dict.fromkeys(t for t, _ in table))


def task_problem(table: dict[tuple[str, str], Task], task: str) -> list[str]:
    """The one line for a task the table lacks (none when it has it)."""
    tasks = tasks_of(table)
    return [] if task in tasks else [f"task must be one of {', '.join(tasks)}; got {task!r}"]


def lookup(table: dict[tuple[str, str], Task], task: str, family_of: Callable[[], str], entry: str) -> Task:
    """The function for (task, family), or one line saying what exists (the task is checked first, before the
    model's family is read)."""
    problem = task_problem(table, task)
    if problem:
        raise UserError(problem[0])
    family = family_of()
    if (task, family) in table:
        return table[(task, family)]
    families = [f for t, f in table if t == task]
    raise UserError(f"{entry} task={task} needs a {' or '.join(families)} model; this model is {family} "
                    f"(e.g. model=tiny, model=openclip for contrastive; model=openai_compatible for generative)")


def dispatch(table: dict[tuple[str, str], Task], cfg: DictConfig, task: str, family_of: Callable[[], str],
             settings) -> tuple[RunRecord, dict]:
    """Check the config against the entry's ``settings`` schema (:mod:`microbench.tasks.settings`), a task the table
    lacks among every other problem, then look the task function up and run it
    (:func:`~microbench.tasks.trainer.run_task`)."""
    return run_task(None, cfg, settings, task_problem(table, task),
                    find=lambda: lookup(table, task, family_of, settings.entry))


def evaluate(cfg: DictConfig) -> tuple[RunRecord, dict]:
    return dispatch(EVALUATE, cfg, str(cfg.get("task", "perception")), lambda: model_family(cfg.model), EvalSettings)


def train(cfg: DictConfig) -> tuple[RunRecord, dict]:
    return dispatch(TRAIN, cfg, str(cfg.get("task", "finetune")), lambda: model_family(cfg.model), TrainSettings)


def forgetting(cfg: DictConfig) -> tuple[RunRecord, dict]:
    return dispatch(FORGETTING, cfg, "forgetting", lambda: model_family(forgetting_task.base_model_config(cfg.base)),
                    ForgettingSettings)


def specialists(cfg: DictConfig) -> tuple[RunRecord, dict]:
    return dispatch(SPECIALISTS, cfg, "specialists", lambda: "contrastive", SpecialistsSettings)
