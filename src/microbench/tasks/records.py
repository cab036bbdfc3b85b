"""Run records: built in one place (:func:`new_record`), written by one writer (:func:`write_run`). The scored
tasks' record builders (perception, localization) live here because more than one task writes them (an
evaluation, the fine-tune's in-domain check, a localization fit's test)."""

from __future__ import annotations

import logging
import platform
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from omegaconf import DictConfig

import microbench
from microbench.metrics.bootstrap import DEFAULT_BOOTSTRAP
from microbench.metrics.closed_vqa import closed_vqa_metrics, headline_coverage, headline_table
from microbench.models.backbones.base import state_fingerprint
from microbench.results.io import write_json, write_parquet, write_text
from microbench.results.record import RunRecord, metric_entry
from microbench.results.report import fmt_value, localization_markdown, pct, results_markdown
from microbench.tasks.trainer import close_loggers, container

log = logging.getLogger(__name__)


def run_context(cfg: DictConfig, t0: float, out_dir: Path, **more) -> dict:
    """What a run's record needs from its config and its start (picklable: spawned workers write records)."""
    return {"output_dir": str(out_dir), "t0": t0, "run_id": uuid.uuid4().hex, "config": container(cfg),
            "timings": {}, **more}


def environment(world_size: int = 1) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__,
            "world_size": int(world_size or 1)}


def new_record(context: dict, *, task: str, model: dict, data: dict, split: dict, headline: dict, metrics: dict,
               skipped: dict | None = None, timings: dict | None = None, world_size: int = 1,
               **extra: Any) -> RunRecord:
    """The record of one run: the task's fields plus the header every record has (version, run id, timings with
    the total, environment, resolved config)."""
    return RunRecord(task=task, model=model, data=data, split=split, headline=headline, metrics=metrics,
                     skipped=skipped or {}, extra=extra, run_id=context.get("run_id"),
                     microbench_version=microbench.__version__,
                     timings_s={**context.get("timings", {}), **(timings or {}),
                                "total": round(time.perf_counter() - context["t0"], 3)},
                     environment=environment(world_size), config=context.get("config") or {})


def write_run(out_dir: str | Path, record: RunRecord, *, name: str = "metrics.json",
              tables: dict[str, pd.DataFrame] | None = None, files: dict[str, Any] | None = None,
              texts: dict[str, str] | None = None, csvs: dict[str, pd.DataFrame] | None = None) -> RunRecord:
    """The one writer of run records, every file atomic: the tables (parquet, CSV) and side files first, then
    the record (``name``), then the texts; ``record.outputs`` gets the record and the texts."""
    out_dir = Path(out_dir)
    for fname, frame in (tables or {}).items():
        write_parquet(out_dir / fname, frame)
    for fname, obj in (files or {}).items():
        write_json(out_dir / fname, obj)
    write_json(out_dir / name, record.to_dict())
    for fname, frame in (csvs or {}).items():
        write_text(out_dir / fname, frame.to_csv(index=False))
    for fname, text in (texts or {}).items():
        write_text(out_dir / fname, text)
    main = next(iter(texts)) if texts else name
    record.outputs = {"results": str((out_dir / main).resolve()), **record.outputs}
    return record


# --- perception (zero-shot, random, generative; the fine-tune's in-domain check) ------------------------------

def data_problems(dm, sources) -> dict:
    """Problems of the copy that did not stop scoring but change what was scored: question ``answer_idx`` values
    that disagree with ``options.index(answer)`` (scored with the official gold) and image ids shared by rows with
    different pixels (each row scored on its own image)."""
    q = dm.questions()
    notes = q[q["note"].notna() & q["source"].isin(list(sources))] if "note" in q else q.iloc[:0]
    conflicts = list(getattr(getattr(dm, "question_table", None), "image_conflicts", []) or [])
    return {"answer_idx_disagreements": int(len(notes)),
            "answer_idx_items": notes[["row_idx", "key", "note"]].head(200).astype(str).to_dict("records")
            if len(notes) else [],
            "image_id_conflicts": conflicts}


def write_perception_run(predictions: pd.DataFrame, skipped: dict, module: Any, *, context: dict) -> RunRecord:
    """Score closed-VQA predictions and write the run (``predictions.parquet``, ``metrics.json``, ``results.md``);
    called once, on global rank 0."""
    out_dir = Path(context["output_dir"])
    boot = context["bootstrap"]
    sources = list(context["sources"])
    t_metrics = time.perf_counter()
    metrics = closed_vqa_metrics(predictions, boot["n_resamples"], boot["confidence"], boot["seed"])
    dm = context.get("datamodule") or module.trainer.datamodule
    model_info = context.get("model") or module.backbone.describe()
    coverage = headline_coverage(predictions)
    record = new_record(
        context, task=context.get("task", "zero_shot_perception"), model=model_info,
        data={**dm.source.to_dict(), "filters": dm.filters, "exclude_datasets": dm.exclude_datasets},
        split={"name": dm.split, **dm.split_spec.to_dict(), "images": len(dm.images()), "rows": int(
            len(dm.rows) if dm.split == "all" else (dm.rows["split"] == dm.split).sum())},
        headline={s: headline_table(metrics, s) for s in sources}, metrics=metrics, skipped=skipped,
        timings={**getattr(module, "timings", {}), "metrics": round(time.perf_counter() - t_metrics, 3)},
        world_size=getattr(module, "trainer", None) and module.trainer.world_size or 1,
        sources=sources, bootstrap=boot, headline_coverage=coverage, data_problems=data_problems(dm, sources),
        n_predictions=len(predictions), **context.get("extra", {}))
    record.notes = [g["note"] for s in sources for g in (coverage.get(s) or {}).values() if g["note"]]
    write_run(out_dir, record, tables={"predictions.parquet": predictions},
              texts={"results.md": results_markdown(record.to_dict())})
    logger = getattr(module, "logger", None)
    if logger is not None:
        logger.log_metrics({f"zs/{k}": v["value"] for k, v in metrics.items()})
    dp = record["data_problems"]
    if dp["answer_idx_disagreements"]:
        log.warning("%d question(s) have an answer_idx that disagrees with options.index(answer); scored with the "
                    "official gold (metrics.json -> data_problems)", dp["answer_idx_disagreements"])
    for source in sources:
        for grain in (coverage.get(source) or {}).values():
            if grain["note"]:
                log.warning("%s: %s", source, grain["note"])
        h = record.headline[source]
        log.info("%s %s: coarse %s, fine %s -> %s", model_info["name"], source, pct(h.get("coarse")),
                 pct(h.get("fine")), out_dir)
    return record


