"""Aggregate many run folders (each with a ``metrics.json``) into one leaderboard CSV + markdown table.

Runs of every task merge into one row per model (name + weights fingerprint): zero-shot and
generative perception (coarse / fine and their slices), cognition (expert multiple choice) and localization
(COCO box/mask AP, GRIT). Rows are keyed by what was evaluated too (data fingerprint, split, filters): a subset
run is a row of its own, marked as such, never in place of the full run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from microbench.errors import UserError
from microbench.metrics.bootstrap import DEFAULT_BOOTSTRAP
from microbench.results.compare import holm, mean_ranks, paired_deltas, read_predictions
from microbench.results.io import read_json, write_figure, write_text
from microbench.results.paper import SOURCE as PAPER_SOURCE
from microbench.results.paper import TABLE1, paper_name
from microbench.results.report import pct

log = logging.getLogger(__name__)

COLUMNS = {
    "coarse": "official/coarse", "fine": "official/fine",
    "coarse_excl_eulenberg": "official_excl_eulenberg/coarse", "fine_excl_eulenberg": "official_excl_eulenberg/fine",
    "pathology_fine": "slice/pathology/fine", "he_fine": "slice/he/fine",
    "macro_dataset_fine": "macro_dataset/fine",
    "domain": "official/type/domain", "modality": "official/type/modality", "stain": "official/type/stain",
    "subdomain": "official/type/subdomain", "submodality": "official/type/submodality",
}
#: columns filled by non-perception tasks: task -> {column: key of record["headline"]}
TASK_COLUMNS = {
    "cognition": {"cognition": "cognition"},
    "localization": {"loc_bbox_AP": "bbox_AP", "loc_segm_AP": "segm_AP", "loc_grit": "grit"},
}
PERCEPTION_TASKS = ("zero_shot_perception", "generative_perception")
MARKDOWN_COLUMNS = ["coarse", "fine", "coarse_excl_eulenberg", "fine_excl_eulenberg", "pathology_fine", "cognition",
                    "loc_bbox_AP", "loc_grit"]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """metrics.json files under the given folders (searched recursively) or given directly."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("metrics.json"))
    return found


def _entry_columns(col: str, entry: dict | None) -> dict:
    """A column's value, official half-width ``ci``, ``n``, and the image-clustered ``se``, ``low`` and ``high``
    (``se`` from the clustered interval's half-width / z for records written before ``se`` was kept)."""
    entry = entry or {}
    c = entry.get("clustered") or {}
    se = c.get("se")
    if se is None and c.get("low") is not None:
        se = (c["high"] - c["low"]) / (2 * 1.959964)
    return {col: entry.get("value"), f"{col}_ci": entry.get("ci"), f"{col}_n": entry.get("n", 0),
            f"{col}_se": se, f"{col}_low": c.get("low"), f"{col}_high": c.get("high")}


def _perception_columns(rec: dict, source: str) -> dict:
    m = rec["metrics"]
    src = source if any(k.startswith(f"{source}/") for k in m) else (rec.get("sources") or [source])[0]
    out = {}
    for col, key in COLUMNS.items():
        out.update(_entry_columns(col, m.get(f"{src}/{key}")))
    # the slices of the mean rank: every dataset's headline coarse and fine accuracy
    out["_slices"] = {k.removeprefix(f"{src}/"): v["value"] for k, v in m.items()
                      if k.startswith(f"{src}/dataset/") and v.get("value") is not None}
    out["_source"] = src
    return out


def scope_of(rec: dict) -> tuple[str, bool]:
    """What a perception run evaluated, in words, and whether it is a subset of its copy (filters, a split other
    than ``all``, excluded datasets). A subset run never stands in for a full-benchmark run."""
    data = rec.get("data") or {}
    filters = {k: v for k, v in (data.get("filters") or {}).items() if v}
    parts = [f"{k}={','.join(map(str, v)) if isinstance(v, list | tuple) else v}" for k, v in sorted(filters.items())]
    if data.get("exclude_datasets"):
        parts.append(f"exclude={','.join(data['exclude_datasets'])}")
    split = (rec.get("split") or {}).get("name", "all")
    if split not in ("all", None):
        parts.append(f"split={split}")
    return ("subset: " + "; ".join(parts), True) if parts else ("full", False)


def _evaluated(rec: dict, task: str) -> tuple:
    """The identity of what a run evaluated: copy content, split and filters (rows are keyed by it)."""
    data = rec.get("data") or {}
    split = rec.get("split") or {}
    return (task if task not in PERCEPTION_TASKS else "perception", data.get("fingerprint") or data.get("location"),
            split.get("name"), repr(sorted((data.get("filters") or {}).items())), repr(data.get("exclude_datasets")))


