"""A hundred ways to get a run wrong, through the real command lines, and what each one gives (issue 13).

Every case is a documented entry point (``src/eval.py``, ``src/train.py``, ``src/forgetting.py``, ``python -m
microbench``) with one bad input or fault, run in a subprocess with a time limit, and classified:

- ``clear error``: exit 2 (exit 1 for a failed ``info --check-images``) and one ``error:`` line on stderr (Hydra's
  own message for an unknown preset counts too), no traceback, no results file written by this run;
- ``counted skip``: exit 0 and the bad part is counted in the run record (``skipped`` / ``data_problems``);
- ``ok``: exit 0 for a case that is not an error (e.g. ``logger=null``, extrapolation asked for);
- ``traceback``: a Python traceback or an unexplained non-zero exit;
- ``hang``: still running after the case's time limit;
- ``silent wrong``: exit 0 where an error or a counted skip was due, or stale numbers presented as this run's.

Usage: .venv/bin/python benchmarks/bench_bad_inputs.py [--only SUBSTRING] [--jobs 2]
(``--only``: re-run the matching cases and merge them into the last full run's results)
Writes benchmarks/results/bad_inputs.json (per case: command, expected, outcome, seconds, error line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PY = sys.executable
FAST_EVAL = ["bootstrap.n_resamples=99", "+trainer.enable_progress_bar=false"]


def fixtures(root: Path) -> dict:
    """Bad copies, files and checkpoints, made once."""
    import numpy as np
    import pyarrow as pa
    import torch

    from conftest import copy_without_column, png_bytes, write_raw_hub_copy
    from microbench.data.loading import SAMPLE_DIR

    f: dict = {}
    tables = []
    for shard in sorted((SAMPLE_DIR / "perception" / "0.1.0").glob("*.arrow")):
        with pa.OSFile(str(shard)) as fh:
            tables.append(pa.ipc.open_stream(fh).read_all())
    table = pa.concat_tables(tables)
    rows = table.to_pylist()
    for col in ("stain", "dataset", "captions"):
        f[f"missing_{col}"] = copy_without_column(col, root / f"missing_{col}")
    (root / "empty_dir").mkdir()
    f["empty_dir"] = root / "empty_dir"
    garbage = root / "garbage_copy" / "perception" / "0.1.0"
    garbage.mkdir(parents=True)
    (garbage / "ubench-test-00000-of-00001.arrow").write_bytes(b"not arrow" * 100)
    f["garbage_copy"] = root / "garbage_copy"
    bad_rows = [dict(r) for r in rows]
    bad_rows[3]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}
    f["corrupt_image_copy"] = write_raw_hub_copy(bad_rows, root / "corrupt_image_copy", n_shards=1)
    one = [dict(r) for r in rows]
    one[0]["image"] = {"bytes": png_bytes(np.zeros((8, 8, 3), dtype="uint8")), "path": None}  # pixels changed
    (root / "a_file").write_text("x")
    f["a_file"] = root / "a_file"
    # checkpoints
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, root / "full.ckpt")
    data = (root / "full.ckpt").read_bytes()
    (root / "garbage.ckpt").write_bytes(b"not a checkpoint\n" * 30)
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "empty.ckpt").write_bytes(b"")
    from microbench.models.backbones import build_backbone

    torch.save(build_backbone("open_clip", "microbench-tiny", pretrained=None).state_dict(), root / "plain_state.pt")
    torch.save(build_backbone("timm", "resnet10t").state_dict(), root / "other_arch.pt")
    torch.save({"epoch": 3}, root / "no_weights.ckpt")
    for name in ("garbage", "truncated", "empty", "full"):
        f[f"{name}_ckpt"] = root / f"{name}.ckpt"
    f["plain_state"], f["other_arch"], f["no_weights"] = root / "plain_state.pt", root / "other_arch.pt", \
        root / "no_weights.ckpt"
    # a real fine-tune checkpoint (2 epochs of the demo)
    out = root / "demo"
    subprocess.run([PY, "src/train.py", "experiment=demo", "trainer.max_epochs=2", "forgetting.enabled=false",
                    "eval_in_domain=false", f"paths.output_dir={out}", f"checkpoint_dir={out / 'ckpt'}",
                    "+trainer.enable_progress_bar=false"], cwd=REPO, check=True, capture_output=True)
    f["demo_last"] = out / "ckpt" / "last.ckpt"
    # cognition files
    cog = root / "cog"
    shutil.copytree(SAMPLE_DIR / "cognition", cog / "cognition")
    qrows = [json.loads(line) for line in (SAMPLE_DIR / "cognition_questions.jsonl").read_text().splitlines()]

    def jsonl(name, rs):
        (cog / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
        f[f"cog_{name.split('.')[0]}"] = cog / name

    jsonl("options_string.jsonl", [dict(r, options="A;B") if i == 0 else r for i, r in enumerate(qrows)])
    jsonl("no_answer.jsonl", [{k: v for k, v in r.items() if k != "answer_idx"} for r in qrows])
    jsonl("missing_field.jsonl", [{k: v for k, v in r.items() if not (i == 1 and k == "question")}
                                  for i, r in enumerate(qrows)])
    jsonl("dup_ids.jsonl", [dict(r, id="same") for r in qrows])
    jsonl("bad_idx.jsonl", [dict(r, answer_idx="B") for r in qrows])
    jsonl("gold_out_of_range.jsonl", [dict(r, answer_idx=9) for r in qrows])
    (cog / "truncated.jsonl").write_text((SAMPLE_DIR / "cognition_questions.jsonl").read_text()[:-40])
    f["cog_truncated"] = cog / "truncated.jsonl"
    (cog / "empty.jsonl").write_text("")
    f["cog_empty"] = cog / "empty.jsonl"
    corrupt = root / "cog_corrupt"
    shutil.copytree(SAMPLE_DIR / "cognition", corrupt / "cognition")
    (corrupt / "cognition" / "test" / "opencell_238.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    f["cog_corrupt_image"] = corrupt
    noans = root / "cog_noanswers"
    shutil.copytree(SAMPLE_DIR / "cognition", noans / "cognition")
    for j in (noans / "cognition" / "test").glob("*.json"):
        rec = json.loads(j.read_text())
        for q in rec["custom_metadata"]["questions"].values():
            q.pop("answer")
        j.write_text(json.dumps(rec))
    f["cog_no_answers"] = noans
    # a folder holding an earlier run's results
    old = root / "old_run"
    subprocess.run([PY, "src/eval.py", f"paths.output_dir={old}", "data.datasets=[kather_et_al_2016]", *FAST_EVAL],
                   cwd=REPO, check=True, capture_output=True)
    f["old_run"] = old
    (root / "leftovers").mkdir()
    (root / "leftovers" / ".predictions.parquet.x1y2.tmp").write_bytes(b"partial")
    f["leftovers"] = root / "leftovers"
    (root / "bad_answers.jsonl").write_text(json.dumps({"response": "x"}) + "\n")
    f["bad_answers"] = root / "bad_answers.jsonl"
    return f


def cases(f: dict, server: dict) -> list[dict]:
    """(name, argv, expected, check) — expected: error | skip | ok."""
    E, T, F_ = "src/eval.py", "src/train.py", "src/forgetting.py"
    demo = ["experiment=demo", "trainer.max_epochs=1", "eval_in_domain=false", "study.alphas=[0,1]",
            "bootstrap.n_resamples=99", "+trainer.enable_progress_bar=false"]
    oa = ["model=openai_compatible", "model.model=m", "model.timeout_s=1", "model.backoff_s=0.05"]
    c = []

    def add(name, script, args, expected="error", check=None, timeout=240):
        c.append({"name": name, "script": script, "args": args, "expected": expected, "check": check,
                  "timeout": timeout})

    for v in ("0", "-4", "abc", "1.5", "null"):
        add(f"eval data.batch_size={v}", E, [f"data.batch_size={v}"])
    add("eval data.num_workers=-1", E, ["data.num_workers=-1"])
    add("eval output_dir is a file", E, [], check="out=file")
    add("eval output_dir not writable", E, [], check="out=/proc")
    add("eval data.path typo", E, ["data.path=/data/ubnech"])
    add("eval data.path empty folder", E, [f"data.path={f['empty_dir']}"])
    add("eval data.path garbage shard", E, [f"data.path={f['garbage_copy']}"])
    add("eval copy missing stain (info lists it)", E, [f"data.path={f['missing_stain']}"])
    add("eval copy missing dataset (info lists it)", E, [f"data.path={f['missing_dataset']}"])
    add("eval copy missing captions (info lists it)", E, [f"data.path={f['missing_captions']}"])
    add("eval data.path a file", E, [f"data.path={f['a_file']}"])
    add("eval corrupt image in the copy", E, [f"data.path={f['corrupt_image_copy']}", *FAST_EVAL], "skip",
        check="skipped.failed_images")
    add("eval data.split=bogus", E, ["data.split=bogus"])
    add("eval empty test split (fresh folder)", E, ["data.split_fractions=[0.9,0.1,0.0]", "data.split=test"])
    add("eval empty test split into an old run's folder", E, ["data.split_fractions=[0.9,0.1,0.0]",
                                                             "data.split=test"], check="old_run")
    add("eval split fractions not summing to 1", E, ["data.split_fractions=[0.5,0.5,0.5]"])
    add("eval unknown dataset filter", E, ["data.datasets=[nope]"])
    add("eval sources=[caption]", E, ["sources=[caption]"])
    add("eval sources=captions (not a list)", E, ["sources=captions"])
    add("eval unknown preset", E, ["model=nope"])
    add("eval unknown open_clip name", E, ["model.name=ViT-Nope"])
    add("eval image-only tower", E, ["model=timm", "model.name=resnet10t"])
    add("eval unknown task", E, ["task=nonsense"])
    add("eval logger=null", E, ["logger=null", "data.datasets=[kather_et_al_2016]", *FAST_EVAL], "ok")
    add("eval logger=wandb without login", E, ["logger=wandb"], check="no_wandb")
    add("eval model=random", E, ["model=random", *FAST_EVAL], "ok")
    add("eval leftovers of a killed run", E, ["data.datasets=[kather_et_al_2016]", *FAST_EVAL], "ok",
        check="leftovers")
    add("eval Hub preset, Hub unreachable", E, ["model=biomedclip"], check="hub_down", timeout=90)
    add("eval openai max_concurrency=0", E, [*oa, "model.max_concurrency=0"])
    add("eval openai max_retries=-1", E, [*oa, "model.max_retries=-1"])
    add("eval openai unknown option", E, [*oa, "+model.temprature=0"])
    add("eval openai server not listening", E, [*oa, "model.base_url=http://127.0.0.1:9/v1"], timeout=90)
    add("eval openai server 500 on everything", E, [*oa, f"model.base_url={server['500']}"], timeout=120)
    add("eval openai server 200 non-JSON", E, [*oa, f"model.base_url={server['non_json']}"], timeout=120)
    add("eval openai server hangs", E, [*oa, f"model.base_url={server['hang']}"], timeout=120)
    add("eval openai server 404 (wrong model)", E, [*oa, f"model.base_url={server['404']}"], timeout=120)
    add("eval localization without checkpoint", E, ["task=localization"])
    for k in ("garbage", "truncated", "empty"):
        add(f"eval localization {k} checkpoint", E, ["task=localization", f"checkpoint={f[f'{k}_ckpt']}"])
    add("eval localization nonexistent checkpoint", E, ["task=localization", "checkpoint=/no/such.ckpt"])
    add("eval localization fine-tune checkpoint", E, ["task=localization", f"checkpoint={f['demo_last']}"])
    add("eval localization state-dict checkpoint", E, ["task=localization", f"checkpoint={f['plain_state']}"])
    add("cognition path missing", E, ["task=cognition", "cognition.path=/no/such"])
    add("cognition unknown format", E, ["task=cognition", "cognition.format=xml"])
    for k in ("options_string", "no_answer", "truncated", "empty", "bad_idx"):
        add(f"cognition {k}", E, ["task=cognition", f"cognition.path={f[f'cog_{k}']}"])
    add("cognition all answers out of range", E, ["task=cognition", f"cognition.path={f['cog_gold_out_of_range']}"])
    add("cognition no answers (official layout)", E, ["task=cognition", f"cognition.path={f['cog_no_answers']}"])
    add("cognition a row without its question", E, ["task=cognition", f"cognition.path={f['cog_missing_field']}",
                                                    *FAST_EVAL], "skip", check="skipped.invalid_items")
    add("cognition corrupt image", E, ["task=cognition", f"cognition.path={f['cog_corrupt_image']}", *FAST_EVAL],
        "skip", check="skipped.items_of_failed_images")
    add("cognition duplicate ids", E, ["task=cognition", f"cognition.path={f['cog_dup_ids']}", *FAST_EVAL], "skip",
        check="data_problems.duplicate_ids")
    add("cognition batch_size=0", E, ["task=cognition", "data.batch_size=0"])
    # training
    for v in ("0", "-4", "abc"):
        add(f"train data.batch_size={v}", T, [*demo, f"data.batch_size={v}"])
    for k in ("garbage", "truncated", "empty"):
        add(f"train ckpt_path {k}", T, [*demo, f"ckpt_path={f[f'{k}_ckpt']}"])
    add("train ckpt_path nonexistent", T, [*demo, "ckpt_path=/no/such.ckpt"])
    add("train ckpt_path plain state dict", T, [*demo, f"ckpt_path={f['plain_state']}"])
    add("train detector from a fine-tune checkpoint", T, ["experiment=detect_nuclei", f"ckpt_path={f['demo_last']}"])
    add("train zero-length val loader", T, [*demo, "data.split_fractions=[0.8,0.0,0.2]"])
    add("train empty train split", T, [*demo, "data.split_fractions=[0.0,0.5,0.5]"])
    add("train alphas=[a,b]", T, [*demo, "study.alphas=[a,b]"])
    add("train alphas=[]", T, [*demo, "study.alphas=[]"])
    add("train alpha 1.5 without extrapolate", T, [*demo, "study.alphas=[0,1.5]"])
    add("train alpha 1.5 with extrapolate", T, [*demo, "study.alphas=[0,1.5]", "forgetting.extrapolate=true"],
        "ok", check="extrapolation")
    add("train unknown task", T, [*demo, "task=nonsense"])
    add("train logger=null", T, [*demo, "logger=null"], "ok")
    add("train debug=fast_dev_run", T, ["experiment=demo", "debug=fast_dev_run"], "ok")
    add("train logger=wandb without login", T, [*demo, "logger=wandb"], check="no_wandb")
    add("train output_dir is a file", T, demo, check="out=file")
    add("train data.path typo", T, [*demo, "data.path=/data/ubnech"])
    add("train resume a finished run (base recorded)", T, [*demo, f"ckpt_path={f['demo_last']}"], "error")
    add("train experiment=demo trainer=ddp_sim", T, [*demo, "trainer=ddp_sim"], "ok", timeout=300)
    # forgetting
    add("forgetting without finetuned", F_, [])
    for k in ("garbage", "truncated", "empty"):
        add(f"forgetting finetuned {k}", F_, [f"finetuned={f[f'{k}_ckpt']}"])
    add("forgetting finetuned nonexistent", F_, ["finetuned=/no/such.ckpt"])
    add("forgetting finetuned other architecture", F_, [f"finetuned={f['other_arch']}"])
    add("forgetting finetuned without weights", F_, [f"finetuned={f['no_weights']}"])
    add("forgetting alphas=[a,b]", F_, [f"finetuned={f['demo_last']}", "study.alphas=[a,b]"])
    add("forgetting alphas=[]", F_, [f"finetuned={f['demo_last']}", "study.alphas=[]"])
    add("forgetting alphas=[2]", F_, [f"finetuned={f['demo_last']}", "study.alphas=[2]"])
    add("forgetting base=nope", F_, [f"finetuned={f['demo_last']}", "base=nope"])
    add("forgetting base=tiny (as documented)", F_, ["base=tiny", f"finetuned={f['demo_last']}", "study.alphas=[0,1]",
                                                     "bootstrap.n_resamples=99"], "ok")
    add("forgetting base_checkpoint garbage", F_, [f"finetuned={f['demo_last']}",
                                                   f"base_checkpoint={f['garbage_ckpt']}"])
    add("forgetting data.path typo", F_, [f"finetuned={f['demo_last']}", "data.path=/data/ubnech"])
    add("forgetting output_dir is a file", F_, [f"finetuned={f['demo_last']}"], check="out=file")
    # python -m microbench
    M = "-m microbench"
    add("info nonexistent", M, ["info", "/no/such"])
    add("info copy missing stain", M, ["info", str(f["missing_stain"])])
    add("info copy missing dataset", M, ["info", str(f["missing_dataset"])])
    add("info --check-images on a corrupt image", M, ["info", str(f["corrupt_image_copy"]), "--check-images"],
        check="exit1")
    add("leaderboard of an empty folder", M, ["leaderboard", str(f["empty_dir"]), "--out", "/tmp/mb-lb-empty"])
    add("grit answers lacking columns", M, ["grit", str(f["bad_answers"])])
    add("grit nonexistent answers", M, ["grit", "/no/such.jsonl"])
    return c


def run_case(case: dict, f: dict, work: Path) -> dict:
    out = work / re.sub(r"[^A-Za-z0-9_.-]", "_", case["name"])[:80]
    args = list(case["args"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    check = case["check"] or ""
    if check == "out=file":
        out = f["a_file"]
    elif check == "out=/proc":
        out = Path("/proc/microbench-cannot-write")
    elif check == "old_run":
        out = f["old_run"]
    elif check == "leftovers":
        out = f["leftovers"]
    elif check == "no_wandb":
        for k in ("WANDB_MODE", "WANDB_API_KEY"):
            env.pop(k, None)
        env["NETRC"] = str(work / "no-netrc")
    elif check == "hub_down":
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(k, None)
        env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(work / "hf"))
    if case["script"].startswith("-m"):
        argv = [PY, "-m", "microbench", *args]
    else:
        argv = [PY, case["script"], *args, f"paths.output_dir={out}"]
        if case["script"] == "src/train.py":
            argv += [f"checkpoint_dir={work / 'ckpt' / out.name}", f"study.result_cache={work / 'cache'}",
                     f"probe.cache_dir={work / 'cache'}"]
        if case["script"] == "src/forgetting.py":
            argv += [f"study.result_cache={work / 'cache'}"]
    before = (out / "metrics.json").read_bytes() if (out / "metrics.json").is_file() else None
    t = time.perf_counter()
    try:
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=case["timeout"], env=env)
        code, err, stdout = res.returncode, res.stderr, res.stdout
    except subprocess.TimeoutExpired:
        code, err, stdout = None, "", ""
    seconds = round(time.perf_counter() - t, 1)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    hydra_error = code == 1 and ("Could not find" in err or "Could not override" in err) and "Traceback" not in err
    if code is None:
        outcome = "hang"
    elif "Traceback" in err:
        outcome = "traceback"
    elif (code == 2 and len(errors) == 1) or hydra_error or (check == "exit1" and code == 1):
        outcome = "clear error"
    elif code == 0:
        rec = {}
        for name in ("metrics.json", "forgetting/forgetting.json", "forgetting.json"):
            if (out / name).is_file() and not out.is_file():
                rec = json.loads((out / name).read_text())
        outcome = "ok"
        if case["expected"] == "skip":
            node = rec
            for part in check.split("."):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            outcome = "counted skip" if node else "silent wrong"
        elif case["expected"] == "error":
            outcome = "silent wrong"
        if check == "leftovers" and list(out.glob(".*.tmp")):
            outcome = "silent wrong"
        if check == "extrapolation":
            md = (out / "forgetting" / "forgetting.md").read_text() if (out / "forgetting").is_dir() else ""
            outcome = "ok" if "(extrapolation)" in md else "silent wrong"
    else:
        outcome = "traceback"  # a non-zero exit without one clear line
    if check == "old_run" and before is not None and (out / "metrics.json").read_bytes() != before:
        outcome = "silent wrong"
    if check == "old_run" and "coarse" in stdout:
        outcome = "silent wrong"  # an earlier run's headline printed as this run's
    return {"name": case["name"], "command": " ".join(argv[1:]), "expected": case["expected"], "outcome": outcome,
            "exit": code, "seconds": seconds, "error": errors[0] if errors else (err.strip().splitlines() or [""])[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bad_inputs.json")
    args = ap.parse_args()
    from microbench.generative.loopback import ScriptedChatServer
    from microbench.results.io import write_json

    work = Path(tempfile.mkdtemp(prefix="mb-bad-inputs-"))
    t0 = time.perf_counter()
    f = fixtures(work / "fixtures")
    servers = {"500": ScriptedChatServer(fail=lambda n, b: 500), "non_json": ScriptedChatServer(fail=lambda n, b: "non_json"),
               "hang": ScriptedChatServer(fail=lambda n, b: "hang", hang_s=30),
               "404": ScriptedChatServer(fail=lambda n, b: 404)}
    for s in servers.values():
        s.__enter__()
    urls = {k: s.base_url for k, s in servers.items()}
    todo = [c for c in cases(f, urls) if args.only in c["name"]]
    lock = threading.Lock()
    results = []

    def one(case):
        r = run_case(case, f, work)
        with lock:
            results.append(r)
            print(f"[{len(results):3d}/{len(todo)}] {r['outcome']:13s} {r['seconds']:6.1f}s  {r['name']}  "
                  f"{r['error'][:110]}", flush=True)
        return r

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    for s in servers.values():
        s.__exit__()
    order = {c["name"]: i for i, c in enumerate(todo)}
    results.sort(key=lambda r: order[r["name"]])
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = {"cases": len(results), "counts": counts, "seconds": round(time.perf_counter() - t0, 1),
               "cases_by_outcome": {k: [r["name"] for r in results if r["outcome"] == k] for k in counts}}
    if args.only and args.out.is_file():  # re-run some cases: merge them into the last full run's figures
        old = json.loads(args.out.read_text())
        fresh = {r["name"]: r for r in results}
        results = [fresh.get(r["name"], r) for r in old["results"]]
        counts = {}
        for r in results:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        summary = {"cases": len(results), "counts": counts, "seconds": old["seconds"], "rerun": sorted(fresh),
                   "cases_by_outcome": {k: [r["name"] for r in results if r["outcome"] == k] for k in counts}}
    print(json.dumps({k: summary[k] for k in ("cases", "counts", "seconds")}, indent=1))
    write_json(args.out, {**summary, "results": results})
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
