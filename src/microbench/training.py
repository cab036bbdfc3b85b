"""The training tasks behind ``python src/train.py``: fine-tuning (``task=finetune``) and linear probes
(``task=linear_probe``). Each returns ``(metrics, objects)`` and writes its results atomically to
``paths.output_dir``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import microbench
from microbench.data.labelled import build_class_space
from microbench.evaluate import write_run
from microbench.loggers import make_loggers
from microbench.results.records import start_run, write_json, write_text
from microbench.studies.forgetting import study_alphas

log = logging.getLogger(__name__)


def _container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _data(cfg: DictConfig, cls: str, **kwargs):
    data_cfg = OmegaConf.merge(cfg.data, {"_target_": cls})
    return instantiate(data_cfg, **kwargs)


def checkpoint_dir(cfg: DictConfig) -> Path:
    """``cfg.checkpoint_dir`` or ``<paths.checkpoint_dir>/<task_name>/<date>_<time>`` (never reused)."""
    if cfg.get("checkpoint_dir"):
        return Path(cfg.checkpoint_dir)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return Path(cfg.paths.checkpoint_dir) / str(cfg.task_name) / stamp


def build_callbacks(cfg: DictConfig, ckpt_dir: Path) -> tuple[list, dict]:
    """The configured callbacks (checkpoints write to ``ckpt_dir``), as a list and by name."""
    callbacks, named = [], {}
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None:
            continue
        if str(cb_cfg.get("_target_", "")).endswith("LearningRateMonitor") and (
                not cfg.get("logger") or cfg.trainer.get("fast_dev_run")):
            continue  # nothing to log the learning rate to (logger=null, debug=fast_dev_run)
        kwargs = {"dirpath": str(ckpt_dir)} if name in ("model_checkpoint", "last_checkpoint") else {}
        named[name] = instantiate(cb_cfg, **kwargs)
        callbacks.append(named[name])
    return callbacks, named


def _find(folder: Path, pattern: str) -> str:
    found = sorted(Path(folder).glob(pattern))
    return str(found[-1]) if found else ""


def finetune(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit, test on the held-out split of the training datasets, then run the official zero-shot protocol there."""
    t0, out_dir = start_run(cfg)
    backbone = instantiate(cfg.model)
    dm = _data(cfg, "microbench.data.labelled.LabelledDataModule", transform=backbone.preprocess,
               train_transform=backbone.train_transform, drop_last_train=cfg.module.objective == "contrastive")
    dm.setup("fit")
    record = {"model_config": _container(cfg.model), "data": dm.source.to_dict(),
              "split": dm.split_spec.to_dict(), "filters": dm.filters, "config": _container(cfg),
              "microbench_version": microbench.__version__}
    if cfg.get("ckpt_path"):  # before fitting: a wrong file is one line, not a traceback from Lightning
        from microbench.checkpoints import check_resume_checkpoint

        check_resume_checkpoint(cfg.ckpt_path, "finetune", backbone.name)
    module = instantiate(cfg.module)(backbone=backbone, seed=cfg.seed, record=record)
    ckpt_dir = checkpoint_dir(cfg)
    callbacks, named = build_callbacks(cfg, ckpt_dir)
    study_cb = None
    fg = cfg.get("forgetting") or {}
    if fg.get("enabled"):
        from functools import partial

        from microbench.studies.callback import ForgettingCallback
        from microbench.studies.run import make_eval_dm

        whole = OmegaConf.merge(cfg.data, {"datasets": None})  # the study scores the whole benchmark
        study_cb = ForgettingCallback(partial(make_eval_dm, whole, backbone.preprocess), out_dir / "forgetting",
                                      study_alphas(fg.alphas, fg.get("extrapolate", False)), fg.towers,
                                      float(fg.keep_target_gain), cache_dir=fg.get("result_cache"),
                                      n_resamples=int(fg.n_resamples), make_base=partial(instantiate, cfg.model))
        callbacks.append(study_cb)
    loggers = make_loggers(cfg) or False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    fit_s = time.perf_counter() - t0

    best_cb, last_cb = named.get("model_checkpoint"), named.get("last_checkpoint")
    best = (best_cb.best_model_path if best_cb is not None else "") or ""
    last = (last_cb.best_model_path if last_cb is not None else "") or ""
    if not trainer.is_global_zero or trainer.strategy.launcher is not None:  # spawned: paths live in the workers
        best = best or _find(ckpt_dir, "best_epoch*.ckpt")
        last = last or _find(ckpt_dir, "last.ckpt")
    metrics: dict[str, Any] = {"fit_seconds": round(fit_s, 2), "best_checkpoint": best or None,
                               "last_checkpoint": last or None,
                               "checkpoint_dir": str(ckpt_dir) if (best or last) else None,
                               "class_space": dm.class_space.to_dict()}
    if cfg.get("test_after_fit", True) and not trainer.fast_dev_run:
        use = best or None  # the path itself: "best" is ambiguous with two ModelCheckpoint callbacks
        results = trainer.test(module, datamodule=dm, ckpt_path=use, verbose=False)
        metrics["test"] = results[0] if results else {}
        metrics["tested_checkpoint"] = best or "final weights"
    if cfg.get("eval_in_domain", True) and not trainer.fast_dev_run and trainer.is_global_zero:
        metrics["in_domain_zero_shot"] = in_domain_zero_shot(cfg, module, out_dir / "in_domain")
    st = study_cb.result(trainer) if study_cb is not None else None
    if st is not None:
        metrics["forgetting"] = {"report": str(out_dir / "forgetting" / "forgetting.md"),
                                 "chosen_alpha": st["selection"]["alpha"],
                                 "test": {n: {k: st["splits"]["test"]["models"][n][k]["acc"]["value"]
                                              for k in ("target/fine", "supported/all")}
                                          for n in ("base", "finetuned")}}
    metrics["total_seconds"] = round(time.perf_counter() - t0, 2)
    if trainer.is_global_zero:
        write_json(out_dir / "train_metrics.json", metrics)
    return metrics, {"backbone": backbone, "datamodule": dm, "module": module, "trainer": trainer}


