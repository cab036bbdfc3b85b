"""Localization: ``python src/train.py task=localization`` (train a detection/segmentation head, then test),
``python src/eval.py task=localization checkpoint=...`` (evaluate a trained head) and the official generative
detection protocol (``task=localization`` with a generative ``model``).

Each writes a run record to ``paths.output_dir`` in the shape of perception runs, so the leaderboard merges them:
``metrics.json`` (COCO bbox[/segm] AP, AP50, AP75, AR; GRIT per dataset/class, macro and pooled; counts; model,
data, split, config), ``predictions.parquet`` (one row per (image, class): GRIT score, #pred, #gt),
``detections.json`` (COCO results format), ``ground_truth_coco.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import microbench
from microbench.data.config import (
    LOCALIZATION_DM,
    data_module_cfg,
    localization_dm_factory,
)
from microbench.errors import UserError
from microbench.metrics.localization import grit_intervals
from microbench.models.localization import LocalizationModule, detector_from_checkpoint
from microbench.results.io import this_runs_record
from microbench.results.record import RunRecord, metric_entry
from microbench.results.report import clustered_cell, fmt_value, percent
from microbench.studies.sweep import LocalizationSweeper
from microbench.tasks.records import (
    LocalizationRecordWriter,
    new_record,
    run_context,
    write_fit,
    write_run,
)
from microbench.tasks.study import forgetting_callback, forgetting_summary
from microbench.tasks.trainer import (
    bootstrap_settings,
    build_model,
    container,
    fit_model,
    log_record,
    start_run,
    trainer_for,
)

log = logging.getLogger(__name__)


def build_from_record(model_config: dict):
    """The backbone a localization checkpoint records (its model config), built like any configured model."""
    return build_model(OmegaConf.create(model_config))


def train(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """Fit a detection/segmentation head, then test the best checkpoint and write the run record."""
    t0, out_dir = start_run(cfg)
    backbone = build_model(cfg.model)
    if cfg.get("ckpt_path"):  # before fitting: a wrong file is one line, not a traceback from Lightning
        from microbench.checkpoints import check_resume_checkpoint

        check_resume_checkpoint(cfg.ckpt_path, "localization", backbone.name)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    fit_record = {"model_config": container(cfg.model), "data": dm.source.to_dict(), "class_names": dm.class_names,
                  "targets": dm.targets, "split": dm.split_spec.to_dict(),
                  "microbench_version": microbench.__version__,
                  "datasets": sorted({im.dataset for im in dm.images("all")})}
    context = run_context(cfg, t0, out_dir, bootstrap=bootstrap_settings(cfg))
    module = instantiate(cfg.module)(backbone=backbone, class_names=dm.class_names, record=fit_record,
                                     on_scored=LocalizationRecordWriter(context), seed=int(cfg.seed))
    study_cb = _forgetting_callback(cfg, backbone, dm, module, out_dir)
    trainer, best, last = fit_model(cfg, module, dm, study_cb)
    fit: dict[str, Any] = {"fit_seconds": round(time.perf_counter() - t0, 2), "best_checkpoint": best or None,
                           "last_checkpoint": last or None, "class_names": dm.class_names}
    headline: dict = {}
    if cfg.get("test_after_fit", True) and not trainer.fast_dev_run:
        context["checkpoint"] = best or last or None
        trainer.test(module, datamodule=dm, ckpt_path="best" if best else None, verbose=False)
        tested = this_runs_record(out_dir / "metrics.json", context["run_id"], trainer)
        headline = {f"test/{k}": v for k, v in tested["headline"].items()}
        fit["test"] = {k: v["value"] for k, v in tested["headline"].items()}
    outputs = {"best checkpoint": best or "none", "results": str((out_dir / "results.md").resolve())}
    st = study_cb.result(trainer) if study_cb is not None else None
    if st is not None:
        fields, outputs["forgetting report"] = forgetting_summary(st, out_dir)
        fit["forgetting"] = {**fields, "localization_test": st["splits"]["test"]["localization"]}
    fit["total_seconds"] = round(time.perf_counter() - t0, 2)
    record = _fit_record(context, module, dm, headline, fit)
    write_fit(out_dir, record, trainer, outputs)  # outputs: the test's results.md is what a reader opens
    return record, {"backbone": backbone, "datamodule": dm, "module": module, "trainer": trainer}


def _fit_record(context: dict, module: LocalizationModule, dm, headline: dict, fit: dict) -> RunRecord:
    """``train_metrics.json`` of a localization fit: the common header plus what the fit did (checkpoints, test
    headline, the forgetting summary), its keys as they have always been."""
    return new_record(context, task="localization_fit", model=module.backbone.describe(),
                      data={**dm.source.to_dict(), "targets": dm.targets, "class_names": dm.class_names},
                      split={"name": "test", **dm.split_spec.to_dict()}, headline=headline, metrics={},
                      head=module.hparams.head, **fit)


def _forgetting_callback(cfg: DictConfig, backbone, dm, module, out_dir: Path):
    """With ``forgetting.enabled`` and a trainable tower: after fit, base vs fine-tuned tower vs θ(α) on the whole
    perception benchmark *and* on localization (the trained head on each θ(α))."""
    if not (cfg.get("forgetting") or {}).get("enabled"):
        return None
    if module.hparams.freeze_backbone:
        log.warning("forgetting.enabled ignored: the backbone is frozen (module.freeze_backbone=true), so nothing "
                    "can be forgotten; set module.freeze_backbone=false to fine-tune the tower")
        return None
    hp = {k: v for k, v in module.hparams.items() if k not in ("record",)}
    sweeper = TwinHeadSweeper(module, hp, localization_dm_factory(cfg.data, dm.targets, dm.class_names))
    return forgetting_callback(cfg, backbone, out_dir, localization=sweeper,
                               target_datasets=sorted({im.dataset for im in dm.images("all")}))


class TwinHeadSweeper:
    """The study's localization sweep during a fit: a twin module sharing the fitted backbone, carrying the head
    trained so far, scored on every θ(α) (built at the first call, after fit)."""

    def __init__(self, module: LocalizationModule, hparams: dict, make_dm) -> None:
        self.module, self.hparams, self.make_dm = module, hparams, make_dm
        self.sweeper: LocalizationSweeper | None = None

    def __call__(self, split: str, base: dict, finetuned: dict, alphas: list[float], keys) -> dict:
        if self.sweeper is None:
            self.sweeper = LocalizationSweeper(LocalizationModule(self.module.backbone, **self.hparams), self.make_dm)
        twin = self.sweeper.module
        twin.detector.load_state_dict({**twin.detector.state_dict(), **self.module.head_state_dict()})
        return self.sweeper(split, base, finetuned, alphas, keys)


def evaluate_head(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """Evaluate a trained head (``checkpoint=``) on ``data.split`` of any copy; writes the run record."""
    if not cfg.get("checkpoint"):
        raise UserError("localization evaluation needs a trained head: checkpoint=<.ckpt from "
                        "python src/train.py task=localization ...> (e.g. experiment=detect_nuclei)")
    t0, out_dir = start_run(cfg)
    module, ckpt = detector_from_checkpoint(cfg.checkpoint, build_backbone=build_from_record)
    hp = ckpt["hyper_parameters"]
    if not str(cfg.data.get("_target_", "")).endswith("LocalizationDataModule"):
        log.info("localization: evaluating the test split of %s (set data=ubench_localization to choose)",
                 cfg.data.path)
    defaults = {} if str(cfg.data.get("_target_", "")) == LOCALIZATION_DM else {"split": "test"}
    dm = instantiate(data_module_cfg(cfg.data, LOCALIZATION_DM, **defaults,
                                     targets=(hp.get("record") or {}).get("targets", "boxes"),
                                     classes=list(hp["class_names"]), strict_filters=False))
    dm.setup("test")
    context = run_context(cfg, t0, out_dir, checkpoint=str(cfg.checkpoint), bootstrap=bootstrap_settings(cfg))
    module.on_scored = LocalizationRecordWriter(context)
    trainer = trainer_for(cfg, logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.test(module, datamodule=dm, verbose=False)
    record = RunRecord.from_dict(this_runs_record(out_dir / "metrics.json", context["run_id"], trainer),
                                 outputs={"results": str((out_dir / "results.md").resolve())})
    log_record(cfg, record, out_dir / "results.md")
    return record, {"module": module, "datamodule": dm, "trainer": trainer}


def evaluate_generative(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """The official generative detection protocol: for each image and each className present, ask ``Detect
    {className}`` (Qwen-VL) / ``detect {className}`` (PaliGemma, retried as ``segment {c}; {c}`` when the answer is
    exactly empty, as the official code), parse the boxes (``box_format``: qwen | qwen_lenient | paligemma; default
    from the model name) and score with GRIT."""
    from microbench.generative.backends import Request
    from microbench.generative.boxes import PROMPTS, score_box_answers

    t0, out_dir = start_run(cfg)
    backend = build_model(cfg.model)
    fmt = cfg.get("box_format") or ("paligemma" if "paligemma" in backend.model_name.lower() else "qwen")
    defaults = {} if str(cfg.data.get("_target_", "")) == LOCALIZATION_DM else {"split": "all"}  # official: all
    dm = instantiate(data_module_cfg(cfg.data, LOCALIZATION_DM, **defaults, targets="boxes", augment=False))
    dm.setup("test")
    images = dm.images(dm.split)
    pairs = [(i, c) for i, im in enumerate(images) for c in sorted(set(im.classes))]
    reqs = [Request(f"{images[i].image_id}/{c}", PROMPTS[fmt].format(class_name=c),
                    partial(dm.encoded_image, images[i].row)) for i, c in pairs]
    results = backend.generate(reqs, progress=True)
    stats = [backend.stats.to_dict()]
    if fmt == "paligemma":  # the official fallback for empty answers
        empty = [k for k, r in enumerate(results) if r.text == ""]  # exactly empty, as the official code tests
        if empty:
            retry = backend.generate([Request(reqs[k].id + "/segment", f"segment {pairs[k][1]}; {pairs[k][1]}",
                                              reqs[k].images) for k in empty], progress=False)
            for k, r in zip(empty, retry, strict=True):
                results[k] = r
            stats.append(backend.stats.to_dict())
    answers = pd.DataFrame({
        "image_id": [images[i].image_id for i, _ in pairs], "dataset": [images[i].dataset for i, _ in pairs],
        "class": [c for _, c in pairs], "width": [images[i].width for i, _ in pairs],
        "height": [images[i].height for i, _ in pairs],
        "gt_boxes": [images[i].boxes[[k == c for k in images[i].classes]].tolist() for i, c in pairs],
        "response": [r.text for r in results], "error": [r.error for r in results]})
    table, grit = score_box_answers(answers, fmt)
    metrics = {f"loc/{k}": metric_entry(v, len(table)) for k, v in grit.items() if k != "unparsed_answers"}
    boot = bootstrap_settings(cfg)
    for name, interval in grit_intervals(table, boot).items():
        if f"loc/{name}" in metrics:
            metrics[f"loc/{name}"]["clustered"] = interval
    record = new_record(
        run_context(cfg, t0, out_dir), task="localization", model=backend.describe(),
        data={**dm.source.to_dict(), "targets": "boxes", "filters": dm.filters, "class_names": dm.class_names},
        split={"name": dm.split, **dm.split_spec.to_dict(), "images": len(images)},
        headline={"grit": metrics.get("loc/grit/macro")}, metrics=metrics, skipped=dict(dm.table.skipped),
        head=f"generative ({fmt} boxes)", bootstrap=boot,
        counts={"images": len(images), "questions": len(table), "unparsed_answers": grit["unparsed_answers"],
                "failed_requests": int(answers["error"].notna().sum())}, backend_stats=stats)
    lines = [f"# μ-Bench localization (generative, {fmt} boxes): {record.model['name']}", "",
             f"{len(images)} images, {len(table)} (image, class) questions, {grit['unparsed_answers']} answers without a "
             "parseable box (scored as no prediction). GRIT localization score in %.", "",
             f"**GRIT macro: {fmt_value(metrics.get('loc/grit/macro'))}** (image-clustered 95 % "
             f"{clustered_cell(metrics.get('loc/grit/macro'))}), pooled {fmt_value(metrics.get('loc/grit/pooled'))} "
             f"({clustered_cell(metrics.get('loc/grit/pooled'))})", "", "| dataset | class | GRIT | questions | unparsed |",
             "|---|---|---|---|---|"]
    for (d, c), g in table.groupby(["dataset", "class"]):
        lines.append(f"| {d} | {c} | {percent(g['grit'].mean())} | {len(g)} | {int((~g['parsed']).sum())} |")
    write_run(out_dir, record, tables={"predictions.parquet": table.assign(
        gt_boxes=table["gt_boxes"].map(json.dumps), pred_boxes=table["pred_boxes"].map(json.dumps))},
        texts={"results.md": "\n".join(lines) + "\n"})
    log_record(cfg, record, out_dir / "results.md")
    return record, {"datamodule": dm, "backend": backend, "table": table}

