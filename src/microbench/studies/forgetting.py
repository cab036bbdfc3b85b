"""Forgetting studies: what a fine-tune gained on its target datasets, what it forgot everywhere else on μ-Bench,
and how much WiSE-FT weight interpolation with the base model wins back.

``run_study`` evaluates the base model, the fine-tuned model and every interpolation θ(α) on the val and test splits
of the whole benchmark (one decode per split for the whole sweep), then reports, per model: accuracy on the target
tasks (the fine-tuning datasets) and the supported tasks (all others), coarse and fine, per dataset and the official
headline numbers, each with Δ vs base and a *paired* bootstrap 95 % CI (the same resampled items for both models).
The α is chosen on val (best supported-task accuracy among the α that keep at least ``keep_target_gain`` of the
fine-tune's target gain) and reported on test. The report (``forgetting.json``, ``forgetting.md``, ``alpha_sweep.png``
and ``dataset_deltas.png``) is :mod:`microbench.studies.report`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from microbench import distributed
from microbench.data.datamodule import PerceptionDataModule
from microbench.metrics.bootstrap import bootstrap_accuracy, paired_bootstrap_delta
from microbench.metrics.closed_vqa import closed_vqa_metrics, headline_table
from microbench.models.backbones.base import Backbone
from microbench.results.io import write_parquet
from microbench.studies.merging import MergeError, check_compatible
from microbench.studies.sweep import InterpolationScorer, alpha_name

log = logging.getLogger(__name__)
DEFAULT_ALPHAS = tuple(round(a, 2) for a in np.linspace(0, 1, 11))
LOCALIZATION_PREFIX = "detector.backbone.backbone."  # the backbone inside a LocalizationModule checkpoint
LOCALIZATION_KEYS = ("bbox/AP", "bbox/AP50", "segm/AP", "grit/macro")


# --- inputs -----------------------------------------------------------------------------------------------------

def load_finetuned_state(path: str | Path, backbone: Backbone, key: str = "finetuned"
                         ) -> tuple[dict[str, torch.Tensor], dict]:
    """The backbone weights of a fine-tuned checkpoint: a ``src/train.py`` Lightning checkpoint (``backbone.*`` keys
    of ``state_dict``) or a plain state dict of the same backbone; plus the checkpoint's ``microbench`` record (with
    the Lightning ``hyper_parameters`` and the loaded ``checkpoint`` itself, so it is read once)."""
    from microbench.checkpoints import read_checkpoint

    path = Path(path)
    blob = read_checkpoint(path, key, f"pass {key}=<a .ckpt written by src/train.py, or a state dict of the same "
                                      "backbone>")
    if not isinstance(blob, dict) or not any(isinstance(v, torch.Tensor) for v in
                                             (blob.get("state_dict", blob) or {}).values()):
        raise MergeError(f"{key}={path} holds no weights (a {type(blob).__name__} without tensors): pass a .ckpt "
                         "written by src/train.py or a state dict of the same backbone")
    record = dict(blob.get("microbench", {})) if isinstance(blob, dict) else {}
    if isinstance(blob, dict) and "hyper_parameters" in blob:
        record["hyper_parameters"] = blob["hyper_parameters"]  # e.g. a localization head's class names
        record["checkpoint"] = blob
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    for prefix in ("backbone.", LOCALIZATION_PREFIX):  # fine-tune / linear-probe, or localization checkpoints
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            break
    check_compatible(backbone.state_dict(), state, names=["base", f"{'fine-tuned' if key == 'finetuned' else key} ({path.name})"])
    return state, record


class ResultCache:
    """Predictions of a model on a split, keyed by (weights fingerprint, data fingerprint, split, filters, sources)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None

    def key(self, fingerprint: str, dm: PerceptionDataModule, sources: Sequence[str]) -> str:
        parts = {"fingerprint": fingerprint, "data": dm.source.fingerprint, "split": dm.split,
                 "split_spec": dm.split_spec.to_dict(), "filters": dm.filters, "exclude": dm.exclude_datasets,
                 "sources": list(sources)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def get(self, key: str) -> pd.DataFrame | None:
        if self.root is None or not (self.root / key / "predictions.parquet").exists():
            return None
        return pd.read_parquet(self.root / key / "predictions.parquet")

    def put(self, key: str, preds: pd.DataFrame) -> None:
        if self.root is not None:
            write_parquet(self.root / key / "predictions.parquet", preds)


# --- the sweep ----------------------------------------------------------------------------------------------------

def sweep_split(backbone: Backbone, base: dict, finetuned: dict, alphas: Sequence[float], dm: PerceptionDataModule,
                keys: Callable[[str], bool] | None, cache: ResultCache, device: str | torch.device = "cpu",
                base_fingerprint: str | None = None) -> tuple[dict[float, pd.DataFrame], dict]:
    """Predictions of every θ(α) on one split; the base (α = 0) comes from the cache when it is there.

    In a process group (a DDP fit, ``src/forgetting.py trainer=ddp``) every rank takes part: each encodes its
    shard of the images for every α, the embeddings are gathered and scored, rank 0 alone returns the predictions (the other
    ranks get ``{}``); ``info["decoded_images"]`` counts the decodes of all ranks (each image once)."""
    dm.setup("test")
    zero = distributed.rank() == 0
    key = cache.key(base_fingerprint, dm, ["captions"]) if base_fingerprint and zero else None
    cached = cache.get(key) if key else None
    from_cache = distributed.gather_objects(cached is not None)[0]  # rank 0's cache decides for every rank
    todo = [a for a in alphas if not (a == 0 and from_cache)]
    out: dict[float, pd.DataFrame] = {}
    info: dict[str, Any] = {"base_from_cache": bool(from_cache)}
    if todo:
        scorer = InterpolationScorer(backbone, base, finetuned, todo, keys=keys, progress=False,
                                     progress_label=f"forgetting study, {dm.split} split: {len(todo)} models")
        t = time.perf_counter()
        scorer.sweep(dm, device)
        info.update({"seconds": round(time.perf_counter() - t, 3), "timings": scorer.timings,
                     "images": len(dm.images()), "models": len(todo), "decoded_images": scorer.decoded,
                     "ranks": len(scorer.decoded_per_rank), "decoded_per_rank": scorer.decoded_per_rank, "skipped": {
                         k: v for k, v in scorer.skipped.items() if k != "problems"}})
        out.update(scorer.predictions_by_alpha)
        scorer.set_alpha(0.0)  # leave the backbone at the base weights
    if not zero:
        return {}, info
    if cached is not None and 0 in alphas:
        out[0.0] = cached
    elif key and 0.0 in out:
        cache.put(key, out[0.0])
    return {a: out[a] for a in sorted(out)}, info


# --- summaries ----------------------------------------------------------------------------------------------------

def _grain(qtype: pd.Series) -> np.ndarray:
    return np.where(qtype.astype(str) == "classification", "fine", "coarse")


def _aligned(base: pd.DataFrame, other: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    key = ["source", "row_idx", "key"]
    b = base.set_index(key)
    o = other.set_index(key).reindex(b.index)
    if o["correct"].isna().any():
        raise ValueError("models were scored on different items; cannot pair them")
    return b.reset_index(), o["correct"].to_numpy(dtype=bool)


def summarize_model(base: pd.DataFrame, preds: pd.DataFrame, targets: set[str], n_resamples: int = 9999,
                    seed: int = 0) -> dict:
    """Accuracy and paired Δ vs base of one model on target/supported/all, coarse/fine, per dataset."""
    b, correct = _aligned(base[base["source"] == "captions"], preds[preds["source"] == "captions"])
    grain = _grain(b["question_type"])
    is_target = b["dataset"].astype(str).isin(targets).to_numpy()
    groups = {"target": is_target, "supported": ~is_target, "all": np.ones(len(b), dtype=bool)}
    out: dict[str, Any] = {}
    for gname, gmask in groups.items():
        for g in ("coarse", "fine", "all"):
            m = gmask & (grain == g if g != "all" else True)
            if not m.any():
                continue
            acc = bootstrap_accuracy(correct[m], n_resamples, seed=seed).to_dict()
            delta = paired_bootstrap_delta(b["correct"].to_numpy(dtype=bool)[m], correct[m], n_resamples,
                                           seed=seed).to_dict()
            delta["significant"] = bool(delta["low"] > 0 or delta["high"] < 0)
            out[f"{gname}/{g}"] = {"acc": acc, "delta": delta}
    per_ds = {}
    for name in sorted(b["dataset"].astype(str).unique()):
        for g in ("coarse", "fine"):
            m = (b["dataset"].astype(str) == name).to_numpy() & (grain == g)
            if m.any():
                d = paired_bootstrap_delta(b["correct"].to_numpy(dtype=bool)[m], correct[m], n_resamples, seed=seed)
                per_ds[f"{name}/{g}"] = {"acc": float(correct[m].mean()), "base_acc": float(b["correct"][m].mean()),
                                         "delta": d.to_dict(), "n": int(m.sum()), "target": name in targets}
    out["datasets"] = per_ds
    out["headline"] = headline_table(closed_vqa_metrics(preds, n_resamples=n_resamples, seed=seed))
    return out


def base_initialization(backbone: Backbone) -> str:
    """How the base's weights came about, for the report: ``generalist`` (trained here on the benchmark's train
    split, :mod:`microbench.models.generalist`), ``random-init`` (an open_clip model without pretrained weights) or
    ``pretrained``."""
    src = backbone.source or {}
    if src.get("generalist"):
        return "generalist"
    if src.get("library") == "open_clip" and str(src.get("pretrained") or "").lower() in ("", "none", "null"):
        return "random-init"
    return "pretrained"


def chance_levels(preds: pd.DataFrame, targets: set[str]) -> dict[str, float]:
    """The accuracy of guessing, ``mean(1 / number of options)``, on the target and the supported caption items."""
    cap = preds[preds["source"] == "captions"]
    inv = 1.0 / cap["scores"].map(len).clip(lower=1).to_numpy(dtype=float)
    is_target = cap["dataset"].astype(str).isin(targets).to_numpy()
    return {name: float(inv[m].mean()) if m.any() else float("nan")
            for name, m in (("target", is_target), ("supported", ~is_target))}


def study_alphas(alphas, extrapolate: bool = False) -> list[float]:
    """The α values of a study, checked: a non-empty list of numbers in [0, 1] (0 and 1 are always added);
    values outside [0, 1] (extrapolation beyond the base or the fine-tuned weights) only with ``extrapolate=true``,
    and the report labels them."""
    from microbench.errors import UserError

    if isinstance(alphas, str | int | float) or alphas is None:
        raise UserError(f"alphas must be a list of numbers, e.g. 'alphas=[0,0.5,1]'; got {alphas!r}")
    values = []
    for a in alphas:
        try:
            values.append(float(a))
        except (TypeError, ValueError):
            raise UserError(f"alphas must be numbers (interpolation weights), got {a!r} in {list(alphas)}: e.g. "
                            "'alphas=[0,0.25,0.5,0.75,1]'") from None
    if not values:
        raise UserError("alphas=[] leaves nothing to interpolate: give the weights to try, e.g. "
                        "'alphas=[0,0.25,0.5,0.75,1]' (0 = base, 1 = fine-tuned)")
    if any(not np.isfinite(a) for a in values):
        raise UserError(f"alphas must be finite numbers, got {values}")
    outside = [a for a in values if not 0.0 <= a <= 1.0]
    if outside and not extrapolate:
        raise UserError(f"alphas {outside} lie outside [0, 1] (0 = base, 1 = fine-tuned): that is extrapolation; "
                        "ask for it explicitly with extrapolate=true (forgetting.extrapolate=true in src/train.py)")
    return values


def is_extrapolation(alpha: float) -> bool:
    return not 0.0 <= float(alpha) <= 1.0


def select_alpha(val: dict[float, dict], keep_target_gain: float = 0.8, metric: str = "supported/all",
                 target: str = "target/fine") -> dict:
    """Best ``metric`` (supported-task accuracy) among the α keeping ≥ ``keep_target_gain`` of the fine-tune's gain
    on the ``target`` tasks (fine-grained accuracy, or the localization score), all on the val split; ties go to the
    larger α."""
    alphas = sorted(val)
    full_gain = val[1.0 if 1.0 in val else alphas[-1]].get(target, {}).get("delta", {}).get("value", 0.0)
    eligible = []
    for a in alphas:
        gain = val[a].get(target, {}).get("delta", {}).get("value", 0.0)
        if full_gain <= 0 or gain >= keep_target_gain * full_gain - 1e-12:
            eligible.append(a)
    best = max(eligible, key=lambda a: (val[a].get(metric, {}).get("acc", {}).get("value", -1), a))
    return {"alpha": best, "rule": f"max {metric} accuracy on val s.t. {target} gain >= {keep_target_gain:g} x "
            f"the fine-tuned model's gain ({full_gain:+.4f})", "eligible": eligible}


@dataclass(frozen=True)
class StudySpec:
    """What a study sweeps and how it chooses: the α values, the interpolated towers (``both`` | ``image``), the
    share of the fine-tune's target gain the chosen α must keep, and the bootstrap resamples of the paired CIs."""

    alphas: Sequence[float] = DEFAULT_ALPHAS
    towers: str = "both"
    keep_target_gain: float = 0.8
    n_resamples: int = 9999


def run_study(backbone: Backbone, base_state: dict, ft_state: dict, *,
              make_dm: Callable[[str], PerceptionDataModule], out_dir: str | Path, target_datasets: Sequence[str],
              spec: StudySpec = StudySpec(), cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
              finetuned_path: str = "", extra: dict | None = None,
              localization: Callable | None = None) -> dict | None:
    """Evaluate base, fine-tuned and every θ(α) on val and test and choose α on val; returns the study (the
    per-α test predictions are written to ``out_dir/predictions/``; the report is
    :func:`microbench.studies.report.write_report`'s).

    In a process group every rank must call it: the sweep is sharded over the ranks (:func:`sweep_split`), rank 0
    summarises and returns the study, the other ranks return None.

    ``localization`` (for a model with a localization head): ``(split, base, finetuned, alphas, keys) -> {alpha
    name: metrics}`` scoring the head on every θ(α) in one pass over the split (e.g.
    :class:`~microbench.studies.sweep.LocalizationSweeper`); the α selection then keeps ≥ ``keep_target_gain``
    of the fine-tune's GRIT gain, and the report gets a localization table.
    """
    from microbench.studies.merging import tower_selector

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alphas = sorted(set(study_alphas(spec.alphas, extrapolate=True)) | {0.0, 1.0})  # numbers (callers check the range)
    prefixes = [n + "." for n, m in backbone.named_children() if m is backbone.image_tower()] or \
        [f"model.{n}." for n, m in getattr(backbone, "model", backbone).named_children() if m is backbone.image_tower()]
    towers, n_resamples = spec.towers, spec.n_resamples
    keys = tower_selector(towers, prefixes)
    backbone.load_state_dict(base_state)
    base_fp = backbone.fingerprint(refresh=True)
    cache = ResultCache(cache_dir)
    targets = set(target_datasets)
    study: dict[str, Any] = {
        "base": {"name": backbone.name, "fingerprint": base_fp, "initialization": base_initialization(backbone)},
        "finetuned": {"path": str(finetuned_path)},
        "towers": towers, "alphas": alphas, "target_datasets": sorted(targets), "splits": {}, **(extra or {}),
    }
    for split in ("val", "test"):
        dm = make_dm(split)
        preds, info = sweep_split(backbone, base_state, ft_state, alphas, dm, keys, cache, device, base_fp)
        if distributed.rank() != 0:
            continue
        base = preds[0.0]
        models = {"base": summarize_model(base, base, targets, n_resamples)}
        models["finetuned"] = summarize_model(base, preds[1.0], targets, n_resamples)
        for a in alphas:
            models[alpha_name(a)] = models["base"] if a == 0 else models["finetuned"] if a == 1 else \
                summarize_model(base, preds[a], targets, n_resamples)
        study["splits"][split] = {"models": models, "sweep": info, "images": len(dm.images()),
                                  "items": int((base["source"] == "captions").sum()),
                                  "chance": chance_levels(base, targets)}
        if localization is not None:
            with distributed.local_only():  # rank 0 alone: the head's own Trainer must not wait for the others
                swept = localization(split, base_state, ft_state, alphas, keys)
            study["splits"][split]["localization"] = loc = {
                name: {k: m.get(k) for k in LOCALIZATION_KEYS if k in m} for name, m in swept.items()}
            for a in alphas:
                grit, base_grit = loc[alpha_name(a)].get("grit/macro"), loc[alpha_name(0.0)].get("grit/macro")
                models[alpha_name(a)] = dict(models[alpha_name(a)], **{"target/localization": {
                    "acc": {"value": grit}, "delta": {"value": (grit or 0.0) - (base_grit or 0.0)}}})
        if split == "test":
            for a, p in preds.items():
                write_parquet(out_dir / "predictions" / f"{alpha_name(a)}.parquet", p)
    if distributed.rank() != 0:
        backbone.load_state_dict(ft_state)
        return None
    val_by_alpha = {a: study["splits"]["val"]["models"][alpha_name(a)] for a in alphas}
    study["selection"] = select_alpha(val_by_alpha, spec.keep_target_gain,
                                      target="target/localization" if localization is not None else "target/fine")
    study["chosen_test"] = study["splits"]["test"]["models"][alpha_name(study["selection"]["alpha"])]
    study["seconds"] = round(time.perf_counter() - t0, 2)
    backbone.load_state_dict(ft_state)  # leave the caller's model fine-tuned
    return study
