"""`python -m microbench rescore`: every kind of run's metrics again from its own files, equal to its record."""

from __future__ import annotations

import json
import shutil

import pytest

from microbench.cli import main
from microbench.errors import UserError
from microbench.results.rescore import find_rescorable, parse_slices, rescore


def _one(path, kind="record", **kw):
    return rescore(path, kind, **kw)


def test_rescoring_a_perception_run_reproduces_metrics_json_and_adds_slices_beside_it(tmp_path, cfg_eval, capsys):
    from microbench.tasks.registry import evaluate

    out = tmp_path / "zs"
    evaluate(cfg_eval([f"paths.output_dir={out}", "bootstrap.n_resamples=199", "sources=[captions,questions]"]))
    before = (out / "metrics.json").read_text()
    result = _one(out)
    assert result.ok and result.compared > 1000 and not result.added, result.line()
    assert not (out / "rescored.json").exists()  # nothing new: nothing written

    # a slice of one's own: written beside the run, the run's own files unchanged
    code = main(["rescore", str(out), "--slice", "blood=acevedo_et_al_2020,eulenberg_et_al_2017_brightfield"])
    assert code == 0 and "all equal to its record" in capsys.readouterr().out
    new = json.loads((out / "rescored.json").read_text())["metrics"]
    e = new["captions/slice/blood/coarse"]
    assert 0 <= e["clustered"]["low"] <= e["value"] <= e["clustered"]["high"] <= 1 and e["n"] > 0
    assert "questions/slice/blood/fine" in new and (out / "metrics.json").read_text() == before
    assert "captions/slice/blood/coarse" in (out / "rescored.md").read_text()
    with pytest.raises(UserError, match="--slice 'blood': write NAME=DATASET"):
        parse_slices(["blood"])
    assert main(["rescore", str(out), "--slice", "x=not_a_dataset"]) == 2

    # a record that disagrees with its predictions is caught (exit 1, the metric named)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    rec = json.loads((broken / "metrics.json").read_text())
    rec["metrics"]["captions/official/fine"]["value"] += 0.01
    (broken / "metrics.json").write_text(json.dumps(rec))
    assert main(["rescore", str(broken)]) == 1
    assert "captions/official/fine/value" in capsys.readouterr().out

    # a record written before clustered intervals: equal on what it has; --clustered writes them beside it
    old = tmp_path / "old"
    shutil.copytree(out, old)
    rec = json.loads((old / "metrics.json").read_text())
    for entry in rec["metrics"].values():
        entry.pop("clustered", None)
    (old / "metrics.json").write_text(json.dumps(rec))
    result = _one(old, clustered=True)
    assert result.ok and not result.added  # compared on what the record has
    extra = json.loads((old / "rescored.json").read_text())["metrics"]
    assert extra["captions/official/coarse"]["clustered"] == json.loads((out / "metrics.json").read_text())[
        "metrics"]["captions/official/coarse"]["clustered"]


