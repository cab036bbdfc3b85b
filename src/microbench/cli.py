"""``python -m microbench`` (or ``microbench``): the Hydra jobs of any install and small tools around the data layer.

``eval | train | forgetting | specialists <overrides>`` run the jobs of ``src/<job>.py`` with the configs of the
checkout or, for an installed copy, the configs shipped in the package (``microbench.resources``).

``info PATH`` summarises any copy of the benchmark (Hub id, Hub-layout folder, save_to_disk folder, parquet, or
``sample``) as a table, or as JSON with ``--json``. ``leaderboard RUN_DIR... --out DIR`` aggregates evaluation runs
(folders holding ``metrics.json``) into ``leaderboard.csv`` and ``leaderboard.md``. ``grit ANSWERS.jsonl --format
qwen|paligemma`` scores a file of generative box answers with the official GRIT localization metric. ``rescore
RUN_DIR...`` recomputes every metric of runs from their predictions and checks them against their records.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from microbench.data.schema import HUB_REVISION
from microbench.errors import UserError


def _info(args: argparse.Namespace) -> int:
    from microbench.data.loading import load_ubench
    from microbench.data.summary import summarize

    ds, src = load_ubench(args.path, revision=args.revision)
    record = summarize(ds, src, check_images=args.check_images)
    if args.json:
        json.dump(record, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        _print_info(record)
    # a check that finds problems fails (exit 1), so scripts and CI can rely on it; 2 stays "could not run"
    return 1 if args.check_images and record["invalid"] else 0


def _print_info(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    src = r["source"]
    con.print(f"[bold]μ-Bench copy[/bold] {src['location']} ({src['kind']}"
              + (f", revision {src['revision']}" if src.get("revision") else "") + f"), fingerprint {src['fingerprint']}")
    con.print(f"{r['rows']} rows, {r['unique_image_ids']} unique image ids ({r['rows_with_duplicated_image_id']} rows "
              f"share an id), {r['items']} closed-VQA items, {r['rows_with_bbox']} rows with bbox, "
              f"{r['rows_with_polygon']} with polygon, {r['null_dataset_rows']} rows with a null dataset name")
    t = Table(title="Rows per dataset", show_lines=False)
    t.add_column("dataset")
    t.add_column("rows", justify="right")
    t.add_column("official", justify="center")
    official = set(r["official_datasets_present"])
    for name, n in r["datasets"].items():
        t.add_row(name, str(n), "yes" if name in official else "no")
    con.print(t)
    q = Table(title="Present entries per question type / caption key")
    q.add_column("type")
    q.add_column("questions", justify="right")
    q.add_column("captions (per variant)", justify="right")
    for qtype, n in r["questions"].items():
        caps = ", ".join(f"{k.rsplit('_', 1)[-1]}: {v}" for k, v in r["captions"].items() if k.rsplit("_", 1)[0] == qtype)
        q.add_row(qtype, str(n), caps)
    con.print(q)
    if r["absent"]:
        con.print("Absent (null) entries: " + ", ".join(f"{k}={v}" for k, v in r["absent"].items()))
    if r.get("image_failures"):
        con.print(f"[red]{r['image_failures']} image(s) could not be decoded[/red] (listed below)")
    if r["invalid"]:
        con.print(f"[red]{len(r['invalid'])} problem(s)[/red]:")
        for p in r["invalid"][:20]:
            con.print(f"  row {p['row_idx']} {p.get('source')}.{p.get('key')}: {p['problem']}")
        if len(r["invalid"]) > 20:
            con.print(f"  ... and {len(r['invalid']) - 20} more (see --json)")
    else:
        con.print("[green]no problems found[/green]")


def _leaderboard(args: argparse.Namespace) -> int:
    from microbench.results.leaderboard import build_leaderboard

    frame = build_leaderboard(args.runs, args.out, source=args.source, baseline=args.baseline, paper=args.paper,
                              boot={"n_resamples": args.resamples, "confidence": args.confidence, "seed": args.seed},
                              plot=not args.no_plot)
    print((args.out / "leaderboard.md").read_text())
    png = "" if args.no_plot or not (args.out / "leaderboard.png").exists() else f", {args.out}/leaderboard.png"
    print(f"{len(frame)} row(s) -> {args.out}/leaderboard.csv, {args.out}/leaderboard.md{png}")
    return 0


def _rescore(args: argparse.Namespace) -> int:
    """Recompute every metric of each run from its own files; 1 when any run disagrees with its record."""
    from microbench.results.rescore import find_rescorable, parse_slices, rescore

    slices = parse_slices(args.slice)
    bad = 0
    found, skipped = find_rescorable(args.runs)
    for line in skipped:
        print(line)
    for run, kind in found:
        result = rescore(run, kind, clustered=args.clustered, slices=slices)
        print("\n".join(result.lines()))
        if result.extra:
            print(f"  new numbers ({len(result.extra)}) -> {run / 'rescored.json'}, {run / 'rescored.md'}")
        bad += not result.ok
    return 1 if bad else 0


def _grit(args: argparse.Namespace) -> int:
    """Score generative box answers from a file with GRIT."""
    import pandas as pd

    from microbench.generative.boxes import score_box_answers
    from microbench.results.io import write_json
    from microbench.results.report import percent

    path = Path(args.answers)
    if not path.is_file():
        raise UserError(f"answers file {path} does not exist")
    frame = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_csv(path)
    need = {"response", "width", "height", "gt_boxes", "dataset", "class"}
    if need - set(frame.columns):
        raise UserError(f"{path} lacks columns {sorted(need - set(frame.columns))}: one row per (image, class) with "
                         "response, width, height, gt_boxes ([[x1, y1, x2, y2], ...] pixels), dataset, class")
    if frame["gt_boxes"].map(lambda v: isinstance(v, str)).any():
        frame["gt_boxes"] = frame["gt_boxes"].map(lambda v: json.loads(v) if isinstance(v, str) else v)
    _, metrics = score_box_answers(frame, args.format)
    print(f"GRIT macro {percent(metrics['grit/macro'])}, pooled {percent(metrics['grit/pooled'])} "
          f"({len(frame)} questions, {metrics['unparsed_answers']} without a parseable box)")
    for k, v in metrics.items():
        if k.count("/") >= 2:
            print(f"  {k.removeprefix('grit/')}: {percent(v)}")
    if args.out:
        write_json(args.out, metrics)
    return 0


def _export(args: argparse.Namespace) -> int:
    """A fine-tune's checkpoint as safetensors + config + model card (microbench.tasks.export)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base is rebuilt from the checkpoint's record, never fetched
    from microbench.tasks.export import export

    res = export(args.ckpt, args.out, adapter_only=args.adapter_only)
    print(f"exported {res['what']} -> {res['out']} ({', '.join(res['files'])}, README.md"
          f"{' with the run results' if res['results_in_card'] else ''}); load: {res['load']}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    """Fine-tuning recipes side by side from their fits and forgetting studies (microbench.results.recipes)."""
    from microbench.results.recipes import compare

    out = args.out or Path(args.runs) / "recipes"
    result = compare(args.runs, out)
    for line in result["left_out"]:
        print(f"left out: {line}")
    print(f"{len(result['recipes'])} recipes -> {out}/recipes.md, {out}/recipes.json, {out}/recipes.png")
    return 0


def _job(argv: list[str]) -> str | None:
    """The Hydra job ``argv`` asks for: ``microbench eval <overrides>``, or the job of the process that started this
    one (a DDP rank that Lightning starts again as ``python -m microbench.__main__ <overrides>``)."""
    from microbench.jobs import JOBS

    if argv and argv[0] in JOBS:
        return argv[0]
    inherited = os.environ.get("MICROBENCH_JOB")
    return inherited if inherited in JOBS and not (argv and argv[0] in SUBCOMMANDS) else None


#: the subcommands that are not Hydra jobs
SUBCOMMANDS = ("info", "leaderboard", "rescore", "grit", "export", "recipes")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = _job(argv)
    if job is not None:  # a Hydra job: the overrides go to Hydra as sys.argv, as for python src/<job>.py
        from microbench.jobs import run_job

        os.environ["MICROBENCH_JOB"] = job
        overrides = argv[1:] if argv[:1] == [job] else argv
        sys.argv = [sys.argv[0], *overrides]
        run_job(job)
        return 0
    parser = argparse.ArgumentParser(prog="microbench", description="Micro-Bench (μ-Bench) tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("eval", "evaluate a model (python src/eval.py)"), ("train", "fine-tune, probe or fit a "
                       "localization head (python src/train.py)"), ("forgetting", "a forgetting study of a "
                       "fine-tune (python src/forgetting.py)"), ("specialists", "the study of many specialists "
                       "(python src/specialists.py)")):
        sub.add_parser(name, help=f"{what}: microbench {name} <hydra overrides>, with the shipped configs",
                       add_help=False)
    p = sub.add_parser("info", help="summarise a copy of the benchmark")
    p.add_argument("path", help="'sample', the Hub id jnirschl/uBench, or a local folder/file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--revision", default=HUB_REVISION, help="Hub revision (default: the pinned one)")
    p.add_argument("--check-images", action="store_true", help="decode every image and report failures (slow)")
    p.add_argument("-v", "--verbose", action="store_true")
    lb = sub.add_parser("leaderboard", help="aggregate evaluation runs into a CSV and a markdown table")
    lb.add_argument("runs", nargs="+", help="run folders (searched recursively for metrics.json) or files")
    lb.add_argument("--out", type=Path, default=Path("leaderboard"), help="output folder (default: leaderboard/)")
    lb.add_argument("--source", default="captions", choices=["captions", "questions"])
    lb.add_argument("--baseline", default=None, metavar="MODEL",
                    help="paired, image-clustered deltas of every model against this one (p-values, Holm)")
    lb.add_argument("--paper", action="store_true", help="the paper's Table 1 value beside each of ours")
    lb.add_argument("--resamples", type=int, default=9999, help="bootstrap resamples of the pairings (default 9999)")
    lb.add_argument("--confidence", type=float, default=0.95)
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument("--no-plot", action="store_true", help="do not write leaderboard.png")
    lb.add_argument("-v", "--verbose", action="store_true")
    rs = sub.add_parser("rescore", help="recompute every metric of runs from their predictions, checked against "
                        "their records")
    rs.add_argument("runs", nargs="+", help="run folders (searched for metrics.json and forgetting.json)")
    rs.add_argument("--clustered", action="store_true",
                    help="add image-clustered intervals to a record written without them (-> rescored.json)")
    rs.add_argument("--slice", action="append", metavar="NAME=DATASET,...",
                    help="score a slice of your own (perception; repeatable; -> rescored.json)")
    rs.add_argument("-v", "--verbose", action="store_true")
    gr = sub.add_parser("grit", help="score generative box answers (Qwen-VL / PaliGemma) with the GRIT metric")
    gr.add_argument("answers", help="JSONL or CSV: response, width, height, gt_boxes, dataset, class per row")
    gr.add_argument("--format", default="qwen", choices=["qwen", "qwen_lenient", "paligemma"])
    gr.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    gr.add_argument("-v", "--verbose", action="store_true")
    ex = sub.add_parser("export", help="a fine-tune's checkpoint as safetensors, config and a model card")
    ex.add_argument("ckpt", help="a .ckpt written by python src/train.py (task=finetune; LoRA merged)")
    ex.add_argument("--out", type=Path, required=True, help="the folder to write")
    ex.add_argument("--adapter-only", action="store_true", help="a LoRA fine-tune's adapter alone (peft layout)")
    ex.add_argument("-v", "--verbose", action="store_true")
    rc = sub.add_parser("recipes", help="fine-tuning recipes side by side (gain vs forgetting with CIs)")
    rc.add_argument("runs", type=Path, help="a multirun folder of experiment=compare_recipes (or any fits of one base)")
    rc.add_argument("--out", type=Path, default=None, help="output folder (default: <runs>/recipes)")
    rc.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return {"info": _info, "leaderboard": _leaderboard, "rescore": _rescore, "grit": _grit,
                "export": _export, "recipes": _recipes}[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
