"""No silent wrong number, no traceback for a user's mistake, no hang.

Every case runs the entry point's code path (compose the config, run the task inside ``exit_on_user_error``, as
``src/eval.py`` / ``src/train.py`` / ``src/forgetting.py`` do) and checks the exit code, that stderr is one
``error:`` line saying what is wrong, and that no results file of this run was written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import (
    REPO,
    build_model,
    compose_config,
    one_line_error,
    png_bytes,
    run_cli,
    run_entry,
    write_raw_hub_copy,
)

FAST_EVAL = ["bootstrap.n_resamples=99", "data.datasets=[kather_et_al_2016]", "+trainer.enable_progress_bar=false"]


# --- no silent wrong result ----------------------------------------------------------------------------------------

def test_an_empty_split_is_an_error_and_never_shows_an_earlier_runs_numbers(tmp_path, capsys):
    """An empty test split into the folder of an earlier run printed that run's headline (exit 0)."""
    out = tmp_path / "run"
    code, _, (record, _) = run_entry("eval", [f"paths.output_dir={out}", *FAST_EVAL], capsys)
    assert code == 0 and record["run_id"]
    before = (out / "metrics.json").read_bytes()
    empty = [f"paths.output_dir={out}", *FAST_EVAL, "data.split_fractions=[0.9,0.1,0.0]", "data.split=test"]
    one_line_error("eval", empty, capsys, "the test split", "is empty", "split_fractions gives it 0")
    assert (out / "metrics.json").read_bytes() == before  # untouched, and not presented as this run's
    fresh = [f"paths.output_dir={tmp_path / 'fresh'}", *empty[1:]]
    one_line_error("eval", fresh, capsys, "is empty")  # was a FileNotFoundError traceback
    assert not (tmp_path / "fresh" / "metrics.json").exists()


def test_a_record_left_by_another_run_is_never_read_back_as_this_runs(tmp_path):
    from microbench.errors import UserError
    from microbench.results.io import this_runs_record, write_json

    write_json(tmp_path / "metrics.json", {"run_id": "an-earlier-run", "headline": {"captions": {}}})
    with pytest.raises(UserError, match="this run wrote no results"):
        this_runs_record(tmp_path / "metrics.json", "this-run")
    assert this_runs_record(tmp_path / "metrics.json", "an-earlier-run")["run_id"] == "an-earlier-run"


def test_the_leaderboard_keeps_a_subset_run_beside_the_full_run(tmp_path, capsys):
    """A later subset run of the same model replaced its full-benchmark row (only a WARNING)."""
    from microbench.results.leaderboard import build_leaderboard

    code, _, (full, _) = run_entry("eval", [f"paths.output_dir={tmp_path / 'a_full'}", "bootstrap.n_resamples=99",
                                      "+trainer.enable_progress_bar=false"], capsys)
    code2, _, (sub, _) = run_entry("eval", [f"paths.output_dir={tmp_path / 'b_subset'}", *FAST_EVAL], capsys)
    assert code == code2 == 0
    frame = build_leaderboard([tmp_path / "a_full", tmp_path / "b_subset"], tmp_path / "lb")
    assert len(frame) == 2 and frame["subset"].tolist() == [False, True]
    full_row, sub_row = frame.iloc[0], frame.iloc[1]
    assert full_row["coarse"] == pytest.approx(full["metrics"]["captions/official/coarse"]["value"])
    assert sub_row["coarse"] == pytest.approx(sub["metrics"]["captions/official/coarse"]["value"])
    assert full_row["scope"] == "full" and sub_row["scope"] == "subset: dataset=kather_et_al_2016"
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "| microbench-tiny (subset: dataset=kather_et_al_2016) |" in md and "| microbench-tiny |" in md
    # the same evaluation twice is one row
    run_entry("eval", [f"paths.output_dir={tmp_path / 'c_full_again'}", "bootstrap.n_resamples=99",
                 "+trainer.enable_progress_bar=false"], capsys)
    again = build_leaderboard([tmp_path], tmp_path / "lb2")
    assert len(again) == 2


