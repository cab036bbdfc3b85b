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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from microbench import distributed
from microbench.data.datamodule import PerceptionDataModule
from microbench.errors import UserError
from microbench.metrics.bootstrap import CLUSTERED, ClusterBootstrap, Estimate
from microbench.metrics.closed_vqa import closed_vqa_metrics, headline_table
from microbench.models.backbones.base import Backbone
from microbench.options import (
    NonNegativeFloat,
    OpenShare,
    PositiveInt,
    Share,
    check_value,
    checked,
    options_annotations,
    settable,
)
from microbench.results.io import cache_key, write_parquet
from microbench.studies.merging import MergeError, check_compatible
from microbench.studies.methods import METHODS, MergeInputs, method_paths, methods_problems
from microbench.studies.sweep import InterpolationScorer, WeightInterpolator, alpha_name
from microbench.studies.tradeoff import SELECTION_RULES, curve_areas, normalized, select_trade_off

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
    if record.get("adapter"):  # a LoRA fine-tune: the adapter merged into this base (its fingerprint checked)
        from microbench.models.adapters import merged_state

        adapter = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        state = merged_state(backbone, record["adapter"], adapter, source=f"{key}={path}")
    for prefix in ("backbone.", LOCALIZATION_PREFIX):  # fine-tune / linear-probe, or localization checkpoints
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            break
    check_compatible(backbone.state_dict(), state, names=["base", f"{'fine-tuned' if key == 'finetuned' else key} ({path.name})"])
    return state, record


class ResultCache:
    """Predictions of a model on a split, keyed by (weights fingerprint, data fingerprint, split, filters, sources,
    and the encoders' autocast dtype when it is not float32)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None

    def key(self, fingerprint: str, dm: PerceptionDataModule, sources: Sequence[str],
            dtype: torch.dtype = torch.float32) -> str:
        parts = {"fingerprint": fingerprint, "data": dm.source.fingerprint, "split": dm.split,
                 "split_spec": dm.split_spec.to_dict(), "filters": dm.filters, "exclude": dm.exclude_datasets,
                 "sources": list(sources)}
        if dtype != torch.float32:  # bf16 predictions are other predictions (fp32 keys as they always were)
            parts["dtype"] = str(dtype)
        return cache_key(parts)

    def get(self, key: str) -> pd.DataFrame | None:
        if self.root is None or not (self.root / key / "predictions.parquet").exists():
            return None
        return pd.read_parquet(self.root / key / "predictions.parquet")

    def put(self, key: str, preds: pd.DataFrame) -> None:
        if self.root is not None:
            write_parquet(self.root / key / "predictions.parquet", preds)


# --- the sweep ----------------------------------------------------------------------------------------------------

#: the point of the sweep that is the base model (α = 0 of WiSE-FT's line), and the fine-tune (α = 1)
BASE_POINT, FINETUNED_POINT = ("wise_ft", 0.0), ("wise_ft", 1.0)


def sweep_split(backbone: Backbone, base: dict, finetuned: dict, alphas: Sequence[float], dm: PerceptionDataModule,
                keys: Callable[[str], bool] | None, cache: ResultCache, device: str | torch.device = "cpu",
                base_fingerprint: str | None = None, paths: dict | None = None,
                points: Sequence[tuple[str, float]] | None = None, label: str = "forgetting study",
                ) -> tuple[dict[tuple[str, float], pd.DataFrame], dict]:
    """Predictions of every point ``(path, α)`` on one split (by default WiSE-FT's θ(α) for every α, path
    ``wise_ft``); the base (``("wise_ft", 0.0)``) comes from the cache when it is there.

    In a process group (a DDP fit, ``src/forgetting.py trainer=ddp``) every rank takes part: each encodes its
    shard of the images for every point, the embeddings are gathered and scored, rank 0 alone returns the
    predictions (the other ranks get ``{}``); ``info["decoded_images"]`` counts the decodes of all ranks (each image
    once, for every point of every method)."""
    if paths is None:
        paths, points = {"wise_ft": (base, finetuned)}, [("wise_ft", float(a)) for a in alphas]
    points = [(str(n), float(a)) for n, a in points]
    dm.setup("test")
    zero = distributed.rank() == 0
    key = cache.key(base_fingerprint, dm, ["captions"], backbone.inference.dtype(device)) \
        if base_fingerprint and zero else None
    cached = cache.get(key) if key else None
    from_cache = distributed.gather_objects(cached is not None)[0]  # rank 0's cache decides for every rank
    todo = [p for p in points if not (p == BASE_POINT and from_cache)]
    out: dict[tuple[str, float], pd.DataFrame] = {}
    info: dict[str, Any] = {"base_from_cache": bool(from_cache)}
    if todo:
        scorer = InterpolationScorer(backbone, base, finetuned, keys=keys, progress=False, paths=paths, points=todo,
                                     progress_label=f"{label}, {dm.split} split: {len(todo)} models")
        t = time.perf_counter()
        scorer.sweep(dm, device)
        info.update({"seconds": round(time.perf_counter() - t, 3), "timings": scorer.timings,
                     "images": len(dm.images()), "models": len(todo), "decoded_images": scorer.decoded,
                     "ranks": len(scorer.decoded_per_rank), "decoded_per_rank": scorer.decoded_per_rank,
                     "text_encodings": scorer.text_encodings, "skipped": {
                         k: v for k, v in scorer.skipped.items() if k != "problems"}})
        out.update(scorer.predictions_by_point)
        if "wise_ft" in scorer.paths:
            scorer.set_point(BASE_POINT)  # leave the backbone at the base weights
        else:
            backbone.load_state_dict(base)
    if not zero:
        return {}, info
    if cached is not None and BASE_POINT in points:
        out[BASE_POINT] = cached
    elif key and BASE_POINT in out:
        cache.put(key, out[BASE_POINT])
    return {p: out[p] for p in points if p in out}, info


# --- summaries ----------------------------------------------------------------------------------------------------

def caption_grain(qtype: pd.Series) -> np.ndarray:
    return np.where(qtype.astype(str) == "classification", "fine", "coarse")


def aligned_correct(base: pd.DataFrame, other: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """``base``'s items and ``other``'s correctness on them, in base's order (a float: 0/1, or a seed mean)."""
    key = ["source", "row_idx", "key"]
    b = base.set_index(key)
    o = other.set_index(key).reindex(b.index)
    if o["correct"].isna().any():
        raise ValueError("models were scored on different items; cannot pair them")
    return b.reset_index(), o["correct"].to_numpy(dtype=float)