@pytest.mark.slow
def test_rescoring_cognition_localization_and_a_study_reproduces_their_records(tmp_path, cfg_eval, cfg_train):
    """Every other kind of run: cognition, a localization head's test (COCO from its detections, GRIT and their
    image-clustered intervals) and a forgetting study of four methods (DARE's three seeds included)."""
    from microbench.tasks.registry import evaluate, train

    evaluate(cfg_eval([f"paths.output_dir={tmp_path / 'cog'}", "task=cognition", "bootstrap.n_resamples=199"]))
    train(cfg_train(["experiment=detect_nuclei", "trainer.max_epochs=1", "+trainer.enable_progress_bar=false",
                     "logger=csv", "bootstrap.n_resamples=199", f"paths.output_dir={tmp_path / 'loc'}",
                     f"checkpoint_dir={tmp_path / 'loc' / 'ckpt'}"]))
    train(cfg_train(["experiment=demo", "trainer.max_epochs=2", "eval_in_domain=false", "study=compare",
                     "study.alphas=[0,0.5,1]", "study.result_cache=null",
                     "+trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path / 'demo'}",
                     f"checkpoint_dir={tmp_path / 'demo' / 'ckpt'}"]))
    found, skipped = find_rescorable([tmp_path])
    runs = {str(p.relative_to(tmp_path)): k for p, k in found}
    assert skipped == []  # the fits' own records are train_metrics.json
    assert runs == {"cog": "record", "loc": "record", "demo/forgetting": "study"}
    results = {name: _one(tmp_path / name, kind) for name, kind in runs.items()}
    for r in results.values():
        assert r.ok and not r.added, r.line()
    assert results["cog"].kind == "cognition" and results["cog"].compared > 50
    loc = json.loads((tmp_path / "loc" / "metrics.json").read_text())["metrics"]
    assert "clustered" in loc["loc/bbox/AP"] and results["loc"].compared > 50
    study = json.loads((tmp_path / "demo" / "forgetting" / "forgetting.json").read_text())
    assert set(study["methods"]) == {"wise_ft", "lines", "ties_trim", "dare"} and len(study["methods"]["dare"][
        "paths"]) == 3
    assert results["demo/forgetting"].compared > 5000
    # a study whose numbers do not follow from its predictions is caught
    study["splits"]["test"]["models"]["finetuned"]["target/fine"]["delta"]["value"] += 0.1
    (tmp_path / "demo" / "forgetting" / "forgetting.json").write_text(json.dumps(study))
    bad = _one(tmp_path / "demo" / "forgetting", "study")
    assert not bad.ok and "finetuned/target/fine/delta/value" in bad.mismatches


def test_rescore_says_in_one_line_what_it_cannot_read(tmp_path):
    with pytest.raises(UserError, match="no metrics.json or forgetting.json"):
        find_rescorable([tmp_path])
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "zero_shot_perception", "metrics": {},
                                                        "bootstrap": {}}))
    with pytest.raises(UserError, match="predictions.parquet does not exist"):
        _one(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "linear_probe"}))
    with pytest.raises(UserError, match="task 'linear_probe' has no predictions to rescore"):
        _one(tmp_path)


def test_the_table1_script_runs_every_paper_preset_and_each_maps_to_its_paper_row():
    """scripts/reproduce_table1.sh (it needs GPUs and Hub weights, so only its dry run here): every command
    composes with the real configs, and every model it evaluates is matched to its row of Table 1 by the name its
    runs record, so ``--paper`` can put the paper's number beside ours."""
    import os
    import shlex
    import subprocess

    from conftest import REPO, compose_config
    from microbench.results.paper import TABLE1, paper_name

    env = {**os.environ, "DRY_RUN": "1", "COGNITION": "/data/cognition", "PY": "python"}
    res = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_table1.sh"), "all"], capture_output=True,
                         text=True, env=env, timeout=60, check=True)
    lines = res.stdout.strip().splitlines()
    assert lines[-1].endswith("--paper --baseline random")
    matched = set()
    for line in lines[:-1]:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "src/eval.py"]
        cfg = compose_config("eval", argv[2:])
        m = cfg.model
        if "cognition" in cfg.paths.output_dir.rsplit("/", 1)[-1]:
            assert cfg.task == "cognition" and cfg.cognition.path == "/data/cognition"
            continue
        name = paper_name({"name": m.get("name") or m.get("model"), "pretrained": m.get("pretrained"),
                           "model": m.get("model"), "blind": m.get("blind", False)})
        if m.get("_target_", "").endswith("RandomBaseline"):
            name = paper_name({"name": "random"})
        assert name in TABLE1, line
        matched.add(name)
    assert matched == set(TABLE1) - {"CONCH"}  # CONCH is a plug-in (gated weights, its own package)
    bad = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_table1.sh"), "everything"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: say contrastive, generative or all")
