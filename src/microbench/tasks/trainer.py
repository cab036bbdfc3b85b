"""What every task shares: the start of a run and the wrapper it runs in, models, loggers and callbacks built from
the config, the fitted checkpoints, and sending a record to the loggers (a fit's forgetting study is wired in
``tasks/study.py``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from microbench.errors import UserError, user_error_of
from microbench.models.inference import InferenceSettings
from microbench.results.io import check_output_dir, clean_stale_temporaries, write_json
from microbench.tasks.validate import check_config

#: what a model config can build; a task function serves one (task, family) pair (tasks/registry.py)
FAMILIES = ("contrastive", "generative", "random")


def container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def bootstrap_settings(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.bootstrap, resolve=True)


def start_run(cfg: DictConfig) -> tuple[float, Path]:
    """The common start of every task: a start time, the output folder (created, writable, leftovers of a killed
    run removed), the data path and the loggers checked before any model is built, then the seed (``cfg.seed``)."""
    t0 = time.perf_counter()
    out_dir = check_output_dir(cfg.paths.output_dir)
    if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        clean_stale_temporaries(out_dir)
    data = cfg.get("data") or {}
    if data.get("path") is not None:  # before any model is built: a typo must not cost a download first
        from microbench.data.loading import check_data_path

        check_data_path(data.get("path"))
    check_loggers(cfg)
    L.seed_everything(int(cfg.get("seed", 0)), workers=True)
    return t0, out_dir


# --- models ---------------------------------------------------------------------------------------------------

def model_family(model_cfg: DictConfig) -> str:
    """The family of what ``model_cfg`` builds, declared by its ``_target_`` (a class's or factory's ``family``
    attribute: :class:`~microbench.models.backbones.base.Backbone` and ``build_backbone`` are ``contrastive``,
    the generative backends ``generative``, :class:`~microbench.models.zero_shot.RandomBaseline` ``random``),
    read without building the model."""
    target = model_cfg.get("_target_") if model_cfg is not None else None
    if not target:
        raise UserError("the model config has no _target_: choose a preset (model=tiny, model=openclip, "
                        "model=random, model=openai_compatible, ...) or set model._target_")
    try:
        obj = get_object(str(target))
    except Exception as err:  # noqa: BLE001 - any import failure of a user's target is the same one line
        raise UserError(f"model._target_={target} cannot be imported ({type(err).__name__}: {err}); check the "
                        "name and that its package is installed") from err
    family = getattr(obj, "family", None)
    if family not in FAMILIES:
        raise UserError(f"model._target_={target} does not declare its family (a `family` attribute, one of "
                        f"{', '.join(FAMILIES)}): subclass microbench.models.backbones.base.Backbone for a "
                        "contrastive model")
    return family


def build_model(model_cfg: DictConfig, inference: DictConfig | None = None):
    """The model ``model_cfg`` names (its ``_target_``), checked to be of the family its target declares; a
    backbone encodes as ``inference`` says in evaluation (``configs/inference/``)."""
    family = model_family(model_cfg)
    settings = InferenceSettings.of(inference) if inference is not None else None  # checked before any build
    try:
        model = instantiate(model_cfg)
    except Exception as err:  # Hydra wraps what the target raises: a user-fixable error stays itself
        cause = user_error_of(err)
        if cause is None:
            raise
        raise cause from None
    if getattr(model, "family", None) != family:
        raise UserError(f"model._target_={model_cfg._target_} declares the {family} family but built a "
                        f"{type(model).__name__} of family {getattr(model, 'family', None)!r}")
    if settings is not None and hasattr(model, "set_inference"):
        model.set_inference(settings)
    return model


# --- loggers and callbacks ------------------------------------------------------------------------------------

def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def check_loggers(cfg: DictConfig) -> None:
    """``logger=wandb`` without a login and without an offline mode would stop at the first log call (or prompt
    for a key): say how to log in or go offline, before any work."""
    for name, lg in (cfg.get("logger") or {}).items():
        if lg is None or not str(lg.get("_target_", "")).endswith("WandbLogger"):
            continue
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if lg.get("offline") or mode in ("offline", "dryrun", "disabled") or _wandb_logged_in():
            continue
        raise UserError(f"logger={name} needs a W&B login: run `wandb login` (or set WANDB_API_KEY), or log offline "
                        "with WANDB_MODE=offline (or logger.wandb.offline=true) and `wandb sync` later")


def instantiate_loggers(cfg: DictConfig, **overrides: dict) -> list:
    """The loggers of ``cfg.logger`` (an empty list for ``logger=none``); ``overrides``: per logger name, keyword
    arguments that replace its config's (e.g. ``wandb={"group": ...}``)."""
    check_loggers(cfg)
    loggers = [instantiate(lg, **overrides.get(name, {})) for name, lg in (cfg.get("logger") or {}).items()
               if lg is not None]
    OPEN_LOGGERS.extend(loggers)
    return loggers


#: the loggers this process opened and has not closed yet (:func:`run_task` closes them whatever happens)
OPEN_LOGGERS: list = []


def close_loggers(loggers, status: str = "success") -> None:
    """Flush and finish the run's loggers: the W&B run is complete on disk (or synced) when the task returns, and a
    later task in the same process starts its own run; ``status="failed"`` marks the W&B run failed."""
    for lg in list(loggers or []):
        if any(lg is x for x in OPEN_LOGGERS):
            OPEN_LOGGERS[:] = [x for x in OPEN_LOGGERS if x is not lg]
        lg.save()
        lg.finalize(status)
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.run.finish(exit_code=0 if status == "success" else 1)