def _with_interval(e: Estimate, significant: bool = False) -> dict:
    d = dict(e.to_dict(), interval=CLUSTERED)
    if significant:
        d["significant"] = bool(d["low"] > 0 or d["high"] < 0)
    return d


def summarize_model(base: pd.DataFrame, preds: pd.DataFrame, targets: set[str], n_resamples: int = 9999,
                    seed: int = 0, confidence: float = 0.95, headline: bool = True,
                    resampler: ClusterBootstrap | None = None) -> dict:
    """Accuracy and paired Δ vs base of one model on target/supported/all, coarse/fine, per dataset (its
    ``correct`` 0/1, or a mean over seeds), every interval image-clustered (``interval`` names it); ``headline``
    adds the official headline table (0/1 only; its official intervals).

    ``resampler``: the split's shared :class:`ClusterBootstrap` over the base's caption items, in their order, so
    that the intervals of every model summarised with it are paired (default: one built for this call)."""
    b, correct = aligned_correct(base[base["source"] == "captions"], preds[preds["source"] == "captions"])
    resampler = resampler or caption_resampler(base, n_resamples, confidence, seed)
    base_correct = b["correct"].to_numpy(dtype=float)
    grain = caption_grain(b["question_type"])
    is_target = b["dataset"].astype(str).isin(targets).to_numpy()
    groups = {"target": is_target, "supported": ~is_target, "all": np.ones(len(b), dtype=bool)}
    masks = {f"{gname}/{g}": gmask & (grain == g if g != "all" else True)
             for gname, gmask in groups.items() for g in ("coarse", "fine", "all")}
    ds = b["dataset"].astype(str).to_numpy()
    ds_masks = {f"{name}/{g}": (ds == name) & (grain == g) for name in sorted(set(ds)) for g in ("coarse", "fine")}
    acc = resampler.estimates(correct, masks)
    delta = resampler.estimates(correct - base_correct, {**masks, **ds_masks})
    out: dict[str, Any] = {key: {"acc": _with_interval(acc[key]), "delta": _with_interval(delta[key], significant=True)}
                           for key in masks if key in acc}
    out["datasets"] = {key: {"acc": float(correct[m].mean()), "base_acc": float(base_correct[m].mean()),
                             "delta": _with_interval(delta[key]), "n": int(m.sum()),
                             "target": key.rsplit("/", 1)[0] in targets}
                       for key, m in ds_masks.items() if key in delta}
    if headline and np.all((correct == 0) | (correct == 1)):  # the official Table-1 numbers, official intervals
        out["headline"] = headline_table(closed_vqa_metrics(preds, n_resamples=n_resamples, seed=seed,
                                                            clustered=False))
    return out