def build_leaderboard(paths: list[str | Path], out_dir: str | Path, source: str = "captions",
                      baseline: str | None = None, paper: bool = False, boot: dict | None = None,
                      plot: bool = True) -> pd.DataFrame:
    """Write ``leaderboard.csv`` (values, CI half-widths and n of every column) and ``leaderboard.md``.

    One row per model (name + weights fingerprint) and evaluated perception set (data fingerprint, split, filters):
    a run on a subset of the benchmark gets a row of its own, marked ``subset: ...`` with its filters, and never
    replaces the model's full-benchmark row. Cognition and localization runs join the model's full row (else its
    first row, else a row of their own; ``scope`` describes the perception columns). Two runs of the same evaluation: the later folder wins (logged). Full rows come first, sorted by
    coarse accuracy (models without perception runs last).

    Every headline has ``_n``, ``_ci`` (official half-width), ``_se``, ``_low``, ``_high`` (image-clustered);
    ``_top`` marks the models not separable from the column's best (paired, image-clustered, Holm-corrected
    p ≥ 1 − confidence, among the runs that scored the same items), ``mean_rank`` ranks over every dataset's
    coarse and fine accuracy. ``baseline``: paired deltas of every model against that one (``<col>_delta``,
    ``_delta_low``, ``_delta_high``, ``_p``, ``_p_holm``). ``paper``: Table 1 of the paper beside ours
    (``paper_<col>``, ``paper_<col>_diff``, ``paper_<col>_inside``). ``plot``: ``leaderboard.png``."""
    boot = {**DEFAULT_BOOTSTRAP, **(boot or {})}
    runs = find_runs(paths)
    if not runs:
        raise UserError(f"no metrics.json found under {', '.join(map(str, paths))}")
    entries: dict[tuple, tuple[str, dict, Path]] = {}
    for f in runs:
        rec = read_json(f)
        task = rec.get("task", "zero_shot_perception")
        if task not in PERCEPTION_TASKS and task not in TASK_COLUMNS:
            log.warning("skipping %s: unknown task %r", f, task)
            continue
        model = rec["model"]
        key = (model["name"], model.get("fingerprint"), _evaluated(rec, task))
        if key in entries:
            log.warning("%s: %s run %s replaces %s (the same evaluation)", model["name"], task, f.parent,
                        entries[key][2].parent)
        entries[key] = (task, rec, f)
    rows: dict[tuple, dict] = {}

    def new_row(model: dict, scope: str, subset: bool) -> dict:
        return {"model": model["name"], "kind": model.get("kind"), "fingerprint": model.get("fingerprint"),
                "scope": scope, "subset": subset, "runs": {}}

    for (name, fp, evaluated), (task, rec, f) in entries.items():  # perception rows first
        if task not in PERCEPTION_TASKS:
            continue
        scope, subset = scope_of(rec)
        row = rows.setdefault((name, fp, evaluated[1:]), new_row(rec["model"], scope, subset))
        row["data"], row["data_fingerprint"] = rec["data"].get("location"), rec["data"].get("fingerprint")
        row["split"] = rec["split"]["name"]
        row["runs"][task] = str(f.parent)
        row.update(_perception_columns(rec, source))
        row["_pair"] = {"perception": (evaluated, f.parent)}
        row["_model"] = rec["model"]
    for (name, fp, evaluated), (task, rec, f) in entries.items():
        if task in PERCEPTION_TASKS:
            continue
        mine = [r for (n, p, _), r in rows.items() if (n, p) == (name, fp)]
        home = next((r for r in mine if not r["subset"] and task not in r["runs"]), None) or next(
            (r for r in mine if task not in r["runs"]), None)  # the perception scope names only perception
        if home is None:
            home = rows.setdefault((name, fp, evaluated), new_row(rec["model"], f"{task} only", False))
        home["runs"][task] = str(f.parent)
        home.setdefault("_pair", {})[task] = (evaluated, f.parent)
        home.setdefault("_model", rec["model"])
        home[f"{task}_data"] = rec["data"].get("location")
        home[f"{task}_data_fingerprint"] = rec["data"].get("fingerprint")
        for col, head in TASK_COLUMNS[task].items():
            home.update(_entry_columns(col, rec.get("headline", {}).get(head)))
    all_cols = [*COLUMNS, *(c for cols in TASK_COLUMNS.values() for c in cols)]
    records, private = [], []
    for row in rows.values():
        for col in all_cols:
            for suffix, empty in (("", None), ("_ci", None), ("_n", 0), ("_se", None), ("_low", None),
                                  ("_high", None)):
                row.setdefault(f"{col}{suffix}", empty)
        row["runs"] = ";".join(f"{t}={p}" for t, p in sorted(row["runs"].items()))
        private.append({k: row.pop(k) for k in [k for k in row if k.startswith("_")]})
        records.append(row)
    frame = pd.DataFrame(records)
    frame["_private"] = private
    frame = frame.sort_values(["coarse", "cognition", "loc_grit"], ascending=False, na_position="last",
                              kind="stable")
    frame = frame.sort_values("subset", kind="stable").reset_index(drop=True)  # full-benchmark rows first
    private = frame.pop("_private").tolist()
    notes: list[str] = []
    slices = pd.DataFrame([p.get("_slices") or {} for p in private], index=frame.index, dtype=float)
    slices.loc[frame["subset"].to_numpy(dtype=bool)] = np.nan  # subset rows are not ranked
    ranks = mean_ranks(slices)
    frame["mean_rank"] = ranks["mean_rank"].where(ranks["slices"] > 0)
    frame["ranked_slices"] = ranks["slices"]
    predictions: dict[Path, pd.DataFrame] = {}

    def preds(path: Path, task: str, src: str) -> pd.DataFrame:
        if (path, src) not in predictions:
            p = read_predictions(path)
            predictions[path, src] = p[p["source"] == src] if task == "perception" and "source" in p else p
        return predictions[path, src]

    for col, task, name in PAIRED:
        _top_group(frame, private, col, task, name, preds, boot, notes)
    if baseline is not None:
        notes += _against_baseline(frame, private, baseline, preds, boot)
    if paper:
        _paper_columns(frame, private)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "leaderboard.csv", frame.to_csv(index=False))
    write_text(out_dir / "leaderboard.md", _markdown(frame, source, baseline, paper, notes, boot))
    if plot:
        _bar_chart(frame, out_dir / "leaderboard.png", source)
    return frame


