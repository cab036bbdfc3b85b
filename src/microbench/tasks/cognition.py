"""``python src/eval.py task=cognition``: expert multiple choice, scored by a contrastive model (question +
option texts), a generative model (the official or MicroVQA prompt) or the official Random model, written in the
same run-record shape as perception so the leaderboard puts every model side by side.

``metrics.json``: ``cognition/all`` and ``cognition/<subdomain|modality|domain|scale|dataset>/<value>``, each
accuracy with a 95 % bootstrap CI (basic, like the official scripts); ``predictions.parquet`` has one row per
question (with the response for generative models); ``results.md`` the tables.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from microbench.data.cognition import CognitionDataModule
from microbench.metrics.cognition import cognition_metrics
from microbench.models.zero_shot import ZeroShotScorer
from microbench.results.record import RunRecord
from microbench.results.report import cognition_markdown, pct
from microbench.tasks.records import new_record, run_context, write_run
from microbench.tasks.trainer import bootstrap_settings, build_model, log_record, start_run, trainer_for

log = logging.getLogger(__name__)


def _data(cfg: DictConfig, transform=None) -> CognitionDataModule:
    c = cfg.cognition
    dm = CognitionDataModule(path=c.path, format=c.get("format", "auto"), revision=c.get("revision"),
                             split=c.get("split"), batch_size=int(cfg.data.get("batch_size", 32)),
                             transform=transform)
    dm.setup("test")
    return dm


def contrastive(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """Each option scored as ``question + ' ' + option`` against the image (zero-shot)."""
    t0, out_dir = start_run(cfg)
    model = build_model(cfg.model, cfg.get("inference"))
    dm = _data(cfg, model.preprocess)
    scorer = ZeroShotScorer(model, sources=("questions",))
    trainer_for(cfg, logger=False, enable_checkpointing=False, enable_model_summary=False).test(
        scorer, datamodule=dm, verbose=False)
    preds, skipped = scorer.predictions, scorer.skipped
    valid = dm.questions()
    unscored = int(valid["valid"].sum() - len(preds))
    return _finish(cfg, t0, out_dir, dm, model, preds, prompt="question + ' ' + option", unscored=unscored,
                   failed_images=list(skipped.get("failed_images", [])))


def generative(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """Every question to a generative model; an image that could not be read or sent is a failed answer (scored
    wrong, counted)."""
    from microbench.generative.harness import run_generative

    t0, out_dir = start_run(cfg)
    model = build_model(cfg.model, cfg.get("inference"))
    dm = _data(cfg)
    items = dm.questions()
    preds = run_generative(items[items["valid"]], dm.items.image_bytes, model, progress=True)
    failed = [f"question {r}: {e}" for r, e in zip(preds["row_idx"], preds["error"], strict=True)
              if isinstance(e, str) and e.startswith("image unreadable")]
    return _finish(cfg, t0, out_dir, dm, model, preds, prompt=model.prompt_style, failed_images=failed,
                   backend_stats=model.stats.to_dict())


def random(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """The official Random model: every question takes its draw (invalid ones too, as in the official loop)."""
    from microbench.generative.harness import random_cognition

    t0, out_dir = start_run(cfg)
    model = build_model(cfg.model, cfg.get("inference"))
    dm = _data(cfg)
    items = dm.questions()
    preds = random_cognition(items, seed=model.seed)[items["valid"].to_numpy()].reset_index(drop=True)
    return _finish(cfg, t0, out_dir, dm, model, preds, prompt="random")


def _finish(cfg: DictConfig, t0: float, out_dir: Path, dm: CognitionDataModule, model, preds: pd.DataFrame, *,
            prompt, unscored: int = 0, failed_images: list | None = None,
            backend_stats: dict | None = None) -> tuple[RunRecord, dict]:
    items = dm.questions()
    failed_images = failed_images or []
    boot = bootstrap_settings(cfg)
    metrics = cognition_metrics(preds, items, boot)
    invalid = items[~items["valid"]]
    if unscored or failed_images:
        log.warning("%d question(s) not scored: their image could not be read (metrics.json -> skipped.failed_images, "
                    "e.g. %s)", unscored or len(failed_images), (failed_images or ["?"])[0])
    info = model.describe()
    record = new_record(
        run_context(cfg, t0, out_dir), task="cognition", model=info,
        data={**dm.source.to_dict(), "format": dm.format},
        split={"name": cfg.cognition.get("split") or "all", "questions": int(len(items))},
        headline={"cognition": metrics["cognition/all"]}, metrics=metrics,
        skipped={"invalid_items": int(len(invalid)), "items_of_failed_images": unscored,
                 "failed_images": failed_images,
                 "problems": invalid[["qid", "problem"]].astype(str).to_dict("records")},
        prompt=prompt, bootstrap=boot, n_predictions=int(len(preds)), backend_stats=backend_stats or {},
        data_problems={"duplicate_ids": dm.items.duplicate_ids})
    # what rescoring needs without the data: the breakdowns and the image (the cluster) of every question
    keep = [c for c in ("qid", "question", "answer", "image_id", "subdomain", "modality", "domain", "scale")
            if c in items and c not in preds]
    preds = preds.join(items.set_index("row_idx")[keep], on="row_idx")
    write_run(out_dir, record, tables={"predictions.parquet": preds},
              texts={"results.md": cognition_markdown(record.to_dict())})
    log.info("%s cognition: %s -> %s", info["name"], pct(metrics["cognition/all"]), out_dir)
    log_record(cfg, record, out_dir / "results.md")
    return record, {"datamodule": dm, "model": model, "predictions": preds}
