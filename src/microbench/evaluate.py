"""The zero-shot evaluation task behind ``python src/eval.py``: model + data from the config, scores, run record.

Writes to ``paths.output_dir``:

- ``metrics.json``: every metric with its CI and n, the model (id, weights fingerprint), the data (source,
  revision, fingerprint), the split, the resolved config, the package version and timings;
- ``predictions.parquet``: one row per scored item (row_idx, image_id, dataset, source, key, question_type,
  variant, gold_idx, pred_idx, correct, option scores);
- ``results.md``: a Table-1-style summary and every breakdown.
"""

from __future__ import annotations

import logging
import platform
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import microbench
from microbench.loggers import make_loggers
from microbench.metrics.closed_vqa import closed_vqa_metrics, headline_coverage, headline_table
from microbench.models.zero_shot import SOURCES, ZeroShotScorer, random_baseline
from microbench.results.records import start_run, this_runs_record, write_json, write_parquet, write_text
from microbench.results.report import pct, results_markdown

log = logging.getLogger(__name__)


def _sources(cfg: DictConfig) -> tuple[str, ...]:
    from microbench.errors import UserError

    raw = cfg.get("sources")
    if raw is not None and isinstance(raw, str):
        raise UserError(f"sources must be a list, e.g. sources=[captions] or sources=[captions,questions]; got {raw!r}")
    sources = tuple(raw or ("captions",))
    bad = set(sources) - set(SOURCES)
    if bad:
        raise UserError(f"sources must be among {list(SOURCES)}, got {sorted(bad)}: e.g. sources=[captions,questions]")
    return sources


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


def write_run(predictions: pd.DataFrame, skipped: dict, module: Any, *, context: dict) -> dict:
    """Compute metrics and write the three run files atomically (called once, on global rank 0)."""
    out_dir = Path(context["output_dir"])
    boot = context["bootstrap"]
    t_metrics = time.perf_counter()
    metrics = closed_vqa_metrics(predictions, boot["n_resamples"], boot["confidence"], boot["seed"])
    dm = context.get("datamodule") or module.trainer.datamodule
    model_info = context.get("model") or module.backbone.describe()
    record = {
        "microbench_version": microbench.__version__,
        "run_id": context.get("run_id"),
        "task": context.get("task", "zero_shot_perception"),
        "model": model_info,
        "data": {**dm.source.to_dict(), "filters": dm.filters, "exclude_datasets": dm.exclude_datasets},
        "split": {"name": dm.split, **dm.split_spec.to_dict(), "images": len(dm.images()), "rows": int(
            len(dm.rows) if dm.split == "all" else (dm.rows["split"] == dm.split).sum())},
        "sources": list(context["sources"]),
        "bootstrap": boot,
        "headline": {s: headline_table(metrics, s) for s in context["sources"]},
        "headline_coverage": headline_coverage(predictions),
        "data_problems": data_problems(dm, context["sources"]),
        "metrics": metrics,
        "n_predictions": len(predictions),
        "skipped": skipped,
        "timings_s": {**context.get("timings", {}), **getattr(module, "timings", {}),
                      "total": round(time.perf_counter() - context["t0"], 3),
                      "metrics": round(time.perf_counter() - t_metrics, 3)},
        "environment": {"python": platform.python_version(), "torch": __import__("torch").__version__,
                        "lightning": L.__version__, "world_size": getattr(module, "trainer", None)
                        and module.trainer.world_size or 1},
        "config": context["config"],
        **context.get("extra", {}),
    }
    write_parquet(out_dir / "predictions.parquet", predictions)
    write_json(out_dir / "metrics.json", record)
    write_text(out_dir / "results.md", results_markdown(record))
    logger = getattr(module, "logger", None)
    if logger is not None:
        logger.log_metrics({f"zs/{k}": v["value"] for k, v in metrics.items()})
    dp = record["data_problems"]
    if dp["answer_idx_disagreements"]:
        log.warning("%d question(s) have an answer_idx that disagrees with options.index(answer); scored with the "
                    "official gold (metrics.json -> data_problems)", dp["answer_idx_disagreements"])
    for source in context["sources"]:
        for grain in (record["headline_coverage"].get(source) or {}).values():
            if grain["note"]:
                log.warning("%s: %s", source, grain["note"])
        h = record["headline"][source]
        log.info("%s %s: coarse %s, fine %s -> %s", model_info["name"], source, pct(h.get("coarse")),
                 pct(h.get("fine")), out_dir)
    return record


