"""What every Hydra job does around its task (:mod:`microbench.jobs`): the argv checks and renames before Hydra
composes (:func:`start`), the ``mb_run_dir`` resolver, the console filter. Below ``tasks/`` (``tasks/study.py`` reads
:data:`RENAMED`); it imports no task."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from microbench.resources import CHECKOUT, CONFIG_DIR


def start(job: str) -> None:
    """What every job does before Hydra composes: ``PROJECT_ROOT`` (read by ``configs/paths``) = the checkout, unless
    set (an installed copy writes under the working folder), then the argv checks and renames."""
    if CHECKOUT is not None:
        os.environ.setdefault("PROJECT_ROOT", str(CHECKOUT))
    normalize_overrides(sys.argv)
    rename_overrides(sys.argv, job)
    check_specialty_overrides(sys.argv, CONFIG_DIR)
    register_resolvers()
    preflight_output_dir(sys.argv)


def preflight_output_dir(argv: list[str]) -> None:
    """``paths.output_dir=`` is also Hydra's run folder, which Hydra creates before the job starts: a path that is a
    file or cannot be written is one line (exit 2) here, not a traceback from Hydra."""
    value = run_dir(argv[1:], "")
    if not value or "${" in value:
        return
    from microbench.results.io import check_output_dir

    try:
        check_output_dir(value)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class ConsoleNoiseFilter:
    """The console handler's filter (``configs/hydra/default.yaml``): what matters, once. Dropped from the console
    (kept in the run's log file): Lightning's advert for litlogger, repeats of Lightning's one-per-Trainer lines
    (``GPU available``, ``Seed set``...), open_clip's INFO chatter."""

    ADVERTS = ("litlogger", "💡 Tip")

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def filter(self, record) -> bool:
        import logging

        msg = record.getMessage()
        if any(a in msg for a in self.ADVERTS):
            return False
        if record.levelno < logging.WARNING and "open_clip" in (record.pathname or ""):
            return False
        if record.name.startswith("lightning") and record.levelno < logging.WARNING:
            if msg in self.seen:
                return False
            self.seen.add(msg)
        return True


def setup_console() -> None:
    """Called first in each entry point, after Hydra configured logging: Lightning's own console handler (added
    when it is imported before logging is configured) goes, so each of its lines is printed once, by Hydra's handler;
    known deprecation chatter of dependencies is silenced."""
    import logging
    import warnings

    import lightning  # noqa: F401 - its import adds the console handler removed here

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True
    for name in ("httpx", "httpcore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck.*")


def run_dir(overrides, default: str) -> str:
    """``hydra.run.dir``: the ``paths.output_dir=`` given on the command line (so the Hydra log and ``.hydra/`` land
    in the run's own folder), else ``default``."""
    chosen = default
    for item in overrides or []:
        key, sep, value = str(item).partition("=")
        if sep and key.lstrip("+~") == "paths.output_dir" and value:
            chosen = value
    return chosen


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mb_run_dir"):
        OmegaConf.register_new_resolver("mb_run_dir", run_dir)


#: group overrides Hydra cannot take as written: ``logger=null`` (Hydra reads null as "no value" and stops with
#: "Config group override must be a string") selects the ``none`` option of the group
NULL_GROUPS = ("logger",)


#: settings that moved, per entry point: old override name → new (the forgetting study's are the ``study`` group)
RENAMED = {
    "train": {"forgetting.alphas": "study.alphas", "forgetting.extrapolate": "study.extrapolate",
              "forgetting.towers": "study.towers", "forgetting.keep_target_gain": "study.selection.keep_target_gain",
              "forgetting.n_resamples": "bootstrap.n_resamples", "forgetting.result_cache": "study.result_cache"},
    "forgetting": {"alphas": "study.alphas", "extrapolate": "study.extrapolate", "towers": "study.towers",
                   "selection.keep_target_gain": "study.selection.keep_target_gain",
                   "result_cache": "study.result_cache"},
}


#: renamed in every job: what a run is called (its folders, its W&B name) is ``run_name``; ``task`` is what runs
RENAMED_IN_EVERY_JOB = {"task_name": "run_name"}
WHY_RENAMED = {"run_name": "`task` is what runs, `run_name` what the run is called: its folders and W&B name"}


def rename_overrides(argv: list[str], script: str) -> list[str]:
    """Old override names keep working: each is rewritten in place to its new name (:data:`RENAMED`,
    :data:`RENAMED_IN_EVERY_JOB`), with one line on stderr naming the new one."""
    table = {**RENAMED.get(script, {}), **RENAMED_IN_EVERY_JOB}
    for i, arg in enumerate(argv[1:], 1):
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        name, eq, value = arg[len(prefix):].partition("=")
        if name in table:
            new = table[name]
            why = WHY_RENAMED.get(new, "the study's settings are the `study` config group, configs/study/")
            argv[i] = f"{prefix}{new}{eq}{value}"
            print(f"note: {name}= is now {new}= ({why}); using {new}{eq}{value}", file=sys.stderr)
    return argv


def check_specialty_overrides(argv: list[str], configs: Path) -> None:
    """``specialty=<name>`` (also a multirun's ``a,b,c``) names presets of ``configs/specialty/``: an unknown one is
    one ``error:`` line naming the presets and the custom form (exit 2), before Hydra composes anything."""
    presets = sorted(p.stem for p in (configs / "specialty").glob("*.yaml"))
    for arg in argv[1:]:
        name, eq, value = arg.lstrip("+~").partition("=")
        if name != "specialty" or not eq:
            continue
        unknown = [v for v in value.split(",") if v and v not in presets and v not in ("null", "none")]
        if unknown:
            print(f"error: specialty={unknown[0]} is not a preset; presets: {', '.join(presets)}; any other group: "
                  "specialty=custom specialty.axis=<domain|subdomain|modality|submodality|stain|institution> "
                  "'specialty.value=<value>'", file=sys.stderr)
            raise SystemExit(2)


def normalize_overrides(argv: list[str]) -> list[str]:
    """Rewrite ``<group>=null`` to ``<group>=none`` in place (the documented way to switch a group off)."""
    for i, arg in enumerate(argv[1:], 1):
        for group in NULL_GROUPS:
            if arg in (f"{group}=null", f"{group}=None", f"{group}=~"):
                argv[i] = f"{group}=none"
    return argv
