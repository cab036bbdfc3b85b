"""Localization runs: ``python src/train.py task=localization`` (train a head, then test) and
``python src/eval.py task=localization checkpoint=...`` (evaluate a trained head).

Each writes a run record to ``paths.output_dir`` in the same shape as perception runs, so the leaderboard merges
them: ``metrics.json`` (COCO bbox[/segm] AP, AP50, AP75, AR; GRIT per dataset/class, macro and pooled; counts;
model, data, split, config), ``predictions.parquet`` (one row per (image, class): GRIT score, #pred, #gt),
``detections.json`` (COCO results format), ``ground_truth_coco.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import microbench
from microbench.data.config import LOCALIZATION_DM, PERCEPTION_DM, data_module_cfg
from microbench.loggers import make_loggers
from microbench.models.backbones.base import state_fingerprint
from microbench.results.records import start_run, this_runs_record, write_json, write_parquet, write_text

log = logging.getLogger(__name__)

HEADLINE = {"bbox_AP": "bbox/AP", "bbox_AP50": "bbox/AP50", "segm_AP": "segm/AP", "grit": "grit/macro"}


def _container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _as_entry(value: float, n: int) -> dict:
    """Metric entries share the perception shape (value, ci, n); COCO/GRIT have no bootstrap CI."""
    return {"value": None if value is None or np.isnan(value) else float(value), "ci": None, "n": int(n)}


def write_localization_run(result: dict, module, *, context: dict) -> dict:
    """Write the run record of one scored split (called on global rank 0)."""
    out_dir = Path(context["output_dir"])
    dm = context.get("datamodule") or module.trainer.datamodule
    m, counts = result["metrics"], result["counts"]
    per_image = result["per_image"]
    n_grit = len(per_image)
    metrics = {f"loc/{k}": _as_entry(v, n_grit if k.startswith("grit/") else counts["images"]) for k, v in m.items()}
    record = {
        "run_id": context.get("run_id"),
        "microbench_version": microbench.__version__,
        "task": "localization",
        "head": module.hparams.head,
        "model": {**module.backbone.describe(), "head_fingerprint": state_fingerprint(module.head_state_dict()),
                  "checkpoint": context.get("checkpoint")},
        "data": {**dm.source.to_dict(), "targets": dm.targets, "filters": dm.filters,
                 "exclude_datasets": dm.exclude_datasets, "class_names": dm.class_names},
        "split": {"name": dm.split, **dm.split_spec.to_dict(), "images": counts["images"]},
        "headline": {k: metrics[f"loc/{v}"] for k, v in HEADLINE.items() if f"loc/{v}" in metrics},
        "metrics": metrics,
        "counts": counts,
        "skipped": {"failed_images": result.get("failed_images", []), **dm.table.skipped},
        "timings_s": {**context.get("timings", {}), **module.timings,
                      "total": round(time.perf_counter() - context["t0"], 3)},
        "environment": {"python": platform.python_version(), "torch": __import__("torch").__version__,
                        "lightning": L.__version__},
        "config": context["config"],
    }
    images = dm.images(dm.split)
    from microbench.data.localization import coco_ground_truth
    from microbench.metrics.localization import coco_detections

    preds = getattr(module, "_last_preds", None)
    write_parquet(out_dir / "predictions.parquet", per_image)
    if preds is not None:
        write_json(out_dir / "detections.json", coco_detections(preds, len(images), module.hparams.head == "segmentation"))
    write_json(out_dir / "ground_truth_coco.json", coco_ground_truth(images, dm.class_names))
    write_json(out_dir / "metrics.json", record)
    write_text(out_dir / "results.md", localization_markdown(record, per_image))
    logger = getattr(module, "logger", None)
    if logger is not None:
        logger.log_metrics({k: v["value"] for k, v in metrics.items() if v["value"] is not None})
    h = record["headline"]
    log.info("%s %s: bbox AP %s, GRIT %s -> %s", record["model"]["name"], record["head"],
             _fmt(h.get("bbox_AP")), _fmt(h.get("grit")), out_dir)
    return record


def _fmt(entry: dict | None) -> str:
    return "—" if not entry or entry.get("value") is None else f"{100 * entry['value']:.2f}"


def localization_markdown(record: dict, per_image) -> str:
    m = record["metrics"]
    model = record["model"]
    lines = [f"# μ-Bench localization ({record['head']}): {model['name']}", "",
             f"Backbone `{model['name']}` (weights `{model['fingerprint']}`), head `{model['head_fingerprint']}` on "
             f"`{record['data']['location']}` (fingerprint `{record['data']['fingerprint']}`), split "
             f"`{record['split']['name']}`: {record['counts']['images']} images, {record['counts']['ground_truth']} "
             f"objects (max {record['counts']['max_ground_truth_per_image']} per image), classes "
             f"{', '.join(record['data']['class_names'])}.", "",
             f"COCO metrics (pycocotools) at up to {record['counts']['max_dets']} detections per image; GRIT "
             f"localization score (official μ-Bench protocol) on detections with score ≥ "
             f"{record['counts']['grit_score_threshold']}, one question per (image, class present). All in %.", "",
             "| metric | value |", "|---|---|"]
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AR_max", "segm/AP", "segm/AP50", "segm/AP75",
                "segm/AR_max", "grit/macro", "grit/pooled"):
        if f"loc/{key}" in m:
            lines.append(f"| {key} | {_fmt(m[f'loc/{key}'])} |")
    classes = record["data"]["class_names"]
    lines += ["", "## Per class (AP)", "", "| class | bbox AP | segm AP |", "|---|---|---|"]
    for c in classes:
        lines.append(f"| {c} | {_fmt(m.get(f'loc/bbox/per_class/{c}'))} | {_fmt(m.get(f'loc/segm/per_class/{c}'))} |")
    lines += ["", "## GRIT per dataset and class", "", "| dataset | class | GRIT | images | mean #pred | mean #gt |",
              "|---|---|---|---|---|---|"]
    if len(per_image):
        for (d, c), g in per_image.groupby(["dataset", "class"]):
            lines.append(f"| {d} | {c} | {100 * g['grit'].mean():.2f} | {len(g)} | {g['n_pred'].mean():.1f} | "
                         f"{g['n_gt'].mean():.1f} |")
    sk = record["skipped"]
    lines += ["", "## Not scored", "", f"- images that failed to decode: {len(sk.get('failed_images', []))}",
              *[f"- {k.replace('_', ' ')}: {v}" for k, v in sk.items() if k != "failed_images"], ""]
    return "\n".join(lines)


def _make_module(cfg: DictConfig, backbone, dm, record: dict, on_scored=None):
    return instantiate(cfg.module)(backbone=backbone, class_names=dm.class_names, record=record,
                                   on_scored=on_scored, seed=int(cfg.seed))


def train_localization(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit a detection/segmentation head, then test the best checkpoint and write the run record."""
    t0, out_dir = start_run(cfg)
    backbone = instantiate(cfg.model)
    if cfg.get("ckpt_path"):  # before fitting: a wrong file is one line, not a traceback from Lightning
        from microbench.checkpoints import check_resume_checkpoint

        check_resume_checkpoint(cfg.ckpt_path, "localization", backbone.name)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    record = {"model_config": _container(cfg.model), "data": dm.source.to_dict(), "class_names": dm.class_names,
              "targets": dm.targets, "split": dm.split_spec.to_dict(), "microbench_version": microbench.__version__,
              "datasets": sorted({im.dataset for im in dm.images("all")})}
    context = {"output_dir": str(out_dir), "t0": t0, "config": _container(cfg), "timings": {},
               "run_id": uuid.uuid4().hex}
    module = _make_module(cfg, backbone, dm, record, on_scored=partial(_on_scored, context=context))
    from microbench.training import build_callbacks, checkpoint_dir

    callbacks, named = build_callbacks(cfg, checkpoint_dir(cfg))
    study_cb = _forgetting_callback(cfg, backbone, dm, module, out_dir)
    if study_cb is not None:
        callbacks.append(study_cb)
    loggers = make_loggers(cfg) or False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    best_cb, last_cb = named.get("model_checkpoint"), named.get("last_checkpoint")
    best = (best_cb.best_model_path if best_cb is not None else "") or ""
    last = (last_cb.best_model_path if last_cb is not None else "") or ""
    metrics: dict[str, Any] = {"fit_seconds": round(time.perf_counter() - t0, 2), "best_checkpoint": best or None,
                               "last_checkpoint": last or None, "class_names": dm.class_names}
    if cfg.get("test_after_fit", True) and not trainer.fast_dev_run:
        context["checkpoint"] = best or last or None
        trainer.test(module, datamodule=dm, ckpt_path="best" if best else None, verbose=False)
        rec = this_runs_record(out_dir / "metrics.json", context["run_id"], trainer)
        metrics["test"] = {k: v["value"] for k, v in rec["headline"].items()}
    st = study_cb.result(trainer) if study_cb is not None else None
    if st is not None:
        metrics["forgetting"] = {"report": str(out_dir / "forgetting" / "forgetting.md"),
                                 "chosen_alpha": st["selection"]["alpha"],
                                 "localization_test": st["splits"]["test"]["localization"]}
    metrics["total_seconds"] = round(time.perf_counter() - t0, 2)
    if trainer.is_global_zero:
        write_json(out_dir / "train_metrics.json", metrics)
    return metrics, {"backbone": backbone, "datamodule": dm, "module": module, "trainer": trainer}


