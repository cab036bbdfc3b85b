"""``python -m microbench rescore RUN_DIR...``: every metric of a run again, from the files the run wrote (its
predictions; no model, no images), checked against the run's own record; with ``--clustered`` (image-clustered
intervals for a record written without them) or ``--slice NAME=DATASET,...`` (a slice of your own) the new numbers
go to ``rescored.json`` and ``rescored.md`` beside the run's files, which stay as they are.

Each kind of run has one rescorer (:data:`RESCORERS`, by the record's ``task``; a forgetting study by its
``forgetting.json``):

- perception (zero-shot, generative): ``predictions.parquet`` → :func:`~microbench.metrics.closed_vqa.closed_vqa_metrics`
  with the record's bootstrap settings;
- cognition: ``predictions.parquet`` (with its breakdown columns) → :func:`~microbench.metrics.cognition.cognition_metrics`;
- localization: ``detections.json`` + ``ground_truth_coco.json`` → COCO (pycocotools), ``predictions.parquet`` →
  GRIT, and their image-clustered intervals;
- forgetting study: ``predictions/alpha=*.parquet`` (test) → every model's summary on test
  (:func:`~microbench.studies.forgetting.summarize_model`, the split's shared image resamples).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from microbench.errors import UserError
from microbench.results.io import plain, read_json, write_json, write_text
from microbench.results.report import percent

#: values closer than this count as equal (a record read on a machine with other float kernels)
TOLERANCE = 1e-12


@dataclass
class Rescored:
    """The outcome of rescoring one run: what was compared, what differed (name: (recorded, recomputed)), and the
    new numbers written beside the run (``extra``)."""

    path: Path
    kind: str
    compared: int = 0
    mismatches: dict[str, tuple] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.added = sorted(k for k in self.mismatches if k.startswith("+"))
        for k in self.added:
            del self.mismatches[k]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def line(self) -> str:
        newer = f" ({len(self.added)} fields of a later microbench not in the record)" if self.added else ""
        if self.ok:
            return (f"{self.path}: {self.kind}, {self.compared} values recomputed from its files, all equal to its "
                    f"record{newer}")
        first = ", ".join(f"{k} (recorded {a!r}, recomputed {b!r})" for k, (a, b) in list(self.mismatches.items())[:3])
        return (f"{self.path}: {self.kind}, {len(self.mismatches)} of {self.compared} values differ from its record: "
                f"{first}")

    def lines(self) -> list[str]:
        return [self.line(), *(f"  note: {n}" for n in self.notes)]


def compare(recorded, recomputed, name: str = "", out: dict | None = None) -> tuple[int, dict]:
    """Leaf-by-leaf comparison of two JSON-like values: (leaves compared, {path: (recorded, recomputed)}). A field
    the record lacks but the recomputation has (added by a later microbench, e.g. ``clustered/se``) is not a
    difference; it is listed under the path ``+<path>`` with the recorded side ``"<absent>"``."""
    out = {} if out is None else out
    if isinstance(recorded, dict) and isinstance(recomputed, dict):
        n = 0
        for k in sorted(set(recorded) | set(recomputed), key=str):
            sub = f"{name}/{k}" if name else str(k)
            if k not in recomputed:
                out[sub] = (recorded[k], "<absent>")
                n += 1
            elif k not in recorded:
                out[f"+{sub}"] = ("<absent>", recomputed[k])
            else:
                n += compare(recorded[k], recomputed[k], sub, out)[0]
        return n, out
    if isinstance(recorded, list) and isinstance(recomputed, list) and len(recorded) == len(recomputed):
        n = 0
        for i, (a, b) in enumerate(zip(recorded, recomputed, strict=True)):
            n += compare(a, b, f"{name}[{i}]", out)[0]
        return n, out
    if not _same(recorded, recomputed):
        out[name] = (recorded, recomputed)
    return 1, out


def _same(a, b) -> bool:
    nan_a = a is None or (isinstance(a, float) and math.isnan(a))
    nan_b = b is None or (isinstance(b, float) and math.isnan(b))
    if nan_a or nan_b:
        return nan_a and nan_b
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float) or not isinstance(b, int | float):
        return a == b
    return math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE)


def _read_predictions(run: Path, need: set[str], what: str) -> pd.DataFrame:
    path = run / "predictions.parquet"
    if not path.is_file():
        raise UserError(f"{path} does not exist: rescoring reads the predictions the run wrote (run it again)")
    preds = pd.read_parquet(path)
    missing = need - set(preds.columns)
    if missing:
        raise UserError(f"{path} lacks {sorted(missing)}: the {what} was written by an older microbench; run it "
                        "again to rescore it")
    return preds


def parse_slices(specs: list[str] | None) -> dict[str, set[str]]:
    """``NAME=DATASET,DATASET`` → {name: datasets}."""
    out: dict[str, set[str]] = {}
    for spec in specs or []:
        name, sep, members = spec.partition("=")
        if not sep or not name or not members.strip(","):
            raise UserError(f"--slice {spec!r}: write NAME=DATASET[,DATASET...], e.g. --slice "
                            "blood=acevedo_et_al_2020,jung_et_al_2022")
        out[name] = {m.strip() for m in members.split(",") if m.strip()}
    return out


# --- perception -----------------------------------------------------------------------------------------------

def _perception(run: Path, rec: dict, clustered: bool, slices: dict[str, set[str]]) -> Rescored:
    from microbench.metrics.bootstrap import attach_clustered, bootstrap_accuracy
    from microbench.metrics.closed_vqa import closed_vqa_metrics, headline_mask

    preds = _read_predictions(run, {"source", "dataset", "question_type", "key", "variant", "correct"},
                              "perception run")
    boot = rec["bootstrap"]
    had = any("clustered" in e for e in rec["metrics"].values())
    args = (int(boot["n_resamples"]), float(boot["confidence"]), int(boot["seed"]))
    new = plain(closed_vqa_metrics(preds, *args, clustered=had))
    n, diff = compare(rec["metrics"], new)
    out = Rescored(run, rec["task"], n, diff)
    extra: dict = {}
    if clustered and not had:
        extra.update(plain(closed_vqa_metrics(preds, *args, clustered=True)))
    for name, members in slices.items():
        unknown = members - set(preds["dataset"].astype(str))
        if unknown:
            raise UserError(f"--slice {name}: {sorted(unknown)} not in this run's predictions (datasets: "
                            f"{', '.join(sorted(set(preds['dataset'].astype(str)))[:8])} ...)")
        for source, p in preds.groupby("source", observed=True):
            correct = p["correct"].to_numpy()
            inside = p["dataset"].astype(str).isin(members).to_numpy()
            fine = (p["question_type"].astype(str) == "classification").to_numpy()
            head = np.asarray(headline_mask(p))
            masks = {f"{source}/slice/{name}/coarse": inside & ~fine & head,
                     f"{source}/slice/{name}/fine": inside & fine & head,
                     f"{source}/all_variants/slice/{name}/coarse": inside & ~fine,
                     f"{source}/all_variants/slice/{name}/fine": inside & fine}
            masks = {k: m for k, m in masks.items() if m.any()}
            mine = {k: bootstrap_accuracy(correct[m], *args).to_dict() for k, m in masks.items()}
            if "image_id" in p:
                attach_clustered(mine, correct, masks, p["image_id"].astype(str).to_numpy(), *args)
            extra.update(plain(mine))
    out.extra = extra
    return out


# --- cognition ------------------------------------------------------------------------------------------------

def _cognition(run: Path, rec: dict, clustered: bool, slices: dict[str, set[str]]) -> Rescored:
    from microbench.metrics.cognition import BREAKDOWNS, cognition_metrics

    need = {"row_idx", "correct", "image_id", *BREAKDOWNS}
    preds = _read_predictions(run, need, "cognition run")
    if slices:
        raise UserError("--slice defines perception slices; a cognition run has its breakdowns already")
    new = plain(cognition_metrics(preds, preds[["row_idx"]], rec["bootstrap"]))
    if not any("clustered" in e for e in rec["metrics"].values()):  # a record written before clustered intervals
        extra = new if clustered else {}
        new = {k: {kk: vv for kk, vv in v.items() if kk not in ("clustered", "se")} for k, v in new.items()}
    else:
        extra = {}
    n, diff = compare(rec["metrics"], new)
    return Rescored(run, "cognition", n, diff, extra)


# --- localization ---------------------------------------------------------------------------------------------

def _localization(run: Path, rec: dict, clustered: bool, slices: dict[str, set[str]]) -> Rescored:
    from microbench.metrics.bootstrap import DEFAULT_BOOTSTRAP
    from microbench.metrics.coco import STAT_NAMES, coco_evaluate
    from microbench.metrics.localization import grit_intervals, grit_metrics, localization_intervals
    from microbench.results.record import metric_entry

    if slices:
        raise UserError("--slice defines perception slices; a localization run reports per dataset and class")
    table = _read_predictions(run, {"dataset", "class", "grit"}, "localization run")
    counts = rec["counts"]
    generative = str(rec.get("head", "")).startswith("generative")
    metrics: dict[str, float] = {}
    gt = dets = None
    iou_types: tuple[str, ...] = ()
    if not generative:
        for name in ("detections.json", "ground_truth_coco.json"):
            if not (run / name).is_file() and not (name == "detections.json" and "loc/bbox/AP" not in rec["metrics"]):
                raise UserError(f"{run / name} does not exist: rescoring a localization run reads it (run it again)")
        gt = read_json(run / "ground_truth_coco.json")
        dets = read_json(run / "detections.json") if (run / "detections.json").is_file() else []
        iou_types = ("bbox", "segm") if "loc/segm/AP" in rec["metrics"] else ("bbox",)
        for iou_type in iou_types:
            d = dets if iou_type == "segm" else [{k: v for k, v in x.items() if k != "segmentation"} for x in dets]
            res = coco_evaluate(gt, d, iou_type, int(counts["max_dets"]))
            metrics.update({f"{iou_type}/{k}": res[k] for k in STAT_NAMES})
            metrics.update({f"{iou_type}/per_class/{c}": v for c, v in res["per_class_AP"].items()})
    grit = grit_metrics(table) if len(table) else {"grit/macro": float("nan"), "grit/pooled": float("nan")}
    metrics.update(grit)
    images = int(counts["images"])
    new = {f"loc/{k}": metric_entry(v, len(table) if (k.startswith("grit/") or generative) else images)
           for k, v in metrics.items()}
    had = any("clustered" in e for e in rec["metrics"].values())
    if had or clustered:
        boot = rec.get("bootstrap") or DEFAULT_BOOTSTRAP
        intervals = (grit_intervals(table, boot) if generative else
                     localization_intervals(gt, dets, table, iou_types, int(counts["max_dets"]), boot))
        for name, iv in intervals.items():
            if f"loc/{name}" in new:
                new[f"loc/{name}"]["clustered"] = iv
    new = plain(new)
    as_recorded = new if had else {k: {kk: vv for kk, vv in v.items() if kk != "clustered"} for k, v in new.items()}
    n, diff = compare(rec["metrics"], as_recorded)
    return Rescored(run, "localization", n, diff, new if clustered and not had else {})


# --- forgetting study -----------------------------------------------------------------------------------------

def _study(run: Path, study: dict, clustered: bool, slices: dict[str, set[str]]) -> Rescored:
    """Every model summary of the study's test split that its saved predictions determine: base, fine-tuned and
    every single-path method at every α (a method of several seeds: the per-item mean of its seeds' files)."""
    from microbench.studies.forgetting import caption_resampler, summarize_model
    from microbench.studies.sweep import alpha_name

    if slices or clustered:
        raise UserError("--slice/--clustered apply to evaluation runs; a study's intervals are image-clustered "
                        "already")
    folder = run / "predictions"
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist: the study keeps its test predictions there (run it again)")

    def read(file: str) -> pd.DataFrame:
        path = folder / f"{file}.parquet"
        if not path.is_file():
            raise UserError(f"{path} does not exist: the study wrote no predictions for it (run it again)")
        return pd.read_parquet(path)

    s = study["settings"]
    n_res, conf, seed = int(s["n_resamples"]), float(s["confidence"]), int(s["seed"])
    targets = set(study["target_datasets"])
    base = read(alpha_name(0.0))
    resampler = caption_resampler(base, n_res, conf, seed)
    memo: dict[tuple, dict] = {}

    def summary(files: tuple[str, ...], headline: bool) -> dict:
        if (files, headline) not in memo:
            frames = [read(f) for f in files]
            preds = frames[0] if len(frames) == 1 else _mean(frames)
            memo[files, headline] = plain(summarize_model(base, preds, targets, n_res, seed, conf,
                                                          headline=headline and len(frames) == 1,
                                                          resampler=resampler))
        return memo[files, headline]

    def strip(entry: dict) -> dict:
        return {k: v for k, v in entry.items() if k not in ("normalized", "seeds")}

    test = study["splits"]["test"]["models"]
    recorded, recomputed = {}, {}
    for key, file in (("base", alpha_name(0.0)), ("finetuned", alpha_name(1.0))):
        recorded[key], recomputed[key] = strip(test[key]), summary((file,), True)
    primary = study.get("primary_method", "wise_ft")
    for name, method in study["methods"].items():
        labels = [lab.replace("[seed=", "-seed").replace("]", "") for lab in method["paths"]]
        for a in study["alphas"]:
            a = float(a)
            entry = method["splits"]["test"][alpha_name(a)]
            shared = method["starts_at_base"] and a == 0.0 or method["ends_at_finetuned"] and a == 1.0
            if shared:  # the base or the fine-tune itself: one summary (with its headline) for every method
                files: tuple[str, ...] = (alpha_name(a),) * len(labels)
            elif name == "wise_ft":
                files = (alpha_name(a),)
            else:
                files = tuple(f"{lab}_{alpha_name(a)}" for lab in labels)
            key = f"{name}/{alpha_name(a)}"
            recorded[key] = strip(entry)
            single = len(labels) == 1  # several seeds: the summary of their mean (no headline), even at α = 0
            recomputed[key] = summary(files[:1] if len(set(files)) == 1 else files, single and (shared or name == primary))
    n, diff = compare(recorded, recomputed)
    notes = ["the localization head's numbers at each α are not rescored: the study keeps no detections per α"
             ] if "localization" in study["splits"]["test"] else []
    return Rescored(run, "forgetting study", n, diff, notes=notes)


def _mean(frames: list[pd.DataFrame]) -> pd.DataFrame:
    key = ["source", "row_idx", "key"]
    first = frames[0].copy()
    idx = first.set_index(key).index
    first["correct"] = np.mean([f.set_index(key)["correct"].reindex(idx).to_numpy(dtype=float) for f in frames],
                               axis=0)
    return first


#: record task → its rescorer
RESCORERS: dict[str, Callable[..., Rescored]] = {
    "zero_shot_perception": _perception, "generative_perception": _perception, "cognition": _cognition,
    "localization": _localization,
}


def find_rescorable(paths: list[str | Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(folder, "record" | "study") of every run under the given folders (a ``metrics.json`` of a scored task, a
    ``forgetting.json``), and one line for each record found that keeps nothing to rescore (a fit's record)."""
    found, skipped = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist")
        files = [p] if p.is_file() else sorted([*p.rglob("metrics.json"), *p.rglob("forgetting.json")])
        for f in files:
            if f.name == "forgetting.json":
                found.append((f.parent, "study"))
            elif f.name == "metrics.json":
                task = read_json(f).get("task", "zero_shot_perception")
                if task in RESCORERS or p.is_file():
                    found.append((f.parent, "record"))
                else:
                    skipped.append(f"{f.parent}: a {task} record keeps no predictions to rescore (skipped)")
    if not found and not skipped:
        raise UserError(f"no metrics.json or forgetting.json under {', '.join(map(str, paths))}: give run folders")
    return found, skipped


def rescore(run: Path, kind: str, clustered: bool = False, slices: dict[str, set[str]] | None = None) -> Rescored:
    """Rescore one run folder (``kind``: "record" or "study"); writes ``rescored.json``/``.md`` when there are new
    numbers."""
    slices = slices or {}
    if kind == "study":
        result = _study(run, read_json(run / "forgetting.json"), clustered, slices)
    else:
        rec = read_json(run / "metrics.json")
        task = rec.get("task", "zero_shot_perception")
        if task not in RESCORERS:
            raise UserError(f"{run / 'metrics.json'}: task {task!r} has no predictions to rescore (rescorable: "
                            f"{', '.join(RESCORERS)}, and forgetting studies)")
        result = RESCORERS[task](run, rec, clustered, slices)
    if result.extra:
        write_json(run / "rescored.json", {"run_id": None if kind == "study" else rec.get("run_id"),
                                          "clustered": clustered, "slices": {k: sorted(v) for k, v in slices.items()},
                                          "metrics": result.extra})
        write_text(run / "rescored.md", _markdown(result))
    return result


def _markdown(result: Rescored) -> str:
    lines = [f"# Rescored: {result.path}", "", "Recomputed from the run's predictions (no model, no images); the "
             "run's own files are unchanged. Accuracy % with the official interval and the image-clustered one.", "",
             "| metric | value | official 95 % | image-clustered 95 % | n |", "|---|---|---|---|---|"]
    for name, e in result.extra.items():
        if not isinstance(e, dict) or e.get("value") is None:
            continue
        c = e.get("clustered") or {}
        official = "—" if e.get("low") is None else f"[{percent(e['low'])}, {percent(e['high'])}]"
        clus = "—" if c.get("low") is None else f"[{percent(c['low'])}, {percent(c['high'])}]"
        lines.append(f"| {name} | {percent(e['value'])} | {official} | {clus} | {e.get('n', '')} |")
    return "\n".join(lines) + "\n"
