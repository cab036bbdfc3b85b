"""Aggregate many run folders (each with a ``metrics.json``) into one leaderboard CSV + markdown table.

Runs of every task merge into one row per model (name + weights fingerprint): zero-shot and
generative perception (coarse / fine and their slices), cognition (expert multiple choice) and localization
(COCO box/mask AP, GRIT). Rows are keyed by what was evaluated too (data fingerprint, split, filters): a subset
run is a row of its own, marked as such, never in place of the full run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from microbench.errors import UserError
from microbench.results.io import read_json, write_text
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
    return {col: entry.get("value") if entry else None, f"{col}_ci": entry.get("ci") if entry else None,
            f"{col}_n": entry.get("n", 0) if entry else 0}


def _perception_columns(rec: dict, source: str) -> dict:
    m = rec["metrics"]
    src = source if any(k.startswith(f"{source}/") for k in m) else (rec.get("sources") or [source])[0]
    out = {}
    for col, key in COLUMNS.items():
        out.update(_entry_columns(col, m.get(f"{src}/{key}")))
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


def build_leaderboard(paths: list[str | Path], out_dir: str | Path, source: str = "captions") -> pd.DataFrame:
    """Write ``leaderboard.csv`` (values, CI half-widths and n of every column) and ``leaderboard.md``.

    One row per model (name + weights fingerprint) and evaluated perception set (data fingerprint, split, filters):
    a run on a subset of the benchmark gets a row of its own, marked ``subset: ...`` with its filters, and never
    replaces the model's full-benchmark row. Cognition and localization runs join the model's full row (else its
    first row, else a row of their own; ``scope`` describes the perception columns). Two runs of the same evaluation: the later folder wins (logged). Full rows come first, sorted by
    coarse accuracy (models without perception runs last)."""
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
    for (name, fp, evaluated), (task, rec, f) in entries.items():
        if task in PERCEPTION_TASKS:
            continue
        mine = [r for (n, p, _), r in rows.items() if (n, p) == (name, fp)]
        home = next((r for r in mine if not r["subset"] and task not in r["runs"]), None) or next(
            (r for r in mine if task not in r["runs"]), None)  # the perception scope names only perception
        if home is None:
            home = rows.setdefault((name, fp, evaluated), new_row(rec["model"], f"{task} only", False))
        home["runs"][task] = str(f.parent)
        home[f"{task}_data"] = rec["data"].get("location")
        home[f"{task}_data_fingerprint"] = rec["data"].get("fingerprint")
        for col, head in TASK_COLUMNS[task].items():
            home.update(_entry_columns(col, rec.get("headline", {}).get(head)))
    all_cols = [*COLUMNS, *(c for cols in TASK_COLUMNS.values() for c in cols)]
    records = []
    for row in rows.values():
        for col in all_cols:
            row.setdefault(col, None)
            row.setdefault(f"{col}_ci", None)
            row.setdefault(f"{col}_n", 0)
        row["runs"] = ";".join(f"{t}={p}" for t, p in sorted(row["runs"].items()))
        records.append(row)
    frame = pd.DataFrame(records)
    frame = frame.sort_values(["coarse", "cognition", "loc_grit"], ascending=False, na_position="last",
                              kind="stable")
    frame = frame.sort_values("subset", kind="stable").reset_index(drop=True)  # full-benchmark rows first
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".leaderboard.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(out_dir / "leaderboard.csv")
    shown = [c for c in MARKDOWN_COLUMNS if frame[c].notna().any()]
    lines = ["| model | kind | " + " | ".join(shown) + " |", "|" + "---|" * (len(shown) + 2)]
    for _, r in frame.iterrows():
        cells = [pct({"value": r[c], "ci": r[f"{c}_ci"]}) for c in shown]
        label = f"{r['model']} ({r['scope']})" if r["subset"] else r["model"]
        lines.append(f"| {label} | {r['kind']} | " + " | ".join(cells) + " |")
    write_text(out_dir / "leaderboard.md", f"# μ-Bench leaderboard ({source})\n\n"
               "Accuracy % ± 95 % bootstrap CI half-width (coarse/fine: the official headline numbers; cognition: "
               "expert multiple choice); localization: COCO box AP and GRIT localization score in % (no CI). Rows "
               "marked (subset: ...) scored only part of the benchmark (their filters and split are named) and are "
               "not comparable with full rows.\n\n"
               + "\n".join(lines) + "\n")
    return frame