def _forgetting_callback(cfg: DictConfig, backbone, dm, module, out_dir: Path):
    """With ``forgetting.enabled`` and a trainable tower: after fit, base vs fine-tuned tower vs θ(α) on the whole
    perception benchmark *and* on localization (the trained head on each θ(α))."""
    fg = cfg.get("forgetting") or {}
    if not fg.get("enabled"):
        return None
    if module.hparams.freeze_backbone:
        log.warning("forgetting.enabled ignored: the backbone is frozen (module.freeze_backbone=true), so nothing "
                    "can be forgotten; set module.freeze_backbone=false to fine-tune the tower")
        return None
    from functools import partial

    from microbench.models.localization import LocalizationModule
    from microbench.studies.callback import ForgettingCallback
    from microbench.studies.run import make_eval_dm

    hp = {k: v for k, v in module.hparams.items() if k not in ("record",)}
    holder: dict = {}

    def sweep(split: str, base: dict, finetuned: dict, alphas: list[float], keys) -> dict:
        if "sweeper" not in holder:  # a twin module sharing the backbone, carrying the head trained so far
            holder["sweeper"] = LocalizationSweeper(LocalizationModule(backbone, **hp),
                                                    localization_dm_factory(cfg.data, dm.targets, dm.class_names))
        twin = holder["sweeper"].module
        twin.detector.load_state_dict({**twin.detector.state_dict(), **module.head_state_dict()})
        return holder["sweeper"](split, base, finetuned, alphas, keys)

    whole = data_module_cfg(cfg.data, PERCEPTION_DM)
    targets = sorted({im.dataset for im in dm.images("all")})
    from microbench.studies.forgetting import study_alphas

    return ForgettingCallback(partial(make_eval_dm, whole, backbone.preprocess), out_dir / "forgetting",
                              study_alphas(fg.alphas, fg.get("extrapolate", False)), fg.towers,
                              float(fg.keep_target_gain), target_datasets=targets, cache_dir=fg.get("result_cache"),
                              n_resamples=int(fg.n_resamples), localization=sweep,
                              make_base=partial(instantiate, cfg.model))


