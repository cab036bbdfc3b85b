"""Perception (closed VQA) behind ``python src/eval.py``: a contrastive model zero-shot, the official Random
baseline, or a generative model with the official prompt.

Each writes to ``paths.output_dir``: ``metrics.json`` (every metric with its CI and n, the model, the data, the
split, the resolved config, the package version and timings), ``predictions.parquet`` (one row per scored item)
and ``results.md`` (a Table-1-style summary and every breakdown).
"""

from __future__ import annotations

import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from microbench.models.zero_shot import ZeroShotScorer, random_baseline
from microbench.results.io import this_runs_record
from microbench.results.record import RunRecord
from microbench.tasks.records import PerceptionRecordWriter, run_context, write_perception_run
from microbench.tasks.trainer import (
    bootstrap_settings,
    build_model,
    close_loggers,
    instantiate_loggers,
    log_record,
    start_run,
    trainer_for,
)


def sources_of(cfg: DictConfig) -> tuple[str, ...]:
    """The text sources scored (checked before the run: :class:`~microbench.tasks.settings.EvalSettings`)."""
    return tuple(cfg.get("sources") or ("captions",))


def _context(cfg: DictConfig, t0: float, out_dir: Path, sources, **more) -> dict:
    return run_context(cfg, t0, out_dir, sources=sources, bootstrap=bootstrap_settings(cfg), **more)


def zero_shot(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """The official CLIP protocol (and, with ``sources=[captions,questions]``, question + option texts)."""
    t0, out_dir = start_run(cfg)
    sources = sources_of(cfg)
    context = _context(cfg, t0, out_dir, sources)
    t = time.perf_counter()
    backbone = build_model(cfg.model, cfg.get("inference"))
    context["timings"]["build_model"] = round(time.perf_counter() - t, 3)
    dm = instantiate(cfg.data, transform=backbone.preprocess)
    writer = PerceptionRecordWriter(context)
    scorer = ZeroShotScorer(backbone, sources=sources, text_batch_size=int(cfg.get("text_batch_size", 256)),
                            on_scored=writer)
    trainer = trainer_for(cfg, logger=instantiate_loggers(cfg) or False, enable_checkpointing=False,
                          enable_model_summary=False)
    trainer.test(scorer, datamodule=dm, verbose=False)
    # spawned workers (ddp_spawn) keep the record in the worker: read back only when this run wrote it; with one
    # process per rank (trainer=ddp) every rank joins the read-back, rank 0 too, so that no rank waits on one gone
    record = writer.record
    if record is None or trainer.world_size > 1:
        written = this_runs_record(out_dir / "metrics.json", context["run_id"], trainer)
        record = record or RunRecord.from_dict(written, outputs={"results": str((out_dir / "results.md").resolve())})
    close_loggers(trainer.loggers)
    return record, {"backbone": backbone, "datamodule": dm, "trainer": trainer, "scorer": scorer}


def random(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """The official Random baseline: every present item takes its draw, as in the official loop; invalid items are
    then not scored."""
    t0, out_dir = start_run(cfg)
    sources = sources_of(cfg)
    model = build_model(cfg.model, cfg.get("inference"))
    dm = instantiate(cfg.data)
    dm.setup("test")
    questions = dm.questions()
    items = questions[questions["source"].isin(sources)]
    preds = random_baseline(items, seed=model.seed)[items["valid"].to_numpy()].reset_index(drop=True)
    invalid = questions[questions["source"].isin(sources) & ~questions["valid"]]
    skipped = {"invalid_items": len(invalid), "items_of_failed_images": 0, "failed_images": [],
               "problems": invalid[["row_idx", "key", "problem"]].astype(str).to_dict("records")}
    record = write_perception_run(preds, skipped, None, context=_context(
        cfg, t0, out_dir, sources, datamodule=dm, model=model.describe()))
    return record, {"datamodule": dm, "model": model}


def generative(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """Every perception question (``questions`` column) to a generative model with the official prompt."""
    from microbench.generative.harness import run_generative

    t0, out_dir = start_run(cfg)
    backend = build_model(cfg.model, cfg.get("inference"))
    dm = instantiate(cfg.data)
    dm.setup("test")
    questions = dm.questions()
    items = questions[(questions["source"] == "questions") & questions["valid"]]
    preds = run_generative(items, dm.encoded_image, backend, progress=True)
    invalid = questions[(questions["source"] == "questions") & ~questions["valid"]]
    skipped = {"invalid_items": len(invalid), "items_of_failed_images": 0, "failed_images": [],
               "failed_answers": int(preds["error"].notna().sum()),
               "problems": invalid[["row_idx", "key", "problem"]].astype(str).to_dict("records")}
    context = _context(cfg, t0, out_dir, ("questions",), datamodule=dm, model=backend.describe(),
                       task="generative_perception",
                       extra={"backend_stats": backend.stats.to_dict(), "prompt": backend.prompt_style})
    context["timings"]["generation"] = backend.stats.seconds
    record = write_perception_run(preds, skipped, None, context=context)
    log_record(cfg, record, out_dir / "results.md")
    return record, {"datamodule": dm, "backend": backend, "predictions": preds}
