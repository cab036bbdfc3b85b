"""``python src/train.py`` (``task=finetune``): fit a CLIP-style model on labelled μ-Bench datasets, test on their
held-out split, run the official zero-shot protocol there (in-domain gain) and, with ``forgetting.enabled``, the
forgetting study on the whole benchmark (:class:`~microbench.studies.callback.ForgettingCallback`).

Writes ``train_metrics.json`` (the common record header plus the fit: checkpoints, test metrics, class space,
forgetting summary), ``in_domain/`` (a perception run record) and ``forgetting/`` (the study).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

import microbench
from microbench.data.config import LABELLED_DM, ROW_FILTERS, perception_view
from microbench.distributed import local_only
from microbench.errors import UserError
from microbench.models.zero_shot import ZeroShotScorer
from microbench.results.io import read_json
from microbench.results.record import RunRecord, run_name_of
from microbench.studies.forgetting import load_finetuned_state
from microbench.tasks.records import PerceptionRecordWriter, new_record, run_context, write_fit
from microbench.tasks.study import forgetting_callback, forgetting_summary
from microbench.tasks.trainer import (
    bootstrap_settings,
    build_model,
    container,
    fit_model,
    start_run,
)

log = logging.getLogger(__name__)


def labelled_data(cfg: DictConfig, backbone):
    """The fitting data ``cfg.data`` names (a LabelledDataModule: data=ubench_labelled, data=ubench_pathology)."""
    target = str(cfg.data.get("_target_", ""))
    if target != LABELLED_DM:
        raise UserError(f"task=finetune fits labelled images, but data._target_={target}: use data=ubench_labelled "
                        "(every dataset) or data=ubench_pathology, with the same keys (path, datasets, ...)")
    seed = {} if "seed" in cfg.data else {"seed": int(cfg.get("seed", 0))}  # shuffling, augmentation, captions
    return instantiate(cfg.data, transform=backbone.preprocess, train_transform=backbone.train_transform,
                       drop_last_train=cfg.module.objective == "contrastive", **seed)


def apply_specialty(cfg: DictConfig) -> dict | None:
    """With ``specialty`` (configs/specialty/): resolve it on the copy ``cfg.data`` reads and make its datasets
    the training selection (``data.datasets``; the other row filters cleared); returns what the record keeps."""
    from omegaconf import OmegaConf, open_dict

    from microbench.data.specialty import metadata_rows, resolve_specialty

    sp = cfg.get("specialty")
    if not sp:
        return None
    chosen = [k for k in ROW_FILTERS if cfg.data.get(k)]
    if chosen:
        raise UserError(f"specialty={sp.get('name')} and data.{chosen[0]} both choose the training data: give one "
                        "(specialty=custom 'specialty.datasets=[...]' for a list of datasets)")
    datasets = None if OmegaConf.is_missing(sp, "datasets") else sp.get("datasets")
    axis = None if datasets or OmegaConf.is_missing(sp, "axis") else sp.get("axis")
    value = None if datasets or OmegaConf.is_missing(sp, "value") else sp.get("value")
    if not datasets and (axis is None or value is None):
        raise UserError("specialty=custom needs specialty.axis and specialty.value (e.g. specialty.axis=modality "
                        "'specialty.value=fluorescence microscopy') or 'specialty.datasets=[a,b]'")
    rows = metadata_rows(cfg.data.path, cfg.data.get("revision"))
    spec = resolve_specialty(rows, str(sp.get("name")), axis, value, list(datasets) if datasets else None)
    with open_dict(cfg):
        cfg.data.datasets = list(spec.datasets)
    what = f"{spec.axis}={spec.value}" if spec.axis else "datasets"
    log.info("specialty %s (%s): %d dataset(s): %s", spec.name, what, len(spec.datasets), ", ".join(spec.datasets))
    for d, share in spec.split_datasets.items():
        log.warning("specialty %s: dataset %s has %.0f %% of its rows with %s (%s)", spec.name, d, 100 * share,
                    what, "in the group" if share >= 0.5 else "left out")
    return spec.to_dict()


def run_checkpoint(run: str | Path, key: str) -> tuple[str, dict]:
    """The checkpoint of a fit (its folder, its ``train_metrics.json`` or the ``.ckpt`` itself; a folder or record
    gives the last checkpoint, the weights the fit ended with, as a chain continues training) and the fit's record
    ({} for a bare checkpoint)."""
    path = Path(run)
    if path.is_dir():
        path = path / "train_metrics.json"
    if not path.exists():
        raise UserError(f"{key}={run}: no such run folder, train_metrics.json or checkpoint")
    if path.suffix != ".json":
        return str(path), {}
    record = read_json(path)
    ckpt = record.get("last_checkpoint") or record.get("best_checkpoint")
    if not ckpt or not Path(ckpt).is_file():
        raise UserError(f"{key}={run}: its checkpoint {ckpt} does not exist (moved or deleted?)")
    return str(ckpt), record


def chain_start(cfg: DictConfig) -> dict | None:
    """Where this fit starts when not from the model preset: ``init_from=<run>`` (a specialist fine-tuned further,
    B from A), or ``chain=true`` in a multirun, each job from the previous job's weights (job 0 from the preset).
    Returns the record's ``chain`` field {job, init_from, after} (None for a plain fit)."""
    job = None
    if cfg.get("chain"):
        if cfg.get("init_from"):
            raise UserError("chain=true and init_from both say where the fit starts: give one")
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get() if HydraConfig.initialized() else None
        if hc is None or hc.mode != RunMode.MULTIRUN:
            raise UserError("chain=true chains the jobs of a multirun: python src/train.py -m experiment=specialist "
                            "specialty=a,b,c chain=true (or init_from=<run folder> for one step)")
        job = int(hc.job.num)
        if job == 0:
            return {"job": 0, "init_from": None, "after": []}
        sweep = Path(hc.sweep.dir)
        prev = [f for f in sorted(sweep.rglob("train_metrics.json"))
                if (read_json(f).get("chain") or {}).get("job") == job - 1]
        if not prev:
            raise UserError(f"chain=true: job {job - 1}'s train_metrics.json is not in {sweep} (a chain runs its jobs "
                            "one after another, with Hydra's basic launcher, and each must succeed)")
        source = prev[0]
    elif cfg.get("init_from"):
        source = cfg.init_from
    else:
        return None
    ckpt, record = run_checkpoint(source, "init_from")
    before = (record.get("chain") or {}).get("after", [])
    name = (record.get("specialty") or {}).get("name") or run_name_of(record.get("config")) or Path(ckpt).stem
    return {"job": job, "init_from": ckpt, "after": [*before, name]}