def log_record(cfg: DictConfig, record: dict, objects: dict) -> tuple[dict, dict]:
    """Send a run record's metrics to the configured loggers (CSV, W&B), for tasks that run without a Trainer
    logger; with W&B also the results.md text."""
    loggers = make_loggers(cfg)
    prefix = {"cognition": "cog", "localization": "loc", "generative_perception": "gen"}.get(record.get("task"), "")
    values = {f"{prefix}/{k}": v["value"] for k, v in record["metrics"].items()
              if isinstance(v, dict) and isinstance(v.get("value"), int | float)}
    for lg in loggers:
        lg.log_metrics(values)
        if hasattr(lg, "log_text"):
            text = (Path(cfg.paths.output_dir) / "results.md").read_text()
            lg.log_text(key=f"{prefix}/results", columns=["results.md"], data=[[text]])
        lg.save()
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    return record, objects


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Run the configured evaluation (``task``: perception, localization); returns (record, objects)."""
    task = cfg.get("task", "perception")
    if task == "localization":
        from microbench.localization_tasks import evaluate_localization

        return log_record(cfg, *evaluate_localization(cfg))
    if task == "cognition":
        from microbench.generative_tasks import evaluate_cognition

        return log_record(cfg, *evaluate_cognition(cfg))
    if task != "perception":
        from microbench.errors import UserError

        raise UserError(f"task must be one of perception, cognition, localization; got {task!r}")
    if cfg.model.get("kind") == "generative":
        from microbench.generative_tasks import evaluate_generative_perception

        return log_record(cfg, *evaluate_generative_perception(cfg))
    t0, out_dir = start_run(cfg)
    sources = _sources(cfg)
    context = {"output_dir": str(out_dir), "sources": sources, "t0": t0, "run_id": uuid.uuid4().hex,
               "bootstrap": OmegaConf.to_container(cfg.bootstrap, resolve=True),
               "config": OmegaConf.to_container(cfg, resolve=True), "timings": {}}

    if cfg.model.get("kind") == "random":
        dm = instantiate(cfg.data)
        dm.setup("test")
        questions = dm.questions()
        items = questions[questions["source"].isin(sources)]
        # every present set takes its draw, as in the official loop; invalid items are then not scored
        preds = random_baseline(items, seed=int(cfg.model.get("seed", 42)))[items["valid"].to_numpy()]
        preds = preds.reset_index(drop=True)
        invalid = questions[questions["source"].isin(sources) & ~questions["valid"]]
        skipped = {"invalid_items": len(invalid), "items_of_failed_images": 0, "failed_images": [],
                   "problems": invalid[["row_idx", "key", "problem"]].astype(str).to_dict("records")}
        model = {"name": "random", "kind": "random", "fingerprint": f"seed{int(cfg.model.get('seed', 42))}",
                 "embed_dim": 0, "has_text": False, "parameters": 0}
        record = write_run(preds, skipped, None, context={**context, "datamodule": dm, "model": model})
        return record, {"datamodule": dm}

    t = time.perf_counter()
    backbone = instantiate(cfg.model)
    context["timings"]["build_model"] = round(time.perf_counter() - t, 3)
    dm = instantiate(cfg.data, transform=backbone.preprocess)
    loggers = make_loggers(cfg) or False
    on_scored = RecordWriter(context)
    scorer = ZeroShotScorer(backbone, sources=sources, text_batch_size=int(cfg.get("text_batch_size", 256)),
                            on_scored=on_scored)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers, enable_checkpointing=False,
                                     enable_model_summary=False)
    trainer.test(scorer, datamodule=dm, verbose=False)
    record = on_scored.record or this_runs_record(out_dir / "metrics.json", context["run_id"], trainer)
    return record, {"backbone": backbone, "datamodule": dm, "trainer": trainer, "scorer": scorer}


class RecordWriter:
    """The scorer's ``on_scored``: writes the run files and keeps the record (picklable, for spawned workers, where
    the record stays in the worker and :func:`this_runs_record` reads it back)."""

    def __init__(self, context: dict) -> None:
        self.context, self.record = context, None

    def __call__(self, predictions, skipped, module) -> None:
        self.record = write_run(predictions, skipped, module, context=self.context)