def run_task(task, cfg: DictConfig, settings=None, first: list[str] | tuple = (), find=None):
    """Run one task function, as lightning-hydra-template's task wrapper: the config is checked first (every
    problem at once: ``first``, the entry's ``settings`` schema, every node; :func:`~microbench.tasks.validate.
    check_config`); whatever happens, the loggers it opened are closed (a failed run's W&B run is marked failed
    and its CSV flushed, so a multirun's next job starts its own); a task that raises leaves ``failed.json`` in
    its run folder (what went wrong and where), then re-raises. ``find`` (the entry's dispatch, run after the
    check when ``task`` is None) returns the task function."""
    already_open = list(OPEN_LOGGERS)
    status = "failed"
    try:
        check_config(cfg, settings, first)  # every key of every node it builds, all problems at once, before any work
        if task is None:
            task = find()
        result = task(cfg)
        status = "success"
        return result
    except BaseException as err:
        leave_failure(cfg, err)
        raise
    finally:
        close_loggers([lg for lg in OPEN_LOGGERS if not any(lg is x for x in already_open)], status)


def leave_failure(cfg: DictConfig, err: BaseException) -> Path | None:
    """``<paths.output_dir>/failed.json`` (rank 0 only): the error, whether it is the user's to fix, and when."""
    import datetime

    if os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    try:
        out = Path(str(cfg.paths.output_dir))
        kind = "interrupted" if isinstance(err, KeyboardInterrupt) else "user error" if user_error_of(err) else \
            "exit" if isinstance(err, SystemExit) else "crash"
        message = str(user_error_of(err) or err).strip().splitlines()
        return write_json(out / "failed.json", {
            "error": f"{type(err).__name__}: {message[0] if message else ''}".rstrip(": "), "kind": kind,
            "task": str(cfg.get("task")), "failed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "note": "this run wrote no record; its log is beside this file"})
    except Exception:  # noqa: BLE001 - the run's own error is the one to report, not this note's
        return None


def instantiate_callbacks(cfg: DictConfig) -> dict:
    """The configured callbacks by name, as their configs say (checkpoint folders: ``dirpath: ${checkpoint_dir}``
    in ``configs/callbacks/default.yaml``). The learning-rate monitor is left out when nothing can receive what it
    logs (``logger=none``, ``debug=fast_dev_run``)."""
    named = {}
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None:
            continue
        if str(cb_cfg.get("_target_", "")).endswith("LearningRateMonitor") and (
                not cfg.get("logger") or cfg.trainer.get("fast_dev_run")):
            continue
        named[name] = instantiate(cb_cfg)
    return named


def fitted_checkpoints(trainer: L.Trainer, callbacks: dict, ckpt_dir: Path) -> tuple[str, str]:
    """(best, last) checkpoint paths of a fit ("" when not written). In a spawned fit the callbacks' paths live in
    the workers, so they are found in ``ckpt_dir``."""
    best_cb, last_cb = callbacks.get("model_checkpoint"), callbacks.get("last_checkpoint")
    best = (best_cb.best_model_path if best_cb is not None else "") or ""
    last = (last_cb.best_model_path if last_cb is not None else "") or ""
    if not trainer.is_global_zero or trainer.strategy.launcher is not None:
        best = best or _newest(ckpt_dir, "best_epoch*.ckpt")
        last = last or _newest(ckpt_dir, "last.ckpt")
    return best, last


def fit_model(cfg: DictConfig, module: L.LightningModule, datamodule, study=None) -> tuple[L.Trainer, str, str]:
    """What every fitting task does: the configured callbacks (and a fit's forgetting study, ``study``), a Trainer
    with the loggers, the fit (resumed from ``ckpt_path``), and the (best, last) checkpoints it wrote."""
    ckpt_dir = Path(cfg.checkpoint_dir)  # resolved once (its ${now:...}), the callbacks' dirpath
    named = instantiate_callbacks(cfg)
    callbacks = [*named.values(), *([study] if study is not None else [])]
    trainer = trainer_for(cfg, callbacks=callbacks, logger=instantiate_loggers(cfg) or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    best, last = fitted_checkpoints(trainer, named, ckpt_dir)
    return trainer, best, last


def _newest(folder: Path, pattern: str) -> str:
    found = sorted(Path(folder).glob(pattern))
    return str(found[-1]) if found else ""


def trainer_for(cfg: DictConfig, **kwargs) -> L.Trainer:
    """``cfg.trainer`` with the task's own settings (callbacks, loggers, no checkpointing for evaluations)."""
    return instantiate(cfg.trainer, **kwargs)


#: metric-name prefixes of the records sent to loggers by tasks that run without a Trainer logger
LOG_PREFIX = {"cognition": "cog", "localization": "loc", "generative_perception": "gen"}


def log_record(cfg: DictConfig, record, results_md: Path | None = None) -> None:
    """Send a run record's metrics to the configured loggers (CSV, W&B), for tasks that score without a Trainer
    logger; with W&B also the ``results.md`` text."""
    loggers = instantiate_loggers(cfg)
    prefix = LOG_PREFIX.get(record.task, "")
    values = {f"{prefix}/{k}": v["value"] for k, v in record.metrics.items()
              if isinstance(v, dict) and isinstance(v.get("value"), int | float)}
    for lg in loggers:
        lg.log_metrics(values)
        if hasattr(lg, "log_text") and results_md is not None:
            lg.log_text(key=f"{prefix}/results", columns=["results.md"], data=[[Path(results_md).read_text()]])
    close_loggers(loggers)