def run(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """Fit, test on the held-out split of the training datasets, then run the official zero-shot protocol there."""
    t0, out_dir = start_run(cfg)
    specialty = apply_specialty(cfg)
    chain = chain_start(cfg)
    backbone = build_model(cfg.model, cfg.get("inference"))
    base_state = None
    if chain and chain["init_from"]:  # the study's base stays the model preset; the fit starts from the run's weights
        base_state = {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()}
        state, _ = load_finetuned_state(chain["init_from"], backbone, key="init_from")
        backbone.load_state_dict(state)
        log.info("fine-tuning from %s (after %s)", chain["init_from"], " → ".join(chain["after"]))
    dm = labelled_data(cfg, backbone)
    dm.setup("fit")
    fit_record = {"model_config": container(cfg.model), "data": dm.source.to_dict(),
                  "split": dm.split_spec.to_dict(), "filters": dm.filters, "config": container(cfg),
                  "microbench_version": microbench.__version__}
    if cfg.get("ckpt_path"):  # before fitting: a wrong file is one line, not a traceback from Lightning
        from microbench.checkpoints import check_resume_checkpoint

        check_resume_checkpoint(cfg.ckpt_path, "finetune", backbone.name)
    module = instantiate(cfg.module)(backbone=backbone, seed=cfg.seed, record=fit_record)
    ckpt_dir = Path(cfg.checkpoint_dir)
    study_cb = forgetting_callback(cfg, backbone, out_dir, base_state=base_state)
    trainer, best, last = fit_model(cfg, module, dm, study_cb)
    fit_s = time.perf_counter() - t0
    fit: dict[str, Any] = {"fit_seconds": round(fit_s, 2), "best_checkpoint": best or None,
                           "last_checkpoint": last or None, "checkpoint_dir": str(ckpt_dir) if (best or last) else None,
                           "class_space": dm.class_space.to_dict(),
                           "trainable_parameters": module.trainable_parameters(),
                           "adapter": module.adapter_spec,
                           "head_init": module.probe_init or ({"kind": module.hparams.head_init}
                                                              if module.objective == "ce" else None)}
    headline: dict = {}
    if cfg.get("test_after_fit", True) and not trainer.fast_dev_run:
        results = trainer.test(module, datamodule=dm, ckpt_path=best or None, verbose=False)  # the path itself:
        fit["test"] = results[0] if results else {}  # "best" is ambiguous with two ModelCheckpoint callbacks
        fit["tested_checkpoint"] = best or "final weights"
        n_test = len(dm.images("test"))
        headline = {f"test/{k}": {"value": fit["test"][f"test/{k}"], "ci": None, "n": n_test}
                    for k in ("acc", "balanced_acc") if f"test/{k}" in fit["test"]}
    outputs = {"best checkpoint": best or "none", "results": str((out_dir / "train_metrics.json").resolve())}
    if cfg.get("eval_in_domain", True) and not trainer.fast_dev_run and trainer.is_global_zero:
        fit["in_domain_zero_shot"] = in_domain_zero_shot(cfg, module, out_dir / "in_domain")
        outputs["in-domain zero-shot"] = str((out_dir / "in_domain" / "results.md").resolve())
    st = study_cb.result(trainer) if study_cb is not None else None
    if st is not None:
        fields, outputs["forgetting report"] = forgetting_summary(st, out_dir)
        fit["forgetting"] = {**fields, "test": {n: {k: st["splits"]["test"]["models"][n][k]["acc"]["value"]
                                                    for k in ("target/fine", "supported/all")}
                                                for n in ("base", "finetuned")}}
    fit["total_seconds"] = round(time.perf_counter() - t0, 2)
    record = new_record(run_context(cfg, t0, out_dir), task="finetune", model=backbone.describe(),
                        data={**dm.source.to_dict(), "filters": dm.filters},
                        split={"name": "test", **dm.split_spec.to_dict()}, headline=headline, metrics={},
                        world_size=trainer.world_size, specialty=specialty, chain=chain, **fit)
    write_fit(out_dir, record, trainer, outputs)
    return record, {"backbone": backbone, "datamodule": dm, "module": module, "trainer": trainer}


def in_domain_zero_shot(cfg: DictConfig, module, out_dir: Path) -> dict:
    """The official zero-shot protocol on the held-out test split of the training datasets (in-domain gain)."""
    backbone = module.backbone
    dm = instantiate(perception_view(cfg.data, split="test"), transform=backbone.preprocess)
    context = run_context(cfg, time.perf_counter(), out_dir, sources=("captions",),
                          bootstrap=bootstrap_settings(cfg))  # the root `bootstrap` of train.yaml
    writer = PerceptionRecordWriter(context)
    with local_only():  # rank 0 alone, also while the other ranks of trainer=ddp live (their group would hang it)
        trainer = L.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, logger=False,
                            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
        trainer.test(ZeroShotScorer(backbone, on_scored=writer, progress=False), datamodule=dm, verbose=False)
    return writer.record.headline["captions"] if writer.record is not None else {}
