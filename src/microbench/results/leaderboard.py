"""Aggregate many run folders (each with a ``metrics.json``) into one leaderboard CSV + markdown table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from microbench.results.records import read_json, write_text
from microbench.results.report import pct

COLUMNS = {
    "coarse": "official/coarse", "fine": "official/fine",
    "coarse_excl_eulenberg": "official_excl_eulenberg/coarse", "fine_excl_eulenberg": "official_excl_eulenberg/fine",
    "pathology_fine": "slice/pathology/fine", "he_fine": "slice/he/fine",
    "macro_dataset_fine": "macro_dataset/fine",
    "domain": "type/domain", "modality": "type/modality", "stain": "type/stain", "subdomain": "type/subdomain",
    "submodality": "type/submodality",
}


def find_runs(paths: list[str | Path]) -> list[Path]:
    """metrics.json files under the given folders (searched recursively) or given directly."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("metrics.json"))
    return found


def build_leaderboard(paths: list[str | Path], out_dir: str | Path, source: str = "captions") -> pd.DataFrame:
    """Write ``leaderboard.csv`` (values, CI half-widths and n) and ``leaderboard.md``; rows sorted by coarse."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no metrics.json found under {', '.join(map(str, paths))}")
    rows, md_rows = [], []
    for f in runs:
        rec = read_json(f)
        m = rec["metrics"]
        row = {"model": rec["model"]["name"], "fingerprint": rec["model"]["fingerprint"],
               "data": rec["data"]["location"], "data_fingerprint": rec["data"]["fingerprint"],
               "split": rec["split"]["name"], "run": str(f.parent)}
        md = [rec["model"]["name"]]
        for col, key in COLUMNS.items():
            v = m.get(f"{source}/{key}")
            row[col] = v["value"] if v else None
            row[f"{col}_ci"] = v["ci"] if v else None
            row[f"{col}_n"] = v["n"] if v else 0
            md.append(pct(v))
        rows.append(row)
        md_rows.append((row["coarse"] if row["coarse"] is not None else -1.0, md))
    frame = pd.DataFrame(rows).sort_values("coarse", ascending=False, na_position="last")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".leaderboard.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(out_dir / "leaderboard.csv")
    header = ["model", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md) + " |" for _, md in sorted(md_rows, key=lambda t: -t[0])]
    write_text(out_dir / "leaderboard.md", f"# μ-Bench leaderboard ({source})\n\nAccuracy % ± 95 % CI half-width; "
               "coarse/fine are the official headline numbers.\n\n" + "\n".join(lines) + "\n")
    return frame