def _on_scored(result: dict, module, context: dict) -> None:
    """Picklable (``functools.partial``) so that spawned DDP workers can write the record on rank 0."""
    write_localization_run(result, module, context=context)


def evaluate_localization(cfg: DictConfig) -> tuple[dict, dict]:
    """Evaluate a trained head (``checkpoint=``) on ``data.split`` of any copy; writes the run record."""
    from microbench.errors import UserError
    from microbench.models.localization import detector_from_checkpoint

    if cfg.model.get("kind") == "generative":
        return evaluate_generative_localization(cfg)
    if not cfg.get("checkpoint"):
        raise UserError("localization evaluation needs a trained head: checkpoint=<.ckpt from "
                        "python src/train.py task=localization ...> (e.g. experiment=detect_nuclei)")
    t0, out_dir = start_run(cfg)
    module, ckpt = detector_from_checkpoint(cfg.checkpoint)
    hp = ckpt["hyper_parameters"]
    if not str(cfg.data.get("_target_", "")).endswith("LocalizationDataModule"):
        log.info("localization: evaluating the test split of %s (set data=ubench_localization to choose)",
                 cfg.data.path)
    defaults = {} if str(cfg.data.get("_target_", "")) == LOCALIZATION_DM else {"split": "test"}
    dm = instantiate(data_module_cfg(cfg.data, LOCALIZATION_DM, **defaults,
                                     targets=(hp.get("record") or {}).get("targets", "boxes"),
                                     classes=list(hp["class_names"]), strict_filters=False))
    dm.setup("test")
    context = {"output_dir": str(out_dir), "t0": t0, "config": _container(cfg), "timings": {},
               "checkpoint": str(cfg.checkpoint), "run_id": uuid.uuid4().hex}
    module.on_scored = partial(_on_scored, context=context)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False,
                                     enable_model_summary=False)
    trainer.test(module, datamodule=dm, verbose=False)
    record = this_runs_record(out_dir / "metrics.json", context["run_id"], trainer)
    return record, {"module": module, "datamodule": dm, "trainer": trainer}


class LocalizationSweeper:
    """``(split, base, finetuned, alphas, keys) -> {alpha name: metrics}``: a localization head scored on every
    θ(α) of its backbone in one pass over the split, each image decoded once (forgetting studies).
    ``make_dm(split)`` builds the :class:`LocalizationDataModule` of a split (once per split)."""

    def __init__(self, module, make_dm, accelerator: str = "cpu") -> None:
        self.module, self.make_dm, self.accelerator = module, make_dm, accelerator
        self._dms: dict = {}

    def __call__(self, split: str, base: dict, finetuned: dict, alphas, keys=None) -> dict[str, dict]:
        from microbench.studies.sweep import LocalizationInterpolationScorer, alpha_name

        if split not in self._dms:
            self._dms[split] = self.make_dm(split)
        scorer = LocalizationInterpolationScorer(self.module, base, finetuned, alphas, keys)
        trainer = L.Trainer(accelerator=self.accelerator, devices=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False)  # may run inside a fit
        trainer.test(scorer, datamodule=self._dms[split], verbose=False)
        return {alpha_name(a): m for a, m in scorer.results.items()}


