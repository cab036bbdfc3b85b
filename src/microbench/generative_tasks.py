"""``python src/eval.py task=cognition`` (expert multiple choice: contrastive, generative, blind or Random) and
generative perception (``task=perception`` with a generative ``model``), writing the same run records as
contrastive perception so the leaderboard puts every model side by side.

Cognition ``metrics.json``: ``cognition/all`` and ``cognition/<subdomain|modality|domain|scale|dataset>/<value>``,
each accuracy with a 95 % bootstrap CI (basic, like the official scripts); ``predictions.parquet`` has one row per
question (with the response for generative models); ``results.md`` the tables.
"""

from __future__ import annotations

import logging
import platform
import time
from functools import partial
from pathlib import Path

import lightning as L
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import microbench
from microbench.metrics.bootstrap import bootstrap_accuracy
from microbench.results.records import start_run, write_json, write_parquet, write_text
from microbench.results.report import pct

log = logging.getLogger(__name__)
BREAKDOWNS = ("subdomain", "modality", "domain", "scale", "dataset")


def _boot(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.bootstrap, resolve=True)


def cognition_metrics(preds: pd.DataFrame, items: pd.DataFrame, boot: dict) -> dict:
    meta = items.set_index("row_idx")
    frame = preds.join(meta[[c for c in BREAKDOWNS if c != "dataset"]], on="row_idx")
    est = partial(bootstrap_accuracy, n_resamples=int(boot["n_resamples"]), confidence=float(boot["confidence"]),
                  seed=int(boot["seed"]))
    out = {"cognition/all": est(frame["correct"].to_numpy()).to_dict()}
    for col in BREAKDOWNS:
        for value, g in frame.groupby(frame[col].fillna("unknown").astype(str)):
            out[f"cognition/{col}/{value}"] = est(g["correct"].to_numpy()).to_dict()
    if "correct_strict" in frame:  # the Random model: the official substring rule above, the strict rule here
        out["cognition_strict/all"] = est(frame["correct_strict"].to_numpy()).to_dict()
        for col in BREAKDOWNS:
            for value, g in frame.groupby(frame[col].fillna("unknown").astype(str)):
                out[f"cognition_strict/{col}/{value}"] = est(g["correct_strict"].to_numpy()).to_dict()
    return out


def _model_info(cfg: DictConfig) -> tuple[str, object]:
    kind = cfg.model.get("kind")
    if kind == "random":
        return "random", None
    if kind == "generative":
        return "generative", instantiate(cfg.model)
    return "contrastive", instantiate(cfg.model)


