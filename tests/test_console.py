"""The console says what matters, once; the run's log file keeps the rest; one folder per run."""

from __future__ import annotations

import os

import pytest

from conftest import REPO, run_cli


def _run(*args, cwd=REPO):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return run_cli([*args], cwd=cwd, timeout=300, env=env)


@pytest.mark.slow
def test_an_evaluation_prints_each_line_once_and_keeps_the_details_in_its_own_folder(tmp_path):
    res = _run("src/eval.py", f"paths.output_dir={tmp_path}", "data.datasets=[kather_et_al_2016]",
               "bootstrap.n_resamples=99")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "litlogger" not in out  # Lightning's advert (×4 in a demo)
    assert "LeafSpec" not in out  # the _pytree deprecation (×4)
    assert not [line for line in out.splitlines() if line.startswith("INFO: ")]  # Lightning's own second handler
    lines = [line.split("] ", 1)[-1] for line in res.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(set(lines)), lines  # nothing twice
    assert sum("GPU available" in line for line in lines) <= 1
    log = (tmp_path / "eval.log").read_text()  # the details: in the run's log file, in the run's folder
    assert "GPU available" in log and "loaded 328 rows" in log
    assert (tmp_path / ".hydra" / "config.yaml").is_file() and (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_a_demo_prints_the_forgetting_report_line_once_at_the_end(tmp_path):
    res = _run("src/train.py", "experiment=demo", "trainer.max_epochs=2", "study.alphas=[0,1]",
               "bootstrap.n_resamples=99", f"paths.output_dir={tmp_path}", f"checkpoint_dir={tmp_path / 'ckpt'}",
               f"study.result_cache={tmp_path / 'cache'}", "+trainer.enable_progress_bar=false")
    assert res.returncode == 0, res.stderr[-2000:]
    out = (res.stdout + res.stderr).splitlines()
    assert sum("forgetting report" in line for line in out) == 1
    assert res.stdout.strip().splitlines()[-1].startswith("forgetting report: ")
    assert res.stdout.index("microbench-tiny [test] acc ") < res.stdout.index("forgetting report")
    assert "best checkpoint: " in res.stdout and "in-domain zero-shot: " in res.stdout
    assert sum("GPU available" in line for line in res.stdout.splitlines()) <= 1  # 4 Trainers, said once


@pytest.mark.slow
def test_a_generative_run_does_not_log_every_http_request(tmp_path):
    from microbench.generative.loopback import ScriptedChatServer

    with ScriptedChatServer() as srv:
        res = _run("src/eval.py", "task=cognition", "model=openai_compatible", "model.model=m",
                   f"model.base_url={srv.base_url}", f"model.cache_dir={tmp_path / 'cache'}",
                   f"paths.output_dir={tmp_path / 'o'}", "bootstrap.n_resamples=99")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HTTP Request" not in res.stdout + res.stderr  # httpx: one INFO line per request (1,952 per run)