def in_domain_zero_shot(cfg: DictConfig, module, out_dir: Path) -> dict:
    """The official zero-shot protocol on the held-out test split of the training datasets (in-domain gain)."""
    from microbench.models.zero_shot import ZeroShotScorer

    backbone = module.backbone
    dm = _data(cfg, "microbench.data.datamodule.PerceptionDataModule", transform=backbone.preprocess, split="test")
    context = {"output_dir": str(out_dir), "sources": ("captions",), "t0": time.perf_counter(),
               "bootstrap": {"n_resamples": 9999, "confidence": 0.95, "seed": 0},
               "config": _container(cfg), "timings": {}}
    holder: dict = {}

    def on_scored(preds, skipped, scorer):
        holder["record"] = write_run(preds, skipped, scorer, context=context)

    trainer = L.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.test(ZeroShotScorer(backbone, on_scored=on_scored, progress=False), datamodule=dm, verbose=False)
    return holder["record"]["headline"]["captions"] if "record" in holder else {}


# --- linear probes --------------------------------------------------------------------------------------------

def linear_probe(cfg: DictConfig) -> tuple[dict, dict]:
    """Probes on every kept source dataset: full data and k-shot, weight decay on val, mean ± std over seeds."""
    from microbench.features import FeatureCache
    from microbench.models.finetune import class_text_embeddings
    from microbench.models.linear_probe import WEIGHT_DECAYS, ProbeData, sweep

    t0, out_dir = start_run(cfg)
    p = cfg.probe
    fast = bool(cfg.trainer.get("fast_dev_run", False))
    backbone = instantiate(cfg.model)
    dm = _data(cfg, "microbench.data.datamodule.PerceptionDataModule", transform=backbone.preprocess, split="all")
    dm.setup()
    feats, _, hit = FeatureCache(p.cache_dir).get(backbone, dm, progress=True)
    images = dm.images("all")
    row_to_image = np.full(int(dm.rows["row_idx"].max()) + 1, -1, dtype=np.int64)
    for i, rows in enumerate(images.rows):
        row_to_image[rows] = i
    shots = list(p.shots)[:1] if fast else list(p.shots)
    seeds = list(p.seeds)[:1] if fast else list(p.seeds)
    wds = tuple(p.weight_decays) if p.get("weight_decays") else WEIGHT_DECAYS
    wds = wds[:2] if fast else wds
    results, table = {}, []
    names = sorted(dm.rows["dataset"].unique())[:1] if fast else sorted(dm.rows["dataset"].unique())
    from tqdm.auto import tqdm

    bar = tqdm(names, desc="linear probes", unit="dataset", dynamic_ncols=True)
    for i, name in enumerate(bar, 1):
        bar.set_postfix_str(name)
        t_ds = time.perf_counter()
        rows = dm.rows[dm.rows["dataset"] == name]
        space, class_of_row, _ = build_class_space(rows, dm.question_table.frame)
        img = row_to_image[rows["row_idx"].to_numpy()]
        ok = ~torch.isnan(feats[img]).any(1).numpy()
        split = rows["split"].to_numpy()
        parts = {s: np.flatnonzero(ok & (split == s)) for s in ("train", "val", "test")}
        if min(len(v) for v in parts.values()) == 0 or len(np.unique(class_of_row[parts["train"]])) < 2:
            log.warning("skipping %s: empty split or a single training class %s", name,
                        {k: len(v) for k, v in parts.items()})
            results[name] = {"skipped": "empty split or single training class"}
            continue
        zs = None
        if p.get("zs_init") and backbone.has_text:
            zs = class_text_embeddings(backbone, space.prompts)
        data = ProbeData(*[t for s in ("train", "val", "test") for t in
                           (feats[img[parts[s]]], class_of_row[parts[s]])], n_classes=space.num_classes,
                         zs_weights=zs)
        results[name] = {}
        for k in shots:
            r = sweep(data, shots=k, seeds=seeds, weight_decays=wds, zs_init=bool(p.get("zs_init")),
                      zs_scale=float(backbone.logit_scale) if backbone.has_text else 100.0)
            results[name][str(k)] = r
            if k == shots[-1]:
                log.info("linear probe %d/%d %s: %s (%.1f s)", i, len(names), name, ", ".join(
                    f"{s}-shot {100 * results[name][str(s)]['acc']['mean']:.1f}" if s != "full" else
                    f"full {100 * results[name]['full']['acc']['mean']:.1f}" for s in shots),
                    time.perf_counter() - t_ds)
            table.append({"dataset": name, "shots": str(k), "n_train": r["n_train"], "n_test": r["n_test"],
                          **{f"{m}_mean": r[m]["mean"] for m in ("acc", "balanced_acc", "macro_f1")},
                          **{f"{m}_std": r[m]["stdev"] for m in ("acc", "balanced_acc", "macro_f1")}})
    frame = pd.DataFrame(table)
    record = {"task": "linear_probe", "model": backbone.describe(), "data": dm.source.to_dict(),
              "split": dm.split_spec.to_dict(), "shots": [str(s) for s in shots], "seeds": seeds,
              "weight_decays": list(wds), "feature_cache_hit": hit, "results": results,
              "seconds": round(time.perf_counter() - t0, 2), "config": _container(cfg)}
    write_json(out_dir / "linear_probe.json", record)
    if len(frame):
        tmp = out_dir / ".linear_probe.csv.tmp"
        frame.to_csv(tmp, index=False)
        tmp.replace(out_dir / "linear_probe.csv")
    write_text(out_dir / "linear_probe.md", probe_markdown(frame, backbone.name))
    return record, {"backbone": backbone, "datamodule": dm, "features": feats}