def caption_resampler(base: pd.DataFrame, n_resamples: int, confidence: float, seed: int) -> ClusterBootstrap:
    """The shared image resamples of a split: clusters = the image of each of the base's caption items."""
    return ClusterBootstrap(base.loc[base["source"] == "captions", "image_id"].astype(str).to_numpy(), n_resamples,
                            confidence, seed)


#: μ-Bench's metadata axes the report breaks the change down by (those the copy has)
AXES = ("domain", "subdomain", "modality", "submodality", "stain", "institution")


def axis_deltas(base: pd.DataFrame, models: dict[str, pd.DataFrame], rows: pd.DataFrame, targets: set[str],
                resampler: ClusterBootstrap) -> dict:
    """Δ vs base (paired, image-clustered CI from the split's ``resampler``) of each model on the *supported* caption items, by
    every metadata axis of μ-Bench present in ``rows`` (one row per data row: ``row_idx`` and the axis columns):
    ``{axis: {value: {n, base_acc, <model>: {acc, delta}}}}``."""
    cap = base[base["source"] == "captions"]
    supported = ~cap["dataset"].astype(str).isin(targets).to_numpy()
    out: dict[str, dict] = {}
    meta = rows.set_index("row_idx")
    aligned = {name: aligned_correct(cap, p)[1] for name, p in models.items()}
    b = cap["correct"].to_numpy(dtype=float)
    for axis in AXES:
        if axis not in meta.columns:
            continue
        values = meta[axis].reindex(cap["row_idx"].to_numpy()).astype("string").fillna("(none)").to_numpy()
        masks = {v: supported & (values == v) for v in sorted(set(values[supported]))}
        deltas = {name: resampler.estimates(c - b, masks) for name, c in aligned.items()}
        table = {}
        for v, m in masks.items():
            entry = {"n": int(m.sum()), "base_acc": float(b[m].mean())}
            for name, c in aligned.items():
                entry[name] = {"acc": float(c[m].mean()), "delta": _with_interval(deltas[name][v], significant=True)}
            table[v] = entry
        out[axis] = table
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


def chance_levels(preds: pd.DataFrame, targets: set[str]) -> dict[str, float | None]:
    """The accuracy of guessing, ``mean(1 / number of options)``, on the target and the supported caption items;
    None (undefined, never NaN) for a group without items, named in ``undefined``."""
    cap = preds[preds["source"] == "captions"]
    inv = 1.0 / cap["scores"].map(len).clip(lower=1).to_numpy(dtype=float)
    is_target = cap["dataset"].astype(str).isin(targets).to_numpy()
    out: dict = {name: float(inv[m].mean()) if m.any() else None
                 for name, m in (("target", is_target), ("supported", ~is_target))}
    empty = [k for k, v in out.items() if v is None]
    if empty:
        out["undefined"] = {k: f"no {k} caption items on this split" for k in empty}
    return out


def study_alphas(alphas, extrapolate: bool = False) -> list[float]:
    """The α values of a study, checked: a non-empty list of numbers in [0, 1] (0 and 1 are always added);
    values outside [0, 1] (extrapolation beyond the base or the fine-tuned weights) only with ``extrapolate=true``,
    and the report labels them."""
    if isinstance(alphas, str | int | float) or alphas is None:
        raise UserError(f"study.alphas must be a list of numbers, e.g. 'study.alphas=[0,0.5,1]'; got {alphas!r}")
    values = []
    for a in alphas:
        try:
            values.append(float(a))
        except (TypeError, ValueError):
            raise UserError(f"study.alphas must be numbers (interpolation weights), got {a!r} in {list(alphas)}: e.g. "
                            "'study.alphas=[0,0.25,0.5,0.75,1]'") from None
    if not values:
        raise UserError("study.alphas=[] leaves nothing to interpolate: give the weights to try, e.g. "
                        "'study.alphas=[0,0.25,0.5,0.75,1]' (0 = base, 1 = fine-tuned)")
    if any(not np.isfinite(a) for a in values):
        raise UserError(f"study.alphas must be finite numbers, got {values}")
    outside = [a for a in values if not 0.0 <= a <= 1.0]
    if outside and not extrapolate:
        raise UserError(f"study.alphas {outside} lie outside [0, 1] (0 = base, 1 = fine-tuned): that is extrapolation; "
                        "ask for it explicitly with study.extrapolate=true")
    return values


def is_extrapolation(alpha: float) -> bool:
    return not 0.0 <= float(alpha) <= 1.0