class PerceptionRecordWriter:
    """The scorer's ``on_scored``: writes the run and keeps the record (picklable, for spawned workers, where the
    record stays in the worker and :func:`microbench.results.io.this_runs_record` reads it back)."""

    def __init__(self, context: dict) -> None:
        self.context, self.record = context, None

    def __call__(self, predictions, skipped, module) -> None:
        self.record = write_perception_run(predictions, skipped, module, context=self.context)


# --- localization (a head's test, an evaluation of a trained head) -------------------------------------------

#: headline name → metric of the localization record
LOCALIZATION_HEADLINE = {"bbox_AP": "bbox/AP", "bbox_AP50": "bbox/AP50", "segm_AP": "segm/AP", "grit": "grit/macro"}


def write_localization_run(result: dict, module, *, context: dict) -> RunRecord:
    """Write the record of one scored localization split (called on global rank 0)."""
    from microbench.data.localization import coco_ground_truth
    from microbench.metrics.localization import coco_detections, localization_intervals

    out_dir = Path(context["output_dir"])
    dm = context.get("datamodule") or module.trainer.datamodule
    m, counts = result["metrics"], result["counts"]
    per_image = result["per_image"]
    metrics = {f"loc/{k}": metric_entry(v, len(per_image) if k.startswith("grit/") else counts["images"])
               for k, v in m.items()}
    images = dm.images(dm.split)
    preds = module.last_predictions
    segm = "loc/segm/AP" in metrics
    side = {} if preds is None else {"detections.json": coco_detections(preds, len(images), segm)}
    side["ground_truth_coco.json"] = coco_ground_truth(images, dm.class_names)
    boot = context.get("bootstrap") or DEFAULT_BOOTSTRAP
    t_boot = time.perf_counter()
    for name, interval in localization_intervals(side["ground_truth_coco.json"], side.get("detections.json"),
                                                 per_image, ("bbox", "segm") if segm else ("bbox",),
                                                 counts["max_dets"], boot).items():
        if f"loc/{name}" in metrics:
            metrics[f"loc/{name}"]["clustered"] = interval
    record = new_record(
        context, task="localization",
        model={**module.backbone.describe(), "head_fingerprint": state_fingerprint(module.head_state_dict()),
               "checkpoint": context.get("checkpoint")},
        data={**dm.source.to_dict(), "targets": dm.targets, "filters": dm.filters,
              "exclude_datasets": dm.exclude_datasets, "class_names": dm.class_names},
        split={"name": dm.split, **dm.split_spec.to_dict(), "images": counts["images"]},
        headline={k: metrics[f"loc/{v}"] for k, v in LOCALIZATION_HEADLINE.items() if f"loc/{v}" in metrics},
        metrics=metrics, skipped={"failed_images": result.get("failed_images", []), **dm.table.skipped},
        timings={**module.timings, "intervals": round(time.perf_counter() - t_boot, 3)}, head=module.hparams.head,
        counts=counts, bootstrap=boot)
    write_run(out_dir, record, tables={"predictions.parquet": per_image}, files=side,
              texts={"results.md": localization_markdown(record.to_dict(), per_image)})
    logger = getattr(module, "logger", None)
    if logger is not None:
        logger.log_metrics({k: v["value"] for k, v in metrics.items() if v["value"] is not None})
    h = record.headline
    log.info("%s %s: bbox AP %s, GRIT %s -> %s", record.model["name"], record["head"],
             fmt_value(h.get("bbox_AP")), fmt_value(h.get("grit")), out_dir)
    return record


class LocalizationRecordWriter:
    """The localization module's ``on_scored`` (picklable, so spawned DDP workers write the record on rank 0)."""

    def __init__(self, context: dict) -> None:
        self.context = context

    def __call__(self, result: dict, module) -> None:
        write_localization_run(result, module, context=self.context)


def write_fit(out_dir: Path, record, trainer: L.Trainer, outputs: dict):
    """The end of every fitting task: ``train_metrics.json`` (rank 0), the summary's outputs, the loggers closed."""
    if trainer.is_global_zero:
        write_run(out_dir, record, name="train_metrics.json")
    record.outputs = outputs
    close_loggers(trainer.loggers)
    return record