#: the columns that get significance groups and baseline deltas: (column, task, metric name)
PAIRED = (("coarse", "perception", "official/coarse"), ("fine", "perception", "official/fine"),
          ("cognition", "cognition", "cognition/all"))


def _metric_name(task: str, name: str, source: str) -> str:
    return f"{source}/{name}" if task == "perception" else name


def _pairable(private: list[dict], i: int, j: int, task: str) -> str | None:
    """Why rows i and j cannot be paired on ``task`` (one line), or None."""
    a, b = (private[i].get("_pair") or {}).get(task), (private[j].get("_pair") or {}).get(task)
    if a is None or b is None:
        return None if a is b else "no run of this task"
    if a[0][1:] != b[0][1:]:
        what = ("copy" if a[0][1] != b[0][1] else "split" if a[0][2] != b[0][2] else "filters")
        return f"scored a different {what} of the benchmark ({a[0][1]} vs {b[0][1]}), so no question is shared"
    return None


def _delta(private, i, j, task, col, name, preds, boot) -> dict | None:
    """Δ of row j against row i on one column (paired items), or None without runs."""
    a, b = private[i]["_pair"][task][1], private[j]["_pair"][task][1]
    src = private[i].get("_source", "captions")
    res = paired_deltas(preds(a, task, src), preds(b, task, src), task, {col: _metric_name(task, name, src)}, boot)
    return res.get(col)  # None: no shared item (e.g. a generative model answered the question form only)


def _top_group(frame, private, col, task, name, preds, boot, notes) -> None:
    """``<col>_top``: the column's best full row and every full row of the same evaluation not separable from it
    (Holm over the comparisons with the best); rows of another evaluation stay empty."""
    frame[f"{col}_top"] = None
    full = [i for i in frame.index if not frame.at[i, "subset"] and frame.at[i, col] is not None
            and pd.notna(frame.at[i, col]) and task in (private[i].get("_pair") or {})]
    if len(full) < 2:
        return
    best = max(full, key=lambda i: frame.at[i, col])
    deltas = {i: _delta(private, best, i, task, col, name, preds, boot) for i in full
              if i != best and _pairable(private, best, i, task) is None}
    others = [i for i, d in deltas.items() if d is not None]
    frame.at[best, f"{col}_top"] = True
    for i, q in zip(others, holm([deltas[i]["p"] for i in others]), strict=True):
        frame.at[i, f"{col}_top"] = bool(q >= 1 - boot["confidence"])
    if len(others) < len(full) - 1:
        notes.append(f"{col}: {len(full) - 1 - len(others)} model(s) share no scored question with the best "
                     f"({frame.at[best, 'model']}: another copy, split, filter set or question form) and are in no "
                     "significance group")