def select_alpha(val: dict[float, dict], keep_target_gain: float = 0.8, metric: str = "supported/all",
                 target: str = "target/fine", finetuned: dict | None = None) -> dict:
    """Best ``metric`` (supported-task accuracy) among the α keeping ≥ ``keep_target_gain`` of the fine-tune's gain
    on the ``target`` tasks (fine-grained accuracy, or the localization score), all on the val split; ties go to the
    larger α. The fine-tune is ``finetuned`` (default: the α = 1 point, WiSE-FT's)."""
    alphas = sorted(val)
    ft = finetuned if finetuned is not None else val[1.0 if 1.0 in val else alphas[-1]]
    full_gain = ft.get(target, {}).get("delta", {}).get("value", 0.0)
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
    """The forgetting study's settings (``configs/study/``, read by :func:`microbench.tasks.study.study_spec`):

    - ``alphas``: the points of every method's path (0 and 1 always added), ``extrapolate``: allow α outside [0, 1];
    - ``towers``: ``both`` | ``image`` (the adapter's image-tower keys only);
    - ``methods``: merge methods compared (:mod:`microbench.studies.methods`), the first one the study's answer;
      ``options``: ``{method: {option: value}}`` over each method's defaults;
    - ``selection``: ``keep_gain`` (best supported accuracy keeping ≥ ``keep_target_gain`` of the target gain) or
      ``trade_off`` (max ``trade_off_weight``·normalized target + normalized control), each on val;
    - ``n_resamples``, ``confidence``, ``seed``: the bootstrap of every CI (paired deltas, areas, axes);
    - ``feature_probe``: also re-fit the linear probe of every dataset on the base's, the fine-tune's and the chosen
      model's frozen image features (:mod:`microbench.studies.feature_probe`): damaged features vs lost alignment.
    """

    alphas: Sequence[float] = DEFAULT_ALPHAS
    towers: Literal["both", "image"] = "both"
    keep_target_gain: Share = 0.8
    n_resamples: PositiveInt = 9999
    methods: Sequence[str] = ("wise_ft",)
    options: Mapping[str, Mapping] = field(default_factory=dict)
    selection: Literal[SELECTION_RULES] = "keep_gain"
    trade_off_weight: NonNegativeFloat = 2.0
    extrapolate: bool = False
    confidence: OpenShare = 0.95
    seed: int = 0
    result_cache: str | None = None  # base-model predictions reused across studies (None: no cache)
    feature_probe: bool = False  # re-fit linear probes on base / fine-tuned / chosen features (features vs alignment)

    def __post_init__(self) -> None:
        problems = spec_problems({f: getattr(self, f) for f in STUDY_CONFIG_KEYS})[1]
        if problems:
            raise UserError("; ".join(problems))

    def method_options(self, name: str) -> dict:
        return {**METHODS[name].defaults, **dict(self.options.get(name) or {})}


#: where a config sets each field of :class:`StudySpec`: the ``study`` group and the root ``bootstrap``
STUDY_CONFIG_KEYS = {"alphas": "study.alphas", "towers": "study.towers", "methods": "study.methods",
                     "options": "study.options", "extrapolate": "study.extrapolate",
                     "result_cache": "study.result_cache", "feature_probe": "study.feature_probe",
                     "selection": "study.selection.rule", "keep_target_gain": "study.selection.keep_target_gain",
                     "trade_off_weight": "study.selection.trade_off_weight", "n_resamples": "bootstrap.n_resamples",
                     "confidence": "bootstrap.confidence", "seed": "bootstrap.seed"}