def _demo(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["experiment=demo", "trainer.max_epochs=2", "eval_in_domain=false", "study.alphas=[0,0.5,1]",
            "bootstrap.n_resamples=99", f"study.result_cache={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / name}", f"checkpoint_dir={tmp_path / name / 'ckpt'}",
            "+trainer.enable_progress_bar=false", *extra]


@pytest.mark.slow
def test_a_resumed_fine_tune_studies_forgetting_against_the_true_base(tmp_path, capsys):
    """Resuming a finished demo run wrote a report with base = fine-tuned (every Δ +0.00)."""
    code, _, (metrics, _) = run_entry("train", _demo(tmp_path, "first"), capsys)
    assert code == 0
    first = json.loads((tmp_path / "first" / "forgetting" / "forgetting.json").read_text())
    last = metrics["last_checkpoint"]
    code, _, _ = run_entry("train", _demo(tmp_path, "resumed", f"ckpt_path={last}"), capsys)
    assert code == 0
    resumed = json.loads((tmp_path / "resumed" / "forgetting" / "forgetting.json").read_text())
    assert resumed["base"]["fingerprint"] == first["base"]["fingerprint"]
    ft = resumed["splits"]["test"]["models"]["finetuned"]
    assert ft["all/all"]["acc"]["value"] == first["splits"]["test"]["models"]["finetuned"]["all/all"]["acc"]["value"]
    assert any(abs(v["delta"]["value"]) > 0 for v in ft.values() if isinstance(v, dict) and "delta" in v)

    # a checkpoint that does not record its base (written before the study was on): refused, no report of zeros
    blob = torch.load(last, weights_only=True)
    blob["callbacks"] = {k: v for k, v in blob.get("callbacks", {}).items() if "Forgetting" not in k}
    torch.save(blob, tmp_path / "no_base.ckpt")
    one_line_error("train", _demo(tmp_path, "refused", f"ckpt_path={tmp_path / 'no_base.ckpt'}"), capsys,
                   "does not record its base weights", "src/forgetting.py base=")
    assert not (tmp_path / "refused" / "forgetting" / "forgetting.json").exists()


def _cognition_copy(tmp_path: Path) -> Path:
    from microbench.data.loading import SAMPLE_DIR

    root = tmp_path / "cog"
    shutil.copytree(SAMPLE_DIR / "cognition", root / "cognition")
    shutil.copy(SAMPLE_DIR / "cognition_questions.jsonl", root / "questions.jsonl")
    return root


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cognition_options_given_as_a_string_are_refused(tmp_path, capsys):
    """Options "A;B" were split into the characters A, ;, B and scored."""
    root = _cognition_copy(tmp_path)
    rows = _jsonl(root / "questions.jsonl")
    rows[0]["options"] = "lymphocyte;basophil"
    f = _write_jsonl(root / "questions.jsonl", rows)
    one_line_error("eval", ["task=cognition", f"cognition.path={f}", f"paths.output_dir={tmp_path / 'o'}"], capsys,
                   "row 1: options must be a list of option texts, got str", '["A", "B"]')
    official = json.loads((root / "cognition" / "test" / "opencell_238.json").read_text())
    next(iter(official["custom_metadata"]["questions"].values()))["options"] = "a;b"
    (root / "cognition" / "test" / "opencell_238.json").write_text(json.dumps(official))
    one_line_error("eval", ["task=cognition", f"cognition.path={root}", f"paths.output_dir={tmp_path / 'o'}"],
                   capsys, "opencell_238.json questions.cognition_0: options must be a list")


def test_a_corrupt_cognition_image_is_a_counted_reported_skip(tmp_path, capsys):
    """A corrupt image dropped its questions silently (n 11 of 12, skipped empty, "12 questions")."""
    root = _cognition_copy(tmp_path)
    (root / "cognition" / "test" / "opencell_238.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    code, _, (record, _) = run_entry("eval", ["task=cognition", f"cognition.path={root}", "bootstrap.n_resamples=99",
                                        f"paths.output_dir={tmp_path / 'o'}", "+trainer.enable_progress_bar=false"],
                               capsys)
    assert code == 0
    lost = 12 - record["headline"]["cognition"]["n"]
    assert lost == 2 and record["skipped"]["items_of_failed_images"] == 2  # opencell_238 has two questions
    assert len(record["skipped"]["failed_images"]) == 1 and "opencell_238" in record["skipped"]["failed_images"][0]
    md = (tmp_path / "o" / "results.md").read_text()
    assert "12 questions, 10 scored" in md and "questions whose image could not be read: 2" in md


