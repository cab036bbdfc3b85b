"""One run-record type for every task, built in one place, written by one writer, printed by one summary
printer."""

from __future__ import annotations

import json

import pytest

from microbench.results.record import RunRecord
from microbench.results.report import summary
from microbench.tasks.records import new_record, write_run
from microbench.tasks.registry import evaluate, train


def _metric(v, ci=None, n=10):
    return {"value": v, "ci": ci, "n": n}


def test_a_record_round_trips_and_keeps_the_task_fields_at_the_top_level(tmp_path):
    import time

    rec = new_record({"t0": time.perf_counter(), "run_id": "abc", "config": {"seed": 0}, "timings": {"x": 1.0}},
                     task="cognition", model={"name": "m"}, data={"kind": "sample"}, split={"name": "all"},
                     headline={"cognition": _metric(0.5, 0.1)}, metrics={"cognition/all": _metric(0.5, 0.1)},
                     prompt="official", n_predictions=12)
    body = rec.to_dict()
    assert list(body)[:9] == ["microbench_version", "run_id", "task", "model", "data", "split", "headline", "metrics",
                              "skipped"]
    assert body["prompt"] == "official" and list(body)[-3:] == ["timings_s", "environment", "config"]
    assert body["timings_s"]["x"] == 1.0 and "total" in body["timings_s"] and body["environment"]["world_size"] == 1
    back = RunRecord.from_dict(json.loads(json.dumps(body)))
    assert back == rec and back["n_predictions"] == 12 and back.get("missing", 3) == 3 and "prompt" in back

    write_run(tmp_path, rec, tables={}, texts={"results.md": "# hi\n"})
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(body))
    assert rec.outputs == {"results": str((tmp_path / "results.md").resolve())}
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_summary_is_one_line_per_headline_group_then_notes_then_outputs():
    perception = RunRecord(task="zero_shot_perception", model={"name": "tiny"}, data={}, split={}, metrics={},
                           headline={"captions": {"coarse": _metric(0.1503, 0.018, 1504), "fine": None},
                                     "questions": {"coarse": _metric(0.2, 0.01, 4), "fine": _metric(0.3, None, 2)}},
                           notes=["fine: 2 of 5 datasets"], outputs={"results": "/out/results.md"})
    assert summary(perception) == [
        "tiny [captions] coarse 15.03 ± 1.80 (n=1504) | fine n/a",
        "tiny [questions] coarse 20.00 ± 1.00 (n=4) | fine 30.00 (n=2)",
        "  note: fine: 2 of 5 datasets",
        "results: /out/results.md"]
    cognition = RunRecord(task="cognition", model={"name": "random"}, data={}, split={}, metrics={},
                          headline={"cognition": _metric(1 / 6, 1 / 6, 12)})
    assert summary(cognition) == ["random [cognition] accuracy 16.67 ± 16.67 (n=12)"]
    many = RunRecord(task="linear_probe", model={"name": "m"}, data={}, split={}, metrics={},
                     headline={f"full/d{i}": _metric(0.5, n=4) for i in range(6)})
    assert summary(many)[0] == "m [full]" and summary(many)[1:] == [f"  d{i} 50.00 (n=4)" for i in range(6)]


@pytest.mark.parametrize("overrides", [[], ["model=random"], ["task=cognition"], ["task=cognition", "model=random"]],
                         ids=["zero-shot", "random", "cognition", "cognition-random"])
def test_every_evaluation_returns_the_record_it_wrote(tmp_path, cfg_eval, overrides):
    record, _ = evaluate(cfg_eval([*overrides, "+trainer.enable_progress_bar=false"]))
    assert isinstance(record, RunRecord)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(record.to_dict()))
    lines = summary(record)
    assert lines[0].startswith(record.model["name"] + " [") and lines[-1] == f"results: {tmp_path.resolve()}/results.md"


def test_a_training_run_returns_its_record_with_the_old_keys_kept(tmp_path, cfg_train):
    record, _ = train(cfg_train(["experiment=demo", "trainer.max_epochs=1", "forgetting.enabled=false",
                                 "eval_in_domain=false", f"checkpoint_dir={tmp_path / 'ck'}", "+trainer.enable_progress_bar=false"]))
    body = json.loads((tmp_path / "train_metrics.json").read_text())
    assert body["task"] == "finetune" and body == json.loads(json.dumps(record.to_dict()))
    for key in ("fit_seconds", "best_checkpoint", "last_checkpoint", "checkpoint_dir", "class_space", "test",
                "tested_checkpoint", "total_seconds"):
        assert key in body, key  # what train_metrics.json always had, beside the common header
    assert body["headline"]["test/acc"]["value"] == body["test"]["test/acc"]
    assert record["last_checkpoint"].startswith(str(tmp_path / "ck"))  # dirpath: ${checkpoint_dir}
    assert summary(record)[0].startswith("microbench-tiny [test] acc ")