def _against_baseline(frame, private, baseline, preds, boot) -> list[str]:
    rows = [i for i in frame.index if frame.at[i, "model"] == baseline]
    if not rows:
        raise UserError(f"--baseline {baseline!r} is not a model of this leaderboard (models: "
                        f"{', '.join(sorted(set(frame['model'])))})")
    base = rows[0]  # full rows come first
    notes = []
    for col, task, name in PAIRED:
        for suffix in ("_delta", "_delta_low", "_delta_high", "_p", "_p_holm"):
            frame[f"{col}{suffix}"] = np.nan
        done = []
        for i in frame.index:
            if i == base or task not in (private[i].get("_pair") or {}) or task not in private[base].get("_pair", {}):
                continue
            why = _pairable(private, base, i, task)
            if why is not None:
                notes.append(f"{frame.at[i, 'model']} ({col}) not paired with {baseline}: {why}")
                continue
            d = _delta(private, base, i, task, col, name, preds, boot)
            if d is None:
                notes.append(f"{frame.at[i, 'model']} ({col}) not paired with {baseline}: no question scored by "
                             "both (another question form)")
                continue
            frame.at[i, f"{col}_delta"], frame.at[i, f"{col}_p"] = d["value"], d["p"]
            frame.at[i, f"{col}_delta_low"], frame.at[i, f"{col}_delta_high"] = d["low"], d["high"]
            done.append(i)
        if done:
            frame.loc[done, f"{col}_p_holm"] = holm(frame.loc[done, f"{col}_p"].to_numpy())
    return notes


def _paper_columns(frame, private) -> None:
    """Table 1 of the paper beside ours: the value, our minus the paper's, and whether the paper's value lies
    inside our official interval (the interval the paper's own ± is)."""
    frame["paper_model"] = [paper_name(p.get("_model") or {}) for p in private]
    for col in ("coarse", "fine", "cognition"):
        values, diffs, inside = [], [], []
        for i, name in zip(frame.index, frame["paper_model"], strict=True):
            ours, ci = frame.at[i, col], frame.at[i, f"{col}_ci"]
            theirs = TABLE1.get(name, {}).get(col, (None,))[0] if name and not frame.at[i, "subset"] else None
            values.append(theirs)
            ok = theirs is not None and ours is not None and pd.notna(ours)
            diffs.append(100 * ours - theirs if ok else None)
            inside.append(bool(abs(100 * ours - theirs) <= 100 * ci) if ok and ci is not None and pd.notna(ci)
                          else None)
        frame[f"paper_{col}"], frame[f"paper_{col}_diff"], frame[f"paper_{col}_inside"] = values, diffs, inside


def _cell(r, col: str) -> str:
    text = pct({"value": r[col], "ci": r[f"{col}_ci"]})
    return f"**{text}**" if r.get(f"{col}_top") is True else text


def _pp(x) -> str:
    return "—" if x is None or pd.isna(x) else f"{100 * x:+.2f}"