def spec_problems(values: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """``values`` (fields of :class:`StudySpec`) converted as their annotations read them (ranges, choices,
    pydantic's lax reading: ``"0.5"`` is 0.5), and every problem, one clause each naming the config key
    (:data:`STUDY_CONFIG_KEYS`); then the α values (:func:`study_alphas`) and the methods with their options
    (:func:`~microbench.studies.methods.methods_problems`)."""
    hints = options_annotations(StudySpec)
    out, problems = dict(values), []
    for name, value in values.items():
        if name != "alphas" and settable(hints[name]):  # the α values: study_alphas, whose lines say more
            out[name], problem = check_value(STUDY_CONFIG_KEYS[name], hints[name], value)
            problems += [problem] if problem else []
    try:
        study_alphas(out.get("alphas", DEFAULT_ALPHAS), out.get("extrapolate") is True)
    except UserError as err:
        problems.append(str(err))
    return out, problems + methods_problems(out.get("methods", ("wise_ft",)), out.get("options") or {})[1]


@checked("study", MergeError)
def tower_keys(backbone: Backbone, towers: Literal["both", "image"]) -> Callable[[str], bool] | None:
    """The tensors a study moves: None (every one) for ``both``; for ``image`` the adapter's image-tower keys
    (:meth:`Backbone.image_tower_keys`), refusing an empty selection in one line."""
    if towers == "both":
        return None
    keys = set(backbone.image_tower_keys())
    n = len(backbone.state_dict())
    if not keys:
        raise MergeError(f"study.towers=image selects none of the {n} weights of {backbone.kind} backbone "
                         f"{backbone.name!r}: its adapter's image_tower_keys() is empty; use study.towers=both")
    return keys.__contains__


def check_study_model(spec: StudySpec, backbone: Backbone, localization: bool = False
                      ) -> Callable[[str], bool] | None:
    """What a study needs of the model, checked before any work (in a fit: before fitting): the tower selection
    (:func:`tower_keys`, returned), residual blocks for LiNeS, WiSE-FT only for a localization head; one line each."""
    if localization and list(spec.methods) != ["wise_ft"]:
        raise UserError(f"study.methods={list(spec.methods)}: a localization head's study sweeps WiSE-FT only; use "
                        "study=wise_ft")
    keys = tower_keys(backbone, spec.towers)
    if "lines" in spec.methods and not any(keys is None or keys(k) for k in backbone.residual_block_depths()):
        raise UserError(f"lines: no residual blocks found in the {'image tower' if keys else 'weights'} of "
                        f"{backbone.name!r} (keys like '...resblocks.<i>.', '...layers.<i>.', '...blocks.<i>.'): LiNeS "
                        "needs a layered model; drop it from study.methods")
    return keys


def _sweep_plan(backbone, base_state, ft_state, spec: StudySpec, keys, alphas) -> tuple[dict, dict, list]:
    """The paths of every method, their points and which study name each point answers for."""
    depths = backbone.residual_block_depths() if "lines" in spec.methods else {}
    if keys is not None:
        depths = {k: v for k, v in depths.items() if keys(k)}
    more = []
    if "model_stock" in spec.methods:
        for path in spec.method_options("model_stock").get("finetuned") or []:
            state = load_finetuned_state(path, backbone, key="study.options.model_stock.finetuned")[0]
            if all(torch.equal(state[k], ft_state[k]) for k in ft_state):
                raise UserError(f"study.options.model_stock.finetuned: {path} holds the same weights as the "
                                "fine-tune studied; Model Stock needs a *different* fine-tune of the same base "
                                "(another seed)")
            more.append(state)
    inputs = MergeInputs(base_state, ft_state, keys, depths, more)
    paths = {"wise_ft": (base_state, ft_state)}  # base and fine-tune: α = 0 and 1 of WiSE-FT's line
    plan: dict[str, dict] = {}
    points = [BASE_POINT, FINETUNED_POINT]
    for name in spec.methods:
        entries = []
        for path in method_paths(name, inputs, spec.options.get(name)):
            if path.label != "wise_ft":
                paths[path.label] = (path.start, path.end)
            mapping = {}
            for a in alphas:
                if a == 0 and path.starts_at_base:
                    mapping[a] = BASE_POINT
                elif a == 1 and path.ends_at_finetuned:
                    mapping[a] = FINETUNED_POINT
                else:
                    mapping[a] = (path.label, float(a))
                    if mapping[a] not in points:
                        points.append(mapping[a])
            entries.append({"label": path.label, "seed": path.seed, "points": mapping})
        plan[name] = {"paths": entries}
    return paths, plan, points


def _memo_summary(memo: dict, base, preds, targets, n_resamples, seed, conf, resampler, point,
                  headline=False) -> dict:
    """The summary of one point of the sweep, computed once (points shared by methods: the base, the fine-tune)."""
    if point not in memo:
        memo[point] = summarize_model(base, preds[point], targets, n_resamples, seed, conf, headline, resampler)
    return memo[point]


def _mean_over_seeds(preds: list[pd.DataFrame]) -> pd.DataFrame:
    """One prediction frame whose ``correct`` is the per-item mean over the frames (seeds of one method)."""
    if len(preds) == 1:
        return preds[0]
    key = ["source", "row_idx", "key"]
    first = preds[0].copy()
    idx = first.set_index(key).index
    first["correct"] = np.mean([p.set_index(key)["correct"].reindex(idx).to_numpy(dtype=float) for p in preds], axis=0)
    return first


def _spread(summaries: list[dict], keys=("target/fine", "supported/all")) -> dict:
    out = {}
    for k in keys:
        vals = [s[k]["acc"]["value"] for s in summaries if k in s]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                      "min": float(np.min(vals)), "max": float(np.max(vals)), "n_seeds": len(vals)}
    return out


