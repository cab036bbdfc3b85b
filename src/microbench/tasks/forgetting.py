"""``python src/forgetting.py``: base model (a preset or a checkpoint) + fine-tuned checkpoint → the forgetting
study (base vs fine-tuned vs every merge method's θ(α) on the whole benchmark, α chosen on val; the ``study``
config group says which methods and how), written to
``paths.output_dir`` by :func:`microbench.studies.forgetting.run_study` (``forgetting.json``, ``forgetting.md``,
plots, per-α predictions)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from microbench.data.config import localization_dm_factory, make_eval_dm
from microbench.errors import UserError
from microbench.models.localization import detector_from_checkpoint
from microbench.resources import CONFIG_DIR
from microbench.results.io import read_json, write_json
from microbench.results.record import RunRecord, run_name_of
from microbench.studies.forgetting import load_finetuned_state, run_study
from microbench.studies.merging import MergeError
from microbench.studies.report import write_report
from microbench.studies.sweep import LocalizationSweeper
from microbench.tasks.localization import build_from_record
from microbench.tasks.records import new_record, run_context
from microbench.tasks.study import study_spec
from microbench.tasks.trainer import (
    build_model,
    close_loggers,
    container,
    instantiate_loggers,
    start_run,
    trainer_for,
)

#: the model presets (``configs/model/<name>.yaml``), for ``base=<name>`` given as a string
PRESETS = CONFIG_DIR / "model"


def base_model_config(base) -> DictConfig:
    """``base`` as a model config: the composed preset (``model@base=tiny``), or a preset named on the command line
    (``base=tiny``, which Hydra gives as a plain string)."""
    if not isinstance(base, str):
        return base
    presets = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    if base not in presets:
        raise UserError(f"base={base!r} is not a model preset; presets: {', '.join(presets)} (or base_checkpoint=...)")
    cfg = OmegaConf.load(PRESETS / f"{base}.yaml")
    cfg.pop("defaults", None)
    return cfg


def study_on_every_rank(trainer, study_fn, out_dir: Path, run_id: str):
    """``study_fn(device=...)`` in this process, or under trainer=ddp|ddp_sim on every rank (each takes its shard of
    the images; :class:`StudyInProcessGroup`), the study read back on every rank."""
    if trainer.world_size > 1:
        runner = StudyInProcessGroup(study_fn, Path(out_dir) / f".study-{run_id}.json")
        trainer.test(runner, verbose=False)
        return runner.read_back()
    return study_fn(device=trainer.strategy.root_device)


def study_group(cfg: DictConfig, fit_task: str | None) -> dict:
    """A study of a checkpoint joins the W&B group of the fit that wrote it (the fit's run name), unless the
    config names another group (``logger.wandb.group=...``)."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    if wandb is None or not fit_task or wandb.get("group") != cfg.run_name:
        return {}
    return {"wandb": {"group": fit_task}}


def run(cfg: DictConfig) -> tuple[RunRecord, dict]:
    spec = study_spec(cfg)
    t0, out_dir = start_run(cfg)  # output folder writable, data path there, before the model is built
    if isinstance(cfg.base, str):  # base=<preset> as a string: the preset, its interpolations (${data.path}...)
        with open_dict(cfg):       # resolved against this run's config
            cfg.base = base_model_config(cfg.base)
    backbone = build_model(cfg.base, cfg.get("inference"))
    if cfg.get("base_checkpoint"):
        base_state, _ = load_finetuned_state(cfg.base_checkpoint, backbone, key="base_checkpoint")
    else:
        base_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    ft_state, record = load_finetuned_state(cfg.finetuned, backbone)
    localization = None
    hp = record.get("hyper_parameters") or {}
    if "class_names" in hp:  # a localization checkpoint: score its head on every θ(α) too
        module, _ = detector_from_checkpoint(record["checkpoint"], backbone=backbone,
                                             build_backbone=build_from_record)
        loc_record = hp.get("record") or {}
        make_loc = localization_dm_factory(cfg.data, loc_record.get("targets", "boxes"), list(hp["class_names"]))
        localization = LocalizationSweeper(module, make_loc, accelerator=cfg.trainer.get("accelerator", "cpu"))
        record = {"localization_datasets": loc_record.get("datasets")
                  or sorted({im.dataset for im in make_loc("all").images("all")}),
                  "model_config": loc_record.get("model_config")}
    targets = list(cfg.get("target_datasets") or (record.get("class_space") or {}).get("datasets")
                   or record.get("localization_datasets") or [])
    if not targets:
        raise MergeError("cannot tell the fine-tuning datasets: the checkpoint has no class space; pass "
                         "target_datasets=[...]")
    fit_task = run_name_of(record.get("config")) or run_name_of((hp.get("record") or {}).get("config"))
    loggers = instantiate_loggers(cfg, **study_group(cfg, fit_task))
    for lg in loggers:
        lg.log_hyperparams(container(cfg))
    context = run_context(cfg, t0, out_dir)
    study_fn = partial(
        run_study, backbone, base_state, ft_state, make_dm=partial(make_eval_dm, cfg.data, backbone.preprocess),
        out_dir=cfg.paths.output_dir, target_datasets=targets, spec=spec, cache_dir=spec.result_cache,
        finetuned_path=str(Path(cfg.finetuned)),
        extra={"config": container(cfg), "run_id": context["run_id"], "finetuned_record": {
            k: v for k, v in record.items() if k in ("backbone", "objective", "model_config")}},
        localization=localization)
    trainer = trainer_for(cfg, logger=False, enable_checkpointing=False, enable_model_summary=False,
                          enable_progress_bar=False)
    study = study_on_every_rank(trainer, study_fn, out_dir, context["run_id"])
    if not trainer.is_global_zero:  # another process of a torchrun/SLURM launch: rank 0 writes and logs
        return study_record(context, study, out_dir), {"backbone": backbone, "study": study}
    write_report(study, out_dir, loggers[0] if loggers else None)
    close_loggers(loggers)  # the study's own W&B run is complete on disk when the command returns
    return study_record(context, study, out_dir), {"backbone": backbone, "study": study}


def study_record(context: dict, study: dict, out_dir: Path) -> RunRecord:
    """The run record of a forgetting study (for the summary; the study itself is ``forgetting.json``): on test,
    the fine-tuned model and the α chosen on val, on the target's fine questions and on the supported datasets."""
    chosen = study["selection"]["alpha"]
    models = {"fine-tuned": study["splits"]["test"]["models"]["finetuned"], f"chosen α={chosen:.2f}":
              study["chosen_test"]}
    headline = {f"{who}/{short}": m[key]["acc"] for who, m in models.items()
                for short, key in (("target fine", "target/fine"), ("supported", "supported/all"))}
    record = new_record(context, task="forgetting", model=study["base"], data={}, split={"name": "test"},
                        headline=headline, metrics={}, chosen_alpha=chosen)
    record.outputs = {"report": f"{(out_dir / 'forgetting.md').resolve()} (plots: alpha_sweep.png, "
                                "dataset_deltas.png)"}
    return record


class StudyInProcessGroup(L.LightningModule):
    """Runs a study (``study_fn(device=...)``, e.g. :func:`run_study` bound to its inputs) in every process that
    ``trainer.test`` starts (``trainer=ddp``, ``ddp_sim``, ``torchrun``), so that its sweep is sharded over them;
    rank 0 writes the study to ``path`` (spawned workers keep their memory), read back by :meth:`read_back`."""

    def __init__(self, study_fn, path: Path) -> None:
        super().__init__()
        self.study_fn, self.path, self.study = study_fn, Path(path), None

    def test_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader([0], batch_size=1)  # one step per rank; the work is in on_test_epoch_end

    def test_step(self, batch, batch_idx: int) -> None:
        return None

    def on_test_epoch_end(self) -> None:
        with torch.inference_mode(False):
            study = self.study_fn(device=self.device)
        self.study = self.trainer.strategy.broadcast(study, src=0)  # every rank (torchrun) holds rank 0's study
        if self.trainer.is_global_zero:
            write_json(self.path, self.study)  # ... and the launching process of spawned workers reads it

    def read_back(self) -> dict:
        """The study of this run: in memory, or the file rank 0 wrote (removed once read)."""
        if self.study is None:
            if not self.path.is_file():
                raise UserError(f"the forgetting study wrote no results to {self.path.parent}; see the log above")
            self.study = read_json(self.path)
        self.path.unlink(missing_ok=True)
        return self.study