def evaluate_cognition(cfg: DictConfig) -> tuple[dict, dict]:
    """Score the configured cognition questions with the configured model; writes the run record."""
    from microbench.data.cognition import CognitionDataModule
    from microbench.generative.harness import random_cognition, run_generative

    t0, out_dir = start_run(cfg)
    kind, model = _model_info(cfg)
    c = cfg.cognition
    dm = CognitionDataModule(path=c.path, format=c.get("format", "auto"), revision=c.get("revision"),
                             split=c.get("split"), batch_size=int(cfg.data.get("batch_size", 32)),
                             transform=model.preprocess if kind == "contrastive" else None)
    dm.setup("test")
    items = dm.questions()
    valid = items[items["valid"]]
    stats: dict = {}
    if kind == "random":
        drawn = random_cognition(items, seed=int(cfg.model.get("seed", 42)))  # every question takes its draw
        preds = drawn[items["valid"].to_numpy()].reset_index(drop=True)
        info = {"name": "random", "kind": "random", "fingerprint": f"seed{int(cfg.model.get('seed', 42))}"}
    elif kind == "generative":
        preds = run_generative(valid, dm.items.image_bytes, model, progress=True)
        info, stats = model.describe(), model.stats.to_dict()
    else:
        from microbench.models.zero_shot import ZeroShotScorer

        holder: dict = {}
        scorer = ZeroShotScorer(model, sources=("questions",), on_scored=lambda p, s, m: holder.update(p=p, s=s))
        trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False,
                                         enable_model_summary=False)
        trainer.test(scorer, datamodule=dm, verbose=False)
        preds = holder["p"]
        info = model.describe()
        failed_images = list(holder["s"].get("failed_images", []))
    if kind == "generative":  # an image that could not be read or sent is a failed answer: counted below
        failed_images = [f"question {r}: {e}" for r, e in zip(preds["row_idx"], preds["error"], strict=True)
                         if isinstance(e, str) and e.startswith("image unreadable")]
    elif kind == "random":
        failed_images = []
    boot = _boot(cfg)
    metrics = cognition_metrics(preds, items, boot)
    invalid = items[~items["valid"]]
    unscored = int(len(valid) - len(preds)) if kind == "contrastive" else 0
    if unscored or failed_images:
        log.warning("%d question(s) not scored: their image could not be read (metrics.json -> skipped.failed_images, "
                    "e.g. %s)", unscored or len(failed_images), (failed_images or ["?"])[0])
    record = {
        "microbench_version": microbench.__version__, "task": "cognition", "model": info,
        "data": {**dm.source.to_dict(), "format": dm.format}, "split": {"name": c.get("split") or "all",
                                                                          "questions": int(len(items))},
        "prompt": getattr(model, "prompt_style", None) if kind == "generative" else
        ("question + ' ' + option" if kind == "contrastive" else "random"),
        "bootstrap": boot, "headline": {"cognition": metrics["cognition/all"]}, "metrics": metrics,
        "n_predictions": int(len(preds)), "backend_stats": stats,
        "skipped": {"invalid_items": int(len(invalid)), "items_of_failed_images": unscored,
                    "failed_images": failed_images,
                    "problems": invalid[["qid", "problem"]].astype(str).to_dict("records")},
        "data_problems": {"duplicate_ids": dm.items.duplicate_ids},
        "timings_s": {"total": round(time.perf_counter() - t0, 3)},
        "environment": {"python": platform.python_version(), "torch": __import__("torch").__version__},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    preds = preds.join(items.set_index("row_idx")[["qid", "question", "answer"]], on="row_idx")
    write_parquet(out_dir / "predictions.parquet", preds)
    write_json(out_dir / "metrics.json", record)
    write_text(out_dir / "results.md", cognition_markdown(record))
    log.info("%s cognition: %s -> %s", info["name"], pct(metrics["cognition/all"]), out_dir)
    return record, {"datamodule": dm, "model": model, "predictions": preds}


def cognition_markdown(record: dict) -> str:
    m = record["metrics"]
    sk = record["skipped"]
    n_q = record["split"]["questions"]
    not_scored = sk["invalid_items"] + sk.get("items_of_failed_images", 0)
    scored = f", {n_q - not_scored} scored" if not_scored else ""
    lines = [f"# μ-Bench cognition: {record['model']['name']}", "",
             f"`{record['data']['location']}` ({record['data']['kind']}, {n_q} questions{scored}), "
             f"prompt: {record['prompt']}. Accuracy % ± 95 % bootstrap half-width "
             f"({record['bootstrap']['n_resamples']} resamples).", "",
             f"**All questions: {pct(m['cognition/all'])}** (n = {m['cognition/all']['n']})", ""]
    if "cognition_strict/all" in m:
        lines += ["Random model: the figure above uses the official rule (correct iff the gold answer is a substring "
                  "of `question + ' ' + drawn option`, so a question that names its answer is always right); "
                  f"strict (the drawn option is the gold one): **{pct(m['cognition_strict/all'])}** "
                  f"(`cognition_strict/*`).", ""]
    for col in BREAKDOWNS:
        keys = [k for k in m if k.startswith(f"cognition/{col}/")]
        if keys:
            lines += [f"## Per {col}", "", f"| {col} | accuracy | n |", "|---|---|---|"]
            lines += [f"| {k.split('/', 2)[2]} | {pct(m[k])} | {m[k]['n']} |" for k in sorted(keys)]
            lines.append("")
    st = record.get("backend_stats") or {}
    if st.get("requests_sent") is not None:
        lines += ["## Backend", "", f"- requests sent: {st.get('requests_sent')}, cache hits: {st.get('cache_hits')}, "
                  f"retries: {st.get('retries')}, timeouts: {st.get('timeouts')}, failed (scored wrong): "
                  f"{st.get('failed')}, HTTP errors: {st.get('http_errors')}", ""]
    lines += ["## Not scored", "", f"- invalid questions: {sk['invalid_items']}"]
    if sk.get("items_of_failed_images"):
        lines.append(f"- questions whose image could not be read: {sk['items_of_failed_images']} "
                     f"({'; '.join(sk['failed_images'][:3])})")
    elif sk.get("failed_images"):
        lines.append(f"- answers lost to an unreadable image (scored wrong): {len(sk['failed_images'])}")
    dups = (record.get("data_problems") or {}).get("duplicate_ids") or {}
    if dups:
        lines.append(f"- question ids used more than once (each question scored on its own): {len(dups)} ids, e.g. "
                     f"{next(iter(dups))!r} × {next(iter(dups.values()))}")
    lines.append("")
    return "\n".join(lines)


def evaluate_generative_perception(cfg: DictConfig) -> tuple[dict, dict]:
    """Every perception question (``questions`` column) to a generative model with the official prompt."""
    from datasets import Image

    from microbench.evaluate import write_run
    from microbench.generative.harness import run_generative

    t0, out_dir = start_run(cfg)
    backend = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    dm.setup("test")
    questions = dm.questions()
    items = questions[(questions["source"] == "questions") & questions["valid"]]
    raw = dm.hf.cast_column("image", Image(decode=False))  # the encoded bytes, sent as they are

    def images_of(row: int) -> list[bytes]:
        value = raw[int(row)]["image"]
        return [value["bytes"] if value.get("bytes") else Path(value["path"]).read_bytes()]

    preds = run_generative(items, images_of, backend, progress=True)
    invalid = questions[(questions["source"] == "questions") & ~questions["valid"]]
    skipped = {"invalid_items": len(invalid), "items_of_failed_images": 0, "failed_images": [],
               "failed_answers": int(preds["error"].notna().sum()),
               "problems": invalid[["row_idx", "key", "problem"]].astype(str).to_dict("records")}
    context = {"output_dir": str(out_dir), "sources": ("questions",), "t0": t0, "bootstrap": _boot(cfg),
               "config": OmegaConf.to_container(cfg, resolve=True), "timings": {"generation": backend.stats.seconds},
               "datamodule": dm, "model": backend.describe(), "task": "generative_perception",
               "extra": {"backend_stats": backend.stats.to_dict(), "prompt": backend.prompt_style}}
    record = write_run(preds, skipped, None, context=context)
    return record, {"datamodule": dm, "backend": backend, "predictions": preds}