def run_study(backbone: Backbone, base_state: dict, ft_state: dict, *,
              make_dm: Callable[[str], PerceptionDataModule], out_dir: str | Path, target_datasets: Sequence[str],
              spec: StudySpec = StudySpec(), cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
              finetuned_path: str = "", extra: dict | None = None,
              localization: Callable | None = None) -> dict | None:
    """Evaluate base, fine-tuned and every point of every merge method on val and test, choose each method's α on
    val; returns the study (the test predictions of every point are written to ``out_dir/predictions/``; the report
    is :func:`microbench.studies.report.write_report`'s).

    One sweep per split scores every point of every method (:func:`sweep_split`: each image decoded once). The
    study's ``splits.<split>.models`` hold the base, the fine-tune and the first method's points (``alpha=…``);
    ``methods.<name>`` hold each method's points, normalized accuracies, selection, chosen test model and curve area
    (:mod:`microbench.studies.tradeoff`); ``axes`` the change by μ-Bench's metadata axes.

    In a process group every rank must call it: the sweep is sharded over the ranks (:func:`sweep_split`), rank 0
    summarises and returns the study, the other ranks return None.

    ``localization`` (for a model with a localization head): ``(split, base, finetuned, alphas, keys) -> {alpha
    name: metrics}`` scoring the head on every θ(α) of WiSE-FT in one pass over the split (e.g.
    :class:`~microbench.studies.sweep.LocalizationSweeper`); the α selection then keeps ≥ ``keep_target_gain``
    of the fine-tune's GRIT gain, and the report gets a localization table.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alphas = sorted(set(study_alphas(spec.alphas, extrapolate=True)) | {0.0, 1.0})  # numbers (callers check the range)
    keys = check_study_model(spec, backbone, localization is not None)
    towers, n_resamples, conf, seed = spec.towers, int(spec.n_resamples), float(spec.confidence), int(spec.seed)
    backbone.load_state_dict(base_state)
    base_fp = backbone.fingerprint(refresh=True)
    paths, plan, points = _sweep_plan(backbone, base_state, ft_state, spec, keys, alphas)
    cache = ResultCache(cache_dir)
    targets = set(target_datasets)
    primary = spec.methods[0]
    target_key = "target/localization" if localization is not None else "target/fine"
    study: dict[str, Any] = {
        "base": {"name": backbone.name, "fingerprint": base_fp, "initialization": base_initialization(backbone)},
        "finetuned": {"path": str(finetuned_path)},
        "towers": towers, "alphas": alphas, "target_datasets": sorted(targets), "splits": {},
        "methods": {name: {"summary": METHODS[name].summary, "options": spec.method_options(name),
                           "paths": [e["label"] for e in plan[name]["paths"]], "splits": {},
                           "starts_at_base": plan[name]["paths"][0]["points"][0.0] == BASE_POINT,
                           "ends_at_finetuned": plan[name]["paths"][0]["points"][1.0] == FINETUNED_POINT}
                    for name in spec.methods},
        "primary_method": primary,
        "settings": {"selection": spec.selection, "keep_target_gain": spec.keep_target_gain,
                     "trade_off_weight": spec.trade_off_weight, "n_resamples": n_resamples, "confidence": conf,
                     "seed": seed, "tower_keys": len(backbone.state_dict()) if keys is None else
                     sum(1 for k in backbone.state_dict() if keys(k))},
        **(extra or {}),
    }
    test_preds: dict = {}
    test_rows, test_resampler = None, None
    for split in ("val", "test"):
        dm = make_dm(split)
        preds, info = sweep_split(backbone, base_state, ft_state, alphas, dm, keys, cache, device, base_fp,
                                  paths=paths, points=points)
        if distributed.rank() != 0:
            continue
        base = preds[BASE_POINT]
        resampler = caption_resampler(base, n_resamples, conf, seed)  # every interval of the split: these images
        summarize = partial(_memo_summary, {}, base, preds, targets, n_resamples, seed, conf, resampler)

        models = {"base": summarize(BASE_POINT, True), "finetuned": summarize(FINETUNED_POINT, True)}
        for name in spec.methods:
            by_alpha, seeds = {}, {}
            for a in alphas:
                entries = plan[name]["paths"]
                if len(entries) == 1:
                    s = summarize(entries[0]["points"][a], headline=name == primary)
                else:  # several seeds: the summary of the per-item mean, and the spread of the seeds
                    per_seed = [summarize(e["points"][a]) for e in entries]
                    mean = _mean_over_seeds([preds[e["points"][a]] for e in entries])
                    s = summarize_model(base, mean, targets, n_resamples, seed, conf, headline=False,
                                        resampler=resampler)
                    s["seeds"] = {"spread": _spread(per_seed),
                                  "per_seed": {e["label"]: {k: ps[k]["acc"]["value"] for k in
                                                            ("target/fine", "supported/all") if k in ps}
                                               for e, ps in zip(entries, per_seed, strict=True)}}
                    seeds[a] = mean
                s = dict(s, normalized=normalized(s, models["finetuned"], models["base"], target_key))
                by_alpha[alpha_name(a)] = s
                if name == primary:
                    models[alpha_name(a)] = s
            study["methods"][name]["splits"][split] = by_alpha
            plan[name].setdefault("mean_preds", {})[split] = seeds
        for key in ("base", "finetuned"):
            models[key] = dict(models[key], normalized=normalized(models[key], models["finetuned"], models["base"],
                                                                  target_key))
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
                models[alpha_name(a)]["normalized"] = normalized(models[alpha_name(a)], models[alpha_name(1.0)],
                                                                 models["base"], target_key)
                study["methods"][primary]["splits"][split][alpha_name(a)] = models[alpha_name(a)]
            models["finetuned"] = models[alpha_name(1.0)]
            models["base"] = models[alpha_name(0.0)]
        if split == "test":
            test_preds, test_resampler = preds, resampler
            test_rows = dm.rows  # the metadata axes of every row, for the change by axis
            written = set()
            for name in spec.methods:
                for e in plan[name]["paths"]:
                    for a, point in e["points"].items():
                        label = e["label"].replace("[seed=", "-seed").replace("]", "")  # plain file names
                        file = alpha_name(a) if name == "wise_ft" else f"{label}_{alpha_name(a)}"
                        if point in (BASE_POINT, FINETUNED_POINT):
                            file = alpha_name(0.0 if point == BASE_POINT else 1.0)
                        if file not in written:
                            write_parquet(out_dir / "predictions" / f"{file}.parquet", preds[point])
                            written.add(file)
            for file, point in ((alpha_name(0.0), BASE_POINT), (alpha_name(1.0), FINETUNED_POINT)):
                if file not in written:
                    write_parquet(out_dir / "predictions" / f"{file}.parquet", preds[point])
    if distributed.rank() != 0:
        backbone.load_state_dict(ft_state)
        return None
    # each method's α on val, reported on test
    for name in spec.methods:
        m = study["methods"][name]
        val = {a: m["splits"]["val"][alpha_name(a)] for a in alphas}
        ft_val = study["splits"]["val"]["models"]["finetuned"]
        if spec.selection == "trade_off":
            m["selection"] = select_trade_off(val, float(spec.trade_off_weight))
        else:
            m["selection"] = select_alpha(val, spec.keep_target_gain, target=target_key, finetuned=ft_val)
        m["chosen_test"] = m["splits"]["test"][alpha_name(m["selection"]["alpha"])]
        if localization is None:  # what the chosen point won back from the fine-tune, paired on the same items
            m["vs_finetuned"] = _vs_finetuned(test_preds, plan[name], m["selection"]["alpha"], targets,
                                              test_resampler)
    study["selection"] = study["methods"][primary]["selection"]
    study["chosen_test"] = study["methods"][primary]["chosen_test"]
    if localization is None:
        study["areas"] = _areas(study, plan, test_preds, targets, spec, alphas)
        chosen = {}
        for name in spec.methods:
            a = study["methods"][name]["selection"]["alpha"]
            chosen[f"{name} α={a:.2f}"] = _chosen_frame(test_preds, plan[name], a)
        study["axes"] = axis_deltas(test_preds[BASE_POINT], {"finetuned": test_preds[FINETUNED_POINT], **chosen},
                                    test_rows, targets, test_resampler)
    if spec.feature_probe:
        study["feature_probe"] = _feature_probe(backbone, base_state, ft_state, paths, plan[primary], study, keys,
                                                make_dm, targets, spec, device)
    study["seconds"] = round(time.perf_counter() - t0, 2)
    backbone.load_state_dict(ft_state)  # leave the caller's model fine-tuned
    return study


def _feature_probe(backbone, base_state, ft_state, paths, plan_entry, study, keys, make_dm, targets, spec, device
                   ) -> dict:
    """The linear probes of :func:`~microbench.studies.feature_probe.feature_forgetting` on the base, the fine-tune
    and the primary method's chosen model (its first seed's path when it has several), rank 0 alone; each model's
    zero-shot Δ on the supported datasets beside its probe Δ, with the verdict."""
    from microbench.studies.feature_probe import feature_forgetting, verdict

    alpha = study["selection"]["alpha"]
    point = plan_entry["paths"][0]["points"][alpha]

    def load(state):
        return lambda: backbone.load_state_dict(state)

    models = {"base": load(base_state), "finetuned": load(ft_state)}
    chosen_name = None
    if point not in (BASE_POINT, FINETUNED_POINT):  # its weights made once: the base outside the study's keys
        backbone.load_state_dict(base_state)
        start, end = paths[point[0]]
        WeightInterpolator(backbone, start, end, keys).set_alpha(point[1])
        chosen_name = f"chosen α={alpha:.2f}"
        models[chosen_name] = load({k: v.detach().clone() for k, v in backbone.state_dict().items()})
    with distributed.local_only():
        out = feature_forgetting(backbone, models, make_dm("all"), targets, n_resamples=int(spec.n_resamples),
                                 confidence=float(spec.confidence), seed=int(spec.seed), device=device)
    out["chosen"] = chosen_name or ("base" if point == BASE_POINT else "finetuned")
    zero_shot = {"finetuned": study["splits"]["test"]["models"]["finetuned"], chosen_name: study["chosen_test"]}
    sup = out["pooled"].get("supported") or {}
    out["verdicts"] = {}
    for name in out["models"][1:]:
        zs_delta = (zero_shot[name].get("supported/all") or {}).get("delta")
        out["verdicts"][name] = {"zero_shot_delta": zs_delta, "probe_delta": (sup.get(name) or {}).get("delta"),
                                 "verdict": verdict((sup.get(name) or {}).get("delta"), zs_delta)}
    return out


def _chosen_frame(preds: dict, plan_entry: dict, alpha: float) -> pd.DataFrame:
    entries = plan_entry["paths"]
    return plan_entry["mean_preds"]["test"][alpha] if len(entries) > 1 else preds[entries[0]["points"][alpha]]


def _vs_finetuned(preds: dict, plan_entry: dict, alpha: float, targets: set[str],
                  resampler: ClusterBootstrap) -> dict:
    """Δ of a method's chosen test model vs the fine-tune (paired, image-clustered CIs) on the target's fine
    questions and on the supported datasets: the gain given up and the loss won back."""
    base = preds[BASE_POINT]
    cap = base[base["source"] == "captions"]
    ft_correct = aligned_correct(cap, preds[FINETUNED_POINT])[1]
    chosen = aligned_correct(cap, _chosen_frame(preds, plan_entry, alpha))[1]
    is_target = cap["dataset"].astype(str).isin(targets).to_numpy()
    fine = caption_grain(cap["question_type"]) == "fine"
    masks = {"target/fine": is_target & fine, "supported/all": ~is_target}
    return {k: _with_interval(e, significant=True) for k, e in resampler.estimates(chosen - ft_correct, masks).items()}


def _areas(study: dict, plan: dict, preds: dict, targets: set[str], spec: StudySpec, alphas) -> dict:
    """Each method's curve area on test with its paired bootstrap CI, and the paired test of every pair."""
    base = preds[BASE_POINT]
    cap = base[base["source"] == "captions"]
    is_target = cap["dataset"].astype(str).isin(targets).to_numpy()
    fine = caption_grain(cap["question_type"]) == "fine"
    t_mask, s_mask = is_target & fine, ~is_target
    if not t_mask.any() or not s_mask.any():
        return {"areas": {}, "pairs": {}, "undefined": "no target fine-grained or no supported items on test"}
    rows = [aligned_correct(cap, base)[1], aligned_correct(cap, preds[FINETUNED_POINT])[1]]
    curves = {}
    for name in spec.methods:
        entries = plan[name]["paths"]
        idx = []
        for a in alphas:
            if len(entries) == 1:
                point = entries[0]["points"][a]
                if point == BASE_POINT:
                    idx.append(0)
                    continue
                if point == FINETUNED_POINT:
                    idx.append(1)
                    continue
                frame = preds[point]
            else:
                frame = plan[name]["mean_preds"]["test"][a]
            rows.append(aligned_correct(cap, frame)[1])
            idx.append(len(rows) - 1)
        curves[name] = idx
    matrix = np.stack(rows)
    images = cap["image_id"].astype(str).to_numpy()  # resample images with all their questions
    return curve_areas(matrix[:, t_mask], matrix[:, s_mask], curves, int(spec.n_resamples), float(spec.confidence),
                       int(spec.seed), target_clusters=images[t_mask], supported_clusters=images[s_mask])