def _markdown(frame, source, baseline, paper, notes, boot) -> str:
    shown = [c for c in MARKDOWN_COLUMNS if frame[c].notna().any()]
    conf = int(round(100 * boot["confidence"]))
    rank = frame["mean_rank"].notna().any()
    lines = ["| model | kind | " + " | ".join(shown) + (" | mean rank |" if rank else " |"),
             "|" + "---|" * (len(shown) + 2 + rank)]
    for _, r in frame.iterrows():
        label = f"{r['model']} ({r['scope']})" if r["subset"] else r["model"]
        cells = [_cell(r, c) for c in shown]
        if rank:
            cells.append("—" if pd.isna(r["mean_rank"]) else f"{r['mean_rank']:.2f} ({int(r['ranked_slices'])})")
        lines.append(f"| {label} | {r['kind']} | " + " | ".join(cells) + " |")
    text = [f"# μ-Bench leaderboard ({source})", "",
            "Accuracy % ± the official 95 % bootstrap half-width (coarse/fine: the official headline numbers; "
            "cognition: expert multiple choice); localization: COCO box AP and GRIT localization score in %. "
            f"**Bold**: not separable from the column's best (paired, image-clustered bootstrap, Holm-corrected "
            f"p ≥ {1 - boot['confidence']:.2f}, among the runs that scored the same questions). Mean rank: over every "
            "dataset's coarse and fine accuracy (1 = best; the number of ranked slices in brackets). Rows marked "
            "(subset: ...) scored only part of the benchmark and are not comparable with full rows.", "", *lines, ""]
    unc = [c for c in ("coarse", "fine", "cognition", "loc_bbox_AP", "loc_grit") if c in shown]
    if unc:
        text += [f"## Uncertainty: n, image-clustered SE and {conf} % interval", "",
                 "Questions on one image are resampled together (the official ± above treats them as independent).",
                 "", "| model | " + " | ".join(f"{c} n | {c} SE | {c} {conf} % CI" for c in unc) + " |",
                 "|---|" + "---|" * (3 * len(unc))]
        for _, r in frame.iterrows():
            cells = []
            for c in unc:
                ok = r[f"{c}_low"] is not None and pd.notna(r[f"{c}_low"])
                cells += [str(int(r[f"{c}_n"] or 0)), f"{100 * r[f'{c}_se']:.2f}" if ok else "—",
                          f"[{100 * r[f'{c}_low']:.2f}, {100 * r[f'{c}_high']:.2f}]" if ok else "—"]
            label = f"{r['model']} ({r['scope']})" if r["subset"] else r["model"]
            text.append(f"| {label} | " + " | ".join(cells) + " |")
        text.append("")
    if baseline is not None:
        cols = [c for c, _, _ in PAIRED if frame[f"{c}_delta"].notna().any()]
        text += [f"## Paired against {baseline}", "",
                 f"Δ = model − {baseline} in points on the questions both answered, image-clustered {conf} % "
                 "interval, bootstrap p-value and Holm-corrected p (over the models of the column).", "",
                 "| model | " + " | ".join(f"{c} Δ [{conf} % CI] | p | p (Holm)" for c in cols) + " |",
                 "|---|" + "---|" * (3 * len(cols))]
        for _, r in frame.iterrows():
            if r["model"] == baseline or not any(pd.notna(r[f"{c}_delta"]) for c in cols):
                continue
            cells = []
            for c in cols:
                if pd.isna(r[f"{c}_delta"]):
                    cells += ["—", "—", "—"]
                    continue
                star = " *" if r[f"{c}_p_holm"] < 1 - boot["confidence"] else ""
                cells += [f"{_pp(r[f'{c}_delta'])} [{_pp(r[f'{c}_delta_low'])}, {_pp(r[f'{c}_delta_high'])}]",
                          f"{r[f'{c}_p']:.4f}", f"{r[f'{c}_p_holm']:.4f}{star}"]
            text.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        text += ["", "(* significant after Holm's correction)", ""]
    if paper:
        text += ["## Paper Table 1 side by side", "", f"Source: {PAPER_SOURCE}. Ours − paper in points; inside: the "
                 "paper's value lies inside our official interval (our value ± half-width).", "",
                 "| model | paper name | " + " | ".join(f"{c} ours | paper | diff | inside"
                                                       for c in ("coarse", "fine", "cognition")) + " |",
                 "|---|---|" + "---|" * 12]
        for _, r in frame.iterrows():
            if not isinstance(r["paper_model"], str) or r["subset"]:
                continue
            cells = []
            for c in ("coarse", "fine", "cognition"):
                theirs, diff, inside = r[f"paper_{c}"], r[f"paper_{c}_diff"], r[f"paper_{c}_inside"]
                cells += [pct({"value": r[c], "ci": r[f"{c}_ci"]}), "—" if pd.isna(theirs) else f"{theirs:.2f}",
                          "—" if pd.isna(diff) else f"{diff:+.2f}",
                          "—" if inside is None or pd.isna(inside) else ("yes" if inside else "no")]
            text.append(f"| {r['model']} | {r['paper_model']} | " + " | ".join(cells) + " |")
        text.append("")
    if notes:
        text += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(text)


def _bar_chart(frame: pd.DataFrame, path: Path, source: str) -> None:
    """Coarse and fine accuracy of every full row with its image-clustered interval (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frame[~frame["subset"] & frame["coarse"].notna()]
    if rows.empty:
        return
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6))
    for k, (col, color) in enumerate((("coarse", "#4477aa"), ("fine", "#ee6677"))):
        v = 100 * rows[col].astype(float).to_numpy()
        lo = 100 * rows[f"{col}_low"].astype(float).to_numpy()
        hi = 100 * rows[f"{col}_high"].astype(float).to_numpy()
        err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
        ax.bar(x + (k - 0.5) * 0.38, v, 0.38, yerr=err, capsize=3, color=color, label=col)
    ax.set_xticks(x, rows["model"].tolist(), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"μ-Bench headline ({source}), image-clustered 95 % CI", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)
