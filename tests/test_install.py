"""An installed copy, not a checkout: the presets and the sample ship inside the package, and the jobs run from any
folder (``python -m microbench eval ...``, the ``microbench`` command), writing under it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, run_cli

#: what a wheel is built from (an in-tree build would write build/ and *.egg-info into the checkout)
PROJECT = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src/microbench", "configs", "data/sample")


def _run(args, **kwargs):
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert res.returncode == 0, (args, res.stdout[-1500:], res.stderr[-3000:])
    return res


@pytest.mark.slow
def test_a_non_editable_install_runs_the_jobs_from_outside_the_checkout(tmp_path):
    project = tmp_path / "project"
    for rel in PROJECT:
        src, dst = REPO / rel, project / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".cache*"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    # a wheel, built offline with this environment's setuptools, installed by pip into a fresh virtual environment
    # that reuses this one's dependencies (a path line: this environment's own .pth files, the editable install of
    # the checkout among them, are not read there)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          project])
    (wheel,) = (tmp_path / "dist").glob("microbench-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    shutil.rmtree(project)  # nothing of the checkout is left to read but what the wheel holds

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJECT_ROOT", "MICROBENCH_JOB")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", MICROBENCH_PIXEL_CACHE="null")
    where = json.loads(_run([python, "-c", "import json, microbench, microbench.resources as r; print(json.dumps("
                                           "[microbench.__file__, str(r.CHECKOUT), str(r.CONFIG_DIR), str(r.SAMPLE_DIR)]))"],
                            cwd=work, env=env).stdout)
    assert where[0].startswith(str(venv)) and where[1] == "None", where
    assert all(p.startswith(str(venv)) for p in where[2:]), where  # the shipped presets and sample
    info = json.loads(_run([python, "-m", "microbench", "info", "sample", "--json"], cwd=work, env=env).stdout)
    assert info["rows"] == 328 and info["source"]["location"].startswith(str(venv)), info["source"]
    args = ["model=tiny", "bootstrap.n_resamples=99"]
    res = _run([venv / "bin" / "microbench", "eval", *args, "paths.output_dir=runs/tiny"], cwd=work, env=env)
    assert res.stdout.strip().splitlines()[-1] == f"results: {work / 'runs' / 'tiny' / 'results.md'}"
    installed = json.loads((work / "runs" / "tiny" / "metrics.json").read_text())["headline"]
    checkout = run_cli(["src/eval.py", *args, f"paths.output_dir={tmp_path / 'checkout'}"], cwd=REPO)
    assert checkout.returncode == 0, checkout.stderr[-2000:]
    assert installed == json.loads((tmp_path / "checkout" / "metrics.json").read_text())["headline"]
    assert installed["captions"]["coarse"]["n"] == 1504  # the sample's coarse-grained questions, all scored
    demo = _run([venv / "bin" / "microbench", "train", "experiment=demo", "model=tiny", "trainer.max_epochs=1",
                 "study.alphas=[0,1]",
                 "bootstrap.n_resamples=99", "+trainer.enable_progress_bar=false"], cwd=work, env=env)
    assert demo.stdout.strip().splitlines()[-1].startswith("forgetting report: ")  # the main job, fit and study
    assert (work / "logs" / "demo" / "runs").is_dir() and (work / "checkpoints" / "demo").is_dir()  # under the folder
    bad = subprocess.run([python, "-m", "microbench", "eval", "model=nope"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "nope" in bad.stderr
