"""`python -m microbench info`."""

from __future__ import annotations

import json

import pytest

from microbench.cli import main

REQUIRED = {"rows", "unique_image_ids", "questions", "captions", "datasets", "rows_with_bbox", "rows_with_polygon",
            "invalid"}


def test_info_json_on_sample(capsys):
    assert main(["info", "sample", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert REQUIRED <= set(rec)
    assert rec["rows"] == 328 and rec["unique_image_ids"] == 292 and rec["items"] == 5856
    assert rec["datasets"]["kather_et_al_2016"] == 32 and sum(rec["datasets"].values()) == 328
    assert rec["absent"] == {"captions.stain_0": 16, "captions.stain_1": 16, "questions.stain": 16}
    assert rec["source"]["kind"] == "sample" and rec["label_classes"] == 104
    assert rec["non_official_datasets_present"] == ["opencell", "sirinukunwattana_et_al_2016"]


def test_info_table_and_image_check(capsys):
    assert main(["info", "sample", "--check-images"]) == 0
    out = capsys.readouterr().out
    assert "Rows per dataset" in out and "held_et_al_2010_galt" in out and "no problems found" in out


def test_info_bad_path_is_one_line(capsys, tmp_path):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data path") and "\n" not in err and "data.path=sample" in err


def test_grit_command_scores_a_file_of_box_answers(tmp_path, capsys):
    rows = [{"response": "<box>(0,0),(500,500)</box>", "width": 100, "height": 100, "gt_boxes": [[0, 0, 50, 50]],
             "dataset": "d", "class": "nucleus"},
            {"response": "no idea", "width": 100, "height": 100, "gt_boxes": [[0, 0, 50, 50]], "dataset": "d",
             "class": "nucleus"}]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["grit", str(path), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "GRIT macro 50.00" in out and "1 without a parseable box" in out
    assert json.loads((tmp_path / "m.json").read_text())["grit/d/nucleus"] == pytest.approx(0.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"response": "x"}) + "\n")
    assert main(["grit", str(bad)]) == 2
    assert "lacks columns" in capsys.readouterr().err


# --- command-line runs in the tests: a fork of the pre-imported Python is a fresh process -----------------------

def test_a_forked_run_leaves_the_temporary_folders_of_the_next_run_in_place(tmp_path):
    """wandb makes its media folder at import (the test runner's pre-imported Python has it): one run's exit must not
    delete it under the next (a W&B table of the second run failed with FileNotFoundError)."""
    from conftest import run_cli

    script = tmp_path / "media.py"
    script.write_text("import pathlib\nfrom wandb.sdk.data_types._private import MEDIA_TMP\n"
                      "(pathlib.Path(MEDIA_TMP.name) / 'x.json').write_text('{}')\nprint('wrote')\n")
    for _ in range(2):
        res = run_cli([script], cwd=tmp_path)
        assert (res.returncode, res.stdout.strip()) == (0, "wrote"), res.stderr[-1000:]


def test_a_job_closes_its_process_group_as_it_ends_even_when_it_fails(tmp_path, monkeypatch, capsys):
    """A rank of `trainer=ddp` (one process each) that exits with its Gloo group open can abort at interpreter
    shutdown (SIGABRT, exit -6, "terminate called without an active exception") after writing its results: seen
    once in the suite's process-per-rank evaluation. Every job now closes the group as it ends, whatever happens."""
    import os
    import sys

    import torch.distributed as dist

    from conftest import REPO
    from microbench.distributed import close_process_group
    from microbench.jobs import run_job

    assert close_process_group() is False  # none open: nothing to do
    monkeypatch.setenv("PROJECT_ROOT", os.environ.get("PROJECT_ROOT", str(REPO)))  # run_job sets it: restored after
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(sys, "argv", ["src/eval.py", f"data.path={tmp_path / 'missing'}",
                                      f"paths.output_dir={tmp_path / 'out'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    try:
        with pytest.raises(SystemExit) as stop:
            run_job("eval")
        assert stop.value.code == 2 and "error: data path" in capsys.readouterr().err
        assert not dist.is_initialized()
    finally:
        close_process_group()


def test_a_cli_after_an_in_process_fit_still_runs_in_a_fork_of_the_pre_imported_python():
    """Lightning's seed_everything (every in-process fit) leaves PL_GLOBAL_SEED and PL_SEED_WORKERS in the tests'
    environment; they are read when a run seeds, never at import, so a fork of the pre-imported Python is still the
    same as a fresh one (before: every later command line of that worker paid a fresh interpreter's imports)."""
    import os

    import lightning as L

    from conftest import _SESSION_ENV, _same_as_a_fresh_python

    if os.environ.get("MICROBENCH_TESTS_NO_ZYGOTE"):
        pytest.skip("MICROBENCH_TESTS_NO_ZYGOTE is set: every command line runs in a fresh interpreter")
    saved = dict(os.environ)
    try:
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            os.environ.pop(key, None)
        before = dict(os.environ)
        L.seed_everything(3, workers=True)
        changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
        assert changed >= {"PL_GLOBAL_SEED"}, changed
        after_fit = {**_SESSION_ENV, **{k: os.environ[k] for k in changed}}  # the session's, as a fit leaves it
        assert _same_as_a_fresh_python(["src/eval.py"], after_fit)
        for left in ({"MASTER_PORT": "29533"}, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}):  # ddp_spawn, deterministic
            assert _same_as_a_fresh_python(["src/eval.py"], {**after_fit, **left}), left
        assert not _same_as_a_fresh_python(["src/eval.py"], {**after_fit, "OMP_NUM_THREADS": "7"})  # at import
    finally:
        os.environ.clear()
        os.environ.update(saved)