def probe_markdown(frame: pd.DataFrame, model: str) -> str:
    lines = [f"# Linear probes: {model}", "", "Accuracy % (mean ± std over seeds); weight decay chosen on val.", ""]
    if frame.empty:
        return "\n".join(lines + ["(no dataset could be probed)", ""])
    pivot = frame.assign(cell=[f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(frame.acc_mean, frame.acc_std,
                                                                               strict=True)])
    shots = list(dict.fromkeys(frame["shots"]))
    lines.append("| dataset | " + " | ".join(f"{s}-shot" if s != "full" else "full" for s in shots) + " |")
    lines.append("|---|" + "---|" * len(shots))
    for name, g in pivot.groupby("dataset"):
        cells = dict(zip(g["shots"], g["cell"], strict=True))
        lines.append(f"| {name} | " + " | ".join(cells.get(s, "—") for s in shots) + " |")
    return "\n".join(lines) + "\n"


def localization(cfg: DictConfig) -> tuple[dict, dict]:
    from microbench.localization_tasks import train_localization

    return train_localization(cfg)


TASKS = {"finetune": finetune, "linear_probe": linear_probe, "localization": localization}


def train(cfg: DictConfig) -> tuple[dict, dict]:
    task = cfg.get("task", "finetune")
    if task not in TASKS:
        from microbench.errors import UserError

        raise UserError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task](cfg)