# --- a user's mistake is one line ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-4", "abc"])
def test_an_impossible_batch_size_is_one_line(value, tmp_path, capsys):
    one_line_error("eval", [f"data.batch_size={value}", f"paths.output_dir={tmp_path}"], capsys,
                   "data.batch_size must be an integer >= 1", repr(int(value)) if value != "abc" else "'abc'")
    one_line_error("train", ["experiment=demo", f"data.batch_size={value}", f"paths.output_dir={tmp_path}"], capsys,
                   "data.batch_size must be an integer >= 1")


def never_built(monkeypatch) -> list:
    """Replace the model builders (``model=tiny``'s and the demo's generalist) by ones that only count calls."""
    import microbench.models.backbones as backbones
    import microbench.models.generalist as generalist

    built = []

    def build(*a, **k):
        built.append(1)

    build.family = "contrastive"  # what the registry reads from model._target_ without building
    monkeypatch.setattr(backbones, "build_backbone", build)
    monkeypatch.setattr(generalist, "build_generalist", build)
    return built


def test_an_output_dir_that_is_a_file_or_unwritable_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    built = never_built(monkeypatch)
    (tmp_path / "file").write_text("x")
    one_line_error("eval", [f"paths.output_dir={tmp_path / 'file'}"], capsys, "is a file, not a folder")
    one_line_error("train", ["experiment=demo", f"paths.output_dir={tmp_path / 'file' / 'sub'}"], capsys,
                   "cannot write to paths.output_dir")
    one_line_error("eval", ["paths.output_dir=/proc/microbench-cannot-write-here"], capsys,
                   "cannot write to paths.output_dir=/proc/microbench-cannot-write-here")
    assert not built  # checked before the model is built


