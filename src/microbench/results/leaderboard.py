"""Aggregate many run folders (each with a ``metrics.json``) into one leaderboard CSV + markdown table.

Runs of every task merge into one row per model (name + weights fingerprint): zero-shot and
generative perception (coarse / fine and their slices), cognition (expert multiple choice) and localization
(COCO box/mask AP, GRIT). A later run of the same task for the same row replaces the earlier one (logged).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from microbench.results.records import read_json, write_text
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


def build_leaderboard(paths: list[str | Path], out_dir: str | Path, source: str = "captions") -> pd.DataFrame:
    """Write ``leaderboard.csv`` (values, CI half-widths and n of every column) and ``leaderboard.md``; rows are
    sorted by coarse accuracy (models without perception runs last)."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no metrics.json found under {', '.join(map(str, paths))}")
    rows: dict[tuple, dict] = {}
    for f in runs:
        rec = read_json(f)
        task = rec.get("task", "zero_shot_perception")
        if task not in PERCEPTION_TASKS and task not in TASK_COLUMNS:
            log.warning("skipping %s: unknown task %r", f, task)
            continue
        model = rec["model"]
        key = (model["name"], model.get("fingerprint"))
        row = rows.setdefault(key, {"model": model["name"], "kind": model.get("kind"),
                                    "fingerprint": model.get("fingerprint"), "runs": {}})
        prefix = "" if task in PERCEPTION_TASKS else f"{task}_"
        row[f"{prefix}data"] = rec["data"].get("location")
        row[f"{prefix}data_fingerprint"] = rec["data"].get("fingerprint")
        if task in row["runs"]:
            log.warning("%s: %s run %s replaces %s", model["name"], task, f.parent, row["runs"][task])
        row["runs"][task] = str(f.parent)
        if task in PERCEPTION_TASKS:
            row["split"] = rec["split"]["name"]
            row.update(_perception_columns(rec, source))
        else:
            for col, head in TASK_COLUMNS[task].items():
                row.update(_entry_columns(col, rec.get("headline", {}).get(head)))
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
                              kind="stable").reset_index(drop=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".leaderboard.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(out_dir / "leaderboard.csv")
    shown = [c for c in MARKDOWN_COLUMNS if frame[c].notna().any()]
    lines = ["| model | kind | " + " | ".join(shown) + " |", "|" + "---|" * (len(shown) + 2)]
    for _, r in frame.iterrows():
        cells = [pct({"value": r[c], "ci": r[f"{c}_ci"]}) for c in shown]
        lines.append(f"| {r['model']} | {r['kind']} | " + " | ".join(cells) + " |")
    write_text(out_dir / "leaderboard.md", f"# μ-Bench leaderboard ({source})\n\n"
               "Accuracy % ± 95 % bootstrap CI half-width (coarse/fine: the official headline numbers; cognition: "
               "expert multiple choice); localization: COCO box AP and GRIT localization score in % (no CI).\n\n"
               + "\n".join(lines) + "\n")
    return frame