def localization_dm_factory(data_cfg, targets: str, classes: list[str]):
    """``split -> LocalizationDataModule`` (set up) from a localization or perception data config, with the label
    space ``classes`` (a head's class names, in its order)."""
    def make(split: str):
        dm = instantiate(data_module_cfg(data_cfg, LOCALIZATION_DM, split=split, targets=targets,
                                         classes=list(classes), strict_filters=False, augment=False))
        dm.setup("test")
        return dm
    return make


def evaluate_generative_localization(cfg: DictConfig) -> tuple[dict, dict]:
    """The official generative detection protocol: for each image and each className present, ask ``Detect
    {className}`` (Qwen-VL) / ``detect {className}`` (PaliGemma, retried as ``segment {c}; {c}`` when the answer is
    exactly empty, as the official code), parse the boxes (``box_format``: qwen | qwen_lenient | paligemma; default from the model name) and score with GRIT."""
    from datasets import Image

    from microbench.generative.backends import Request
    from microbench.generative.boxes import PROMPTS, score_box_answers

    t0, out_dir = start_run(cfg)
    backend = instantiate(cfg.model)
    fmt = cfg.get("box_format") or ("paligemma" if "paligemma" in backend.model_name.lower() else "qwen")
    if fmt not in PROMPTS:
        from microbench.errors import UserError

        raise UserError(f"box_format must be one of {sorted(PROMPTS)}, got {fmt!r}")
    defaults = {} if str(cfg.data.get("_target_", "")) == LOCALIZATION_DM else {"split": "all"}  # official: all
    dm = instantiate(data_module_cfg(cfg.data, LOCALIZATION_DM, **defaults, targets="boxes", augment=False))
    dm.setup("test")
    images = dm.images(dm.split)
    raw = dm.hf.cast_column("image", Image(decode=False))

    def image_bytes(row: int) -> list[bytes]:
        value = raw[int(row)]["image"]
        return [value["bytes"] if value.get("bytes") else Path(value["path"]).read_bytes()]

    pairs = [(i, c) for i, im in enumerate(images) for c in sorted(set(im.classes))]
    reqs = [Request(f"{images[i].image_id}/{c}", PROMPTS[fmt].format(class_name=c),
                    lambda r=images[i].row: image_bytes(r)) for i, c in pairs]
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
    metrics = {f"loc/{k}": _as_entry(v, len(table)) for k, v in grit.items() if k != "unparsed_answers"}
    record = {
        "microbench_version": microbench.__version__, "task": "localization", "head": f"generative ({fmt} boxes)",
        "model": backend.describe(), "data": {**dm.source.to_dict(), "targets": "boxes", "filters": dm.filters,
                                              "class_names": dm.class_names},
        "split": {"name": dm.split, **dm.split_spec.to_dict(), "images": len(images)},
        "headline": {"grit": metrics.get("loc/grit/macro")}, "metrics": metrics,
        "counts": {"images": len(images), "questions": len(table), "unparsed_answers": grit["unparsed_answers"],
                   "failed_requests": int(answers["error"].notna().sum())},
        "backend_stats": stats, "skipped": dict(dm.table.skipped),
        "timings_s": {"total": round(time.perf_counter() - t0, 3)}, "config": _container(cfg),
    }
    write_parquet(out_dir / "predictions.parquet", table.assign(gt_boxes=table["gt_boxes"].map(json.dumps),
                                                                pred_boxes=table["pred_boxes"].map(json.dumps)))
    write_json(out_dir / "metrics.json", record)
    lines = [f"# μ-Bench localization (generative, {fmt} boxes): {record['model']['name']}", "",
             f"{len(images)} images, {len(table)} (image, class) questions, {grit['unparsed_answers']} answers without a "
             "parseable box (scored as no prediction). GRIT localization score in %.", "",
             f"**GRIT macro: {_fmt(metrics.get('loc/grit/macro'))}**, pooled {_fmt(metrics.get('loc/grit/pooled'))}",
             "", "| dataset | class | GRIT | questions | unparsed |", "|---|---|---|---|---|"]
    for (d, c), g in table.groupby(["dataset", "class"]):
        lines.append(f"| {d} | {c} | {100 * g['grit'].mean():.2f} | {len(g)} | {int((~g['parsed']).sum())} |")
    write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    return record, {"datamodule": dm, "backend": backend, "table": table}