def test_a_data_path_typo_fails_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    built = never_built(monkeypatch)
    for name, extra in (("eval", []), ("train", ["experiment=demo"]),
                        ("forgetting", ["finetuned=x.ckpt"])):
        one_line_error(name, [*extra, "data.path=/data/ubnech", f"paths.output_dir={tmp_path}"], capsys,
                       "data path '/data/ubnech' does not exist")
    assert not built


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    good = {"state_dict": {"w": torch.zeros(3)}, "epoch": 1}
    torch.save(good, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    files = {"garbage": b"this is not a checkpoint\n" * 20, "truncated": data[: len(data) // 2], "empty": b""}
    out = {}
    for name, blob in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(blob)
        out[name] = tmp_path / f"{name}.ckpt"
    out["nonexistent"] = tmp_path / "nope.ckpt"
    return out


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "nonexistent"])
def test_a_broken_checkpoint_is_one_line_for_every_entry_point(kind, tmp_path, capsys):
    path = _bad_checkpoints(tmp_path)[kind]
    why = {"garbage": "is not a readable PyTorch checkpoint", "truncated": "is not a readable PyTorch checkpoint",
           "empty": "is empty (0 bytes", "nonexistent": "does not exist"}[kind]
    out = f"paths.output_dir={tmp_path / 'o'}"
    one_line_error("forgetting", [f"finetuned={path}", out], capsys, f"finetuned={path} {why}")
    one_line_error("eval", ["task=localization", f"checkpoint={path}", out], capsys, f"checkpoint={path} {why}")
    one_line_error("train", ["experiment=demo", f"ckpt_path={path}", out], capsys, f"ckpt_path={path} {why}")


def test_a_checkpoint_of_another_kind_is_one_line(tmp_path, capsys):

    torch.save(build_model("tiny").state_dict(), tmp_path / "plain.pt")  # a state dict, not a fit
    out = f"paths.output_dir={tmp_path / 'o'}"
    one_line_error("train", ["experiment=demo", f"ckpt_path={tmp_path / 'plain.pt'}", out], capsys,
                   "is not a Lightning training checkpoint of src/train.py")
    fake_ft = {"state_dict": {"backbone.w": torch.zeros(1)}, "epoch": 0, "loops": {}, "microbench": {}}
    torch.save(fake_ft, tmp_path / "ft.ckpt")
    one_line_error("eval", ["task=localization", f"checkpoint={tmp_path / 'ft.ckpt'}", out], capsys,
                   "is a fine-tuning checkpoint, not a localization head")
    one_line_error("train", ["experiment=detect_nuclei", f"ckpt_path={tmp_path / 'ft.ckpt'}", out], capsys,
                   "is a finetune checkpoint, but this run is a localization fit")
    torch.save({"epoch": 3}, tmp_path / "no_weights.ckpt")
    one_line_error("forgetting", [f"finetuned={tmp_path / 'no_weights.ckpt'}", out], capsys, "holds no weights")


def test_cognition_files_with_a_missing_field_a_truncated_line_or_no_answer(tmp_path, capsys):
    root = _cognition_copy(tmp_path)
    rows = _jsonl(root / "questions.jsonl")
    out = f"paths.output_dir={tmp_path / 'o'}"
    # a missing field in one row: that question is a counted invalid item, the rest are scored
    _write_jsonl(root / "missing.jsonl", [{k: v for k, v in r.items() if not (i == 2 and k == "options")}
                                          for i, r in enumerate(rows)])
    code, _, (record, _) = run_entry("eval", ["task=cognition", f"cognition.path={root / 'missing.jsonl'}", out,
                                        "bootstrap.n_resamples=99", "+trainer.enable_progress_bar=false"], capsys)
    assert code == 0 and record["skipped"]["invalid_items"] == 1 and record["headline"]["cognition"]["n"] == 11
    assert record["skipped"]["problems"][0]["problem"] == "fewer than two options"
    # a truncated last line
    text = (root / "questions.jsonl").read_text()
    (root / "truncated.jsonl").write_text(text[:-40])
    one_line_error("eval", ["task=cognition", f"cognition.path={root / 'truncated.jsonl'}", out], capsys,
                   "truncated.jsonl line 12 is not valid JSON", "fix or remove that line")
    # no answer at all: the column is missing, or every question lacks one (official layout)
    _write_jsonl(root / "no_answer.jsonl", [{k: v for k, v in r.items() if k != "answer_idx"} for r in rows])
    one_line_error("eval", ["task=cognition", f"cognition.path={root / 'no_answer.jsonl'}", out], capsys,
                   "lacks columns ['answer_idx or answer']")
    for f in (root / "cognition" / "test").glob("*.json"):
        rec = json.loads(f.read_text())
        for q in rec["custom_metadata"]["questions"].values():
            q.pop("answer")
        f.write_text(json.dumps(rec))
    one_line_error("eval", ["task=cognition", f"cognition.path={root}", out], capsys,
                   "none of the 12 questions", "can be scored", "is not one of the options")
    _write_jsonl(root / "bad_idx.jsonl", [dict(r, answer_idx="B") for r in rows])
    one_line_error("eval", ["task=cognition", f"cognition.path={root / 'bad_idx.jsonl'}", out], capsys,
                   "answer_idx must be a 0-based option index, got 'B'")


@pytest.mark.slow
def test_a_zero_length_loader_is_one_line(tmp_path, capsys):
    one_line_error("train", ["experiment=demo", "data.split_fractions=[0.8,0.0,0.2]", f"paths.output_dir={tmp_path}",
                             f"checkpoint_dir={tmp_path / 'ckpt'}"], capsys,
                   "the val split", "is empty (data.split_fractions gives it 0)")


def test_a_hub_layout_copy_missing_a_required_column_its_info_lists(tmp_path, capsys):
    """`dataset_info.json` declared `stain`, the shards lacked it: the cast invented a null column and
    resolve_dataset_name raised AttributeError (also in `microbench info`); a missing `dataset` went through."""
    from conftest import copy_without_column
    from microbench.cli import main

    for col in ("stain", "dataset"):
        copy_without_column(col, tmp_path / col)
        assert main(["info", str(tmp_path / col)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and f"lacks required column(s) {col}" in err
        one_line_error("eval", [f"data.path={tmp_path / col}", f"paths.output_dir={tmp_path / 'o'}"], capsys,
                       f"lacks required column(s) {col} that its dataset_info.json lists")


@pytest.mark.parametrize(("overrides", "expect"), [
    (["sources=[caption]"], "sources must be a list, each one of captions, questions, got ['caption']"),
    (["sources=captions"], "sources must be a list"),
    (["model=openai_compatible", "model.max_concurrency=0"], "model.max_concurrency must be an integer >= 1, got 0"),
    (["task=nonsense"], "task must be one of perception, cognition, localization"),
])
def test_eval_option_mistakes_are_one_line(overrides, expect, tmp_path, capsys):
    one_line_error("eval", [*overrides, f"paths.output_dir={tmp_path}"], capsys, expect)


@pytest.mark.parametrize(("alphas", "expect"), [
    ("[a,b]", "alphas must be numbers (interpolation weights), got 'a'"),
    ("[]", "study.alphas=[] leaves nothing to interpolate"),
    ("[0,0.5,1.5]", "alphas [1.5] lie outside [0, 1]"),
    ("[-0.2,1]", "extrapolate=true"),
])
def test_alphas_are_checked_before_any_work(alphas, expect, tmp_path, capsys):
    one_line_error("forgetting", ["finetuned=whatever.ckpt", f"study.alphas={alphas}", f"paths.output_dir={tmp_path}"],
                   capsys, expect)
    one_line_error("train", ["experiment=demo", f"study.alphas={alphas}", f"paths.output_dir={tmp_path}"],
                   capsys, expect)


def test_wandb_without_a_login_or_an_offline_mode_says_how(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    msg = one_line_error("eval", ["logger=wandb", f"paths.output_dir={tmp_path}"], capsys, "logger=wandb needs a W&B")
    assert "wandb login" in msg and "WANDB_MODE=offline" in msg
    one_line_error("train", ["experiment=demo", "logger=wandb", f"paths.output_dir={tmp_path}"], capsys,
                   "wandb login")
    monkeypatch.setenv("WANDB_MODE", "offline")
    from microbench.tasks.trainer import check_loggers

    check_loggers(compose_config("eval", ["logger=wandb", f"paths.output_dir={tmp_path}"]))  # offline: fine


# --- no hang: Hub presets with the Hub unreachable -----------------------------------------------------------------

@pytest.mark.slow
def test_a_hub_preset_with_the_hub_unreachable_fails_within_seconds(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                              "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    res = run_cli(["src/eval.py", "model=biomedclip", f"paths.output_dir={tmp_path / 'o'}",
                          "logger=null"], cwd=REPO, env=env, timeout=120)
    took = time.perf_counter() - t
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert "unreachable" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert took < 25, took  # was 27-75 s of retries


# --- what was accepted and should not be ---------------------------------------------------------------------------

def test_extrapolation_is_labelled_in_the_report(tmp_path):
    from microbench.studies.forgetting import study_alphas
    from microbench.studies.report import report_markdown

    assert study_alphas([0, 1.5], extrapolate=True) == [0.0, 1.5]
    model = {"target/fine": {"acc": {"value": 0.5}, "delta": {"value": 0.0, "low": 0, "high": 0}}}
    models = {"base": model, "finetuned": model, "alpha=0.00": model, "alpha=1.00": model, "alpha=1.50": model}
    study = {"base": {"name": "b", "fingerprint": "f"}, "finetuned": {"path": "p"}, "towers": "both",
             "target_datasets": ["d"], "alphas": [0.0, 1.0, 1.5], "selection": {"alpha": 1.0, "rule": "r"},
             "splits": {"test": {"models": models}}}
    md = report_markdown(study)
    assert "| alpha=1.50 (extrapolation) |" in md and "**extrapolate** beyond the base" in md
    assert "alpha=1.00 (extrapolation)" not in md


def test_duplicate_cognition_ids_are_reported(tmp_path, capsys):
    root = _cognition_copy(tmp_path)
    rows = _jsonl(root / "questions.jsonl")
    f = _write_jsonl(root / "dups.jsonl", [dict(r, id="same" if i < 3 else r["id"]) for i, r in enumerate(rows)])
    code, _, (record, _) = run_entry("eval", ["task=cognition", f"cognition.path={f}", "bootstrap.n_resamples=99",
                                        f"paths.output_dir={tmp_path / 'o'}", "+trainer.enable_progress_bar=false"],
                               capsys)
    assert code == 0 and record["data_problems"]["duplicate_ids"] == {"same": 3}
    assert record["headline"]["cognition"]["n"] == 12  # each still scored on its own row
    assert "question ids used more than once" in (tmp_path / "o" / "results.md").read_text()


def test_temporaries_a_killed_run_left_are_cleaned_on_the_next_run(tmp_path, capsys):
    out = tmp_path / "o"
    (out / "predictions").mkdir(parents=True)
    for leftover in (out / ".predictions.parquet.a1b2c3.tmp", out / ".metrics.json.zz.tmp",
                     out / "predictions" / ".alpha=0.50.parquet.q.tmp"):
        leftover.write_bytes(b"partial")
    code, _, _ = run_entry("eval", [f"paths.output_dir={out}", *FAST_EVAL], capsys)
    assert code == 0
    assert not list(out.rglob("*.tmp")) and (out / "predictions.parquet").exists()
    pd.read_parquet(out / "predictions.parquet")


def test_info_check_images_exits_non_zero_when_it_finds_problems(tmp_path, sample_rows, capsys):
    from microbench.cli import main

    rows = [dict(r) for r in sample_rows[:20]]
    rows[3]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}
    rows[5]["image"] = {"bytes": png_bytes(__import__("numpy").zeros((4, 4, 3), dtype="uint8")), "path": None}
    write_raw_hub_copy(rows, tmp_path / "copy", n_shards=1)
    assert main(["info", str(tmp_path / "copy"), "--check-images"]) == 1
    out = capsys.readouterr().out
    assert "1 image" in out and "could not be decoded" in out
    assert main(["info", "sample", "--check-images"]) == 0


def test_a_csv_row_whose_options_are_not_a_json_list_is_named(tmp_path):
    from microbench.data.cognition import load_cognition
    from microbench.data.loading import MicroBenchDataError

    root = _cognition_copy(tmp_path)
    rows = _jsonl(root / "questions.jsonl")[:3]
    frame = pd.DataFrame([{**r, "options": json.dumps(r["options"]) if i != 1 else "A;B"} for i, r in enumerate(rows)])
    frame.to_csv(root / "q.csv", index=False)
    with pytest.raises(MicroBenchDataError, match=r"q.csv row 2: options 'A;B' is not a JSON list"):
        load_cognition(str(root / "q.csv"))
    frame.assign(options=[json.dumps(r["options"]) for r in rows]).to_csv(root / "ok.csv", index=False)
    items = load_cognition(str(root / "ok.csv"))
    assert items.frame["options"].tolist() == [r["options"] for r in rows] and items.frame["valid"].all()
