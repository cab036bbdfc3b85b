"""`src/eval.py`: run records, the Random baseline, DDP equality, the leaderboard, W&B offline, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, compose_config, run_cli, write_raw_hub_copy
from microbench.errors import UserError
from microbench.results.leaderboard import build_leaderboard
from microbench.tasks.registry import evaluate

PRED_COLUMNS = {"row_idx", "image_id", "dataset", "source", "key", "question_type", "variant", "gold_idx",
                "pred_idx", "correct", "scores", "n_options"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    record, objs = evaluate(compose_config("eval", [f"paths.output_dir={out}", "data.batch_size=64",
                                                    "bootstrap.n_resamples=999"]))
    return out, record, objs


def test_run_record_on_the_sample(tiny_run, sample):
    out, record, objs = tiny_run
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "predictions.parquet", "results.md"}
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["model"]["name"] == "microbench-tiny" and rec["model"]["fingerprint"] == objs["backbone"].fingerprint()
    assert rec["data"]["kind"] == "sample" and rec["data"]["fingerprint"] == sample[1].fingerprint
    assert rec["data"]["revision"] is None and rec["split"]["name"] == "all" and rec["split"]["images"] == 292
    assert rec["config"]["model"]["name"] == "microbench-tiny" and rec["microbench_version"]
    assert rec["timings_s"]["total"] > 0 and rec["n_predictions"] == 3904
    assert rec["skipped"]["invalid_items"] == 0 and rec["skipped"]["items_of_failed_images"] == 0
    fine = rec["metrics"]["captions/official/fine"]
    preds = pd.read_parquet(out / "predictions.parquet")
    assert PRED_COLUMNS <= set(preds.columns) and len(preds) == 3904
    official = preds[(preds.key == "classification_1") & ~preds.dataset.isin(["opencell", "sirinukunwattana_et_al_2016"])]
    assert fine["n"] == len(official) and fine["value"] == pytest.approx(official["correct"].mean())
    assert all(len(s) == n for s, n in zip(preds["scores"], preds["n_options"], strict=True))
    md = (out / "results.md").read_text()
    assert "| microbench-tiny |" in md and "Per dataset" in md and "held_et_al_2010_galt" in md


def test_random_baseline_run(tmp_path, cfg_eval):
    record, _ = evaluate(cfg_eval(["model=random", "bootstrap.n_resamples=999"]))
    assert record["model"]["name"] == "random" and record["n_predictions"] == 3904
    coarse = record["headline"]["captions"]["coarse"]["value"]
    assert 0.12 < coarse < 0.3  # ~1/(options) chance, as the paper's Random row (18.3 %)


@pytest.mark.slow
def test_ddp_equals_single_device_on_a_hub_layout_copy(sample_rows, tmp_path, cfg_eval):
    root = write_raw_hub_copy(sample_rows[1::3], tmp_path / "hub", n_shards=2)  # 109 rows, 97 images (odd)
    common = [f"data.path={root}", "data.batch_size=8", "bootstrap.n_resamples=199", "sources=[captions,questions]"]
    single, _ = evaluate(cfg_eval([*common, f"paths.output_dir={tmp_path / 'one'}"]))
    ddp, _ = evaluate(cfg_eval([*common, f"paths.output_dir={tmp_path / 'ddp'}", "trainer=ddp_sim"]))
    assert single["split"]["images"] % 2 == 1
    a = pd.read_parquet(tmp_path / "one" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "ddp" / "predictions.parquet")
    assert ddp["environment"]["world_size"] == 2 and len(a) == len(b) > 0
    key = ["source", "row_idx", "key"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert (a[key + ["gold_idx", "pred_idx", "correct"]] == b[key + ["gold_idx", "pred_idx", "correct"]]).all().all()
    for sa, sb in zip(a["scores"], b["scores"], strict=True):
        assert max(abs(x - y) for x, y in zip(sa, sb, strict=True)) < 1e-5
    assert {k: v["value"] for k, v in single["metrics"].items()} == {k: v["value"] for k, v in ddp["metrics"].items()}
    # one process per rank, as trainer=ddp starts them on GPUs: every rank ends (rank 1 crashed on its read-back)
    res = run_cli(["src/eval.py", *common, f"paths.output_dir={tmp_path / 'procs'}", "trainer=ddp_sim",
                   "trainer.strategy=ddp"], cwd=REPO, timeout=600)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    procs = json.loads((tmp_path / "procs" / "metrics.json").read_text())
    assert procs["environment"]["world_size"] == 2
    assert {k: v["value"] for k, v in procs["metrics"].items()} == {k: v["value"] for k, v in single["metrics"].items()}


def test_leaderboard(tiny_run, tmp_path, cfg_eval):
    out, _, _ = tiny_run
    evaluate(cfg_eval([f"paths.output_dir={tmp_path / 'random'}", "model=random", "bootstrap.n_resamples=199"]))
    frame = build_leaderboard([out, tmp_path / "random"], tmp_path / "lb")
    assert list(frame["model"]) == sorted(frame["model"], key=lambda m: -frame.set_index("model").loc[m, "coarse"])
    assert set(frame["model"]) == {"microbench-tiny", "random"}
    csv = pd.read_csv(tmp_path / "lb" / "leaderboard.csv")
    assert {"coarse", "coarse_ci", "coarse_n", "fine", "pathology_fine", "stain"} <= set(csv.columns)
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    first_table = md.split("\n\n## ")[0]
    assert first_table.count("\n| ") == 3 and "| model | kind |" in md  # header + 2 models
    assert {"coarse_se", "coarse_low", "coarse_high", "coarse_top", "mean_rank"} <= set(csv.columns)
    assert (tmp_path / "lb" / "leaderboard.png").stat().st_size > 0
    from microbench.errors import UserError

    with pytest.raises(UserError, match="no metrics.json"):
        build_leaderboard([tmp_path / "nothing"], tmp_path / "lb2")


def test_leaderboard_pairs_models_on_the_same_questions_and_says_what_is_significant(tiny_run, tmp_path, cfg_eval):
    """--baseline: paired image-clustered deltas equal to a direct computation on the merged predictions, Holm over
    the models; the model against itself is exactly 0; a run of another copy is never paired (one line why); the
    paper's Table 1 beside ours; significance groups and mean ranks."""
    import shutil

    from microbench.metrics.bootstrap import clustered_paired_delta
    from microbench.metrics.closed_vqa import metric_masks

    out, _, _ = tiny_run
    evaluate(cfg_eval([f"paths.output_dir={tmp_path / 'random'}", "model=random", "bootstrap.n_resamples=199"]))
    other = tmp_path / "other_copy"  # the same model's run on "another copy": its fingerprint differs
    shutil.copytree(out, other)
    rec = json.loads((other / "metrics.json").read_text())
    rec["model"]["name"], rec["data"]["fingerprint"] = "tiny-elsewhere", "another-copy"
    (other / "metrics.json").write_text(json.dumps(rec))
    boot = {"n_resamples": 999, "confidence": 0.95, "seed": 0}
    frame = build_leaderboard([out, tmp_path / "random", other], tmp_path / "lb", baseline="random", paper=True,
                              boot=boot).set_index("model")
    a = pd.read_parquet(tmp_path / "random" / "predictions.parquet")
    b = pd.read_parquet(out / "predictions.parquet")
    merged = a.merge(b[["source", "row_idx", "key", "correct"]], on=["source", "row_idx", "key"], suffixes=("", "_m"))
    merged = merged[merged["source"] == "captions"].reset_index(drop=True)
    for col in ("coarse", "fine"):
        mask = metric_masks(merged, "captions")[f"captions/official/{col}"]
        direct = clustered_paired_delta(merged["correct"][mask].to_numpy(), merged["correct_m"][mask].to_numpy(),
                                        merged["image_id"][mask].to_numpy(), 999, 0.95, 0)
        row = frame.loc["microbench-tiny"]
        assert row[f"{col}_delta"] == pytest.approx(direct.value) == pytest.approx(row[col] - frame.loc[
            "random", col])
        # the same resample weights over the images of the whole split, so the bounds agree up to Monte Carlo
        assert row[f"{col}_delta_low"] == pytest.approx(direct.low, abs=0.01)
        assert row[f"{col}_delta_high"] == pytest.approx(direct.high, abs=0.01)
        assert (row[f"{col}_p"] < 0.05) == (row[f"{col}_delta_high"] < 0 or row[f"{col}_delta_low"] > 0)
        assert row[f"{col}_p_holm"] == pytest.approx(row[f"{col}_p"])  # one comparison: Holm changes nothing
        assert pd.isna(frame.loc["tiny-elsewhere", f"{col}_delta"])  # another copy: never paired
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "tiny-elsewhere (coarse) not paired with random: scored a different copy" in md
    assert "## Paired against random" in md and "## Paper Table 1 side by side" in md
    assert frame.loc["random", "paper_model"] == "Random" and frame.loc["random", "paper_coarse"] == 18.34
    assert frame.loc["random", "paper_coarse_diff"] == pytest.approx(100 * frame.loc["random", "coarse"] - 18.34)
    assert pd.isna(frame.loc["microbench-tiny", "paper_coarse"])  # not a paper model
    # the best of each column is in its own group; the run of another copy is in no group
    for col in ("coarse", "fine"):
        assert frame[f"{col}_top"][frame[col].idxmax()] is True or frame.loc[frame[col].idxmax(), f"{col}_top"]
    assert frame.loc["tiny-elsewhere", "coarse_top"] is None or pd.isna(frame.loc["tiny-elsewhere", "coarse_top"])
    assert frame["mean_rank"].notna().all() and (frame["ranked_slices"] > 0).all()
    with pytest.raises(UserError, match="--baseline 'nobody' is not a model"):
        build_leaderboard([out], tmp_path / "lb3", baseline="nobody")


def test_a_model_paired_with_itself_is_exactly_zero_and_holm_matches_statsmodels(tiny_run):
    from microbench.results.compare import bootstrap_p, holm, mean_ranks, paired_deltas

    out, _, _ = tiny_run
    p = pd.read_parquet(out / "predictions.parquet")
    p = p[p["source"] == "captions"]
    d = paired_deltas(p, p, "perception", {"coarse": "captions/official/coarse"}, {"n_resamples": 999,
                                                                                   "confidence": 0.95, "seed": 0})
    assert d["coarse"]["value"] == d["coarse"]["low"] == d["coarse"]["high"] == 0.0 and d["coarse"]["p"] == 1.0
    assert d["_unpaired"] == 0
    assert bootstrap_p(np.array([0.1, 0.2, -0.05, 0.3])) == pytest.approx(0.5)
    # statsmodels.stats.multitest.multipletests(p, method="holm")[1] (statsmodels 0.14), not imported here
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, 0.001, 0.049, 0.0125, 0.5]) == pytest.approx([0.4, 0.005, 0.147, 0.05, 0.5])
    assert holm([0.04, 0.04]) == pytest.approx([0.08, 0.08])
    r = mean_ranks(pd.DataFrame({"a": [0.9, 0.5, 0.5], "b": [0.1, 0.2, np.nan]}, index=["x", "y", "z"]))
    assert r["mean_rank"].tolist() == [1.5, 1.75, 2.5] and r["slices"].tolist() == [2, 2, 1]


def test_wandb_offline_logging(tmp_path, cfg_eval):
    evaluate(cfg_eval(["logger=wandb", "logger.wandb.offline=true",
                   "data.datasets=[kather_et_al_2016]"]))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def _eval_cli(*overrides, timeout=180):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return run_cli(["src/eval.py", *overrides], cwd=REPO,
                          timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), [
    (["model.name=ViT-Nope"], "error: unknown open_clip model 'ViT-Nope'"),
    (["data.path=/no/such/copy"], "error: data path '/no/such/copy' does not exist"),
    (["model=timm", "model.name=resnet10t"], "image tower without a text encoder"),
])
def test_bad_input_is_one_clear_line(tmp_path, overrides, message):
    res = _eval_cli(*overrides, f"paths.output_dir={tmp_path}")
    assert res.returncode == 2, res.stderr[-2000:]
    err_lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and message in err_lines[0]
    assert not (tmp_path / "metrics.json").exists()


def test_unknown_preset_lists_the_presets(tmp_path):
    res = _eval_cli("model=nope", f"paths.output_dir={tmp_path}")
    assert res.returncode != 0
    assert "Could not find 'model/nope'" in res.stderr and "openclip" in res.stderr and "biomedclip" in res.stderr


def test_plugin_backbone_through_model_target(tmp_path, cfg_eval):
    """The README's plug-in recipe: model=plugin with model._target_ pointing at a Backbone subclass."""
    record, _ = evaluate(cfg_eval(["model=plugin",
                               "model._target_=plugin_backbone.PluginBackbone", "+model.width_note=demo",
                               "data.datasets=[acevedo_et_al_2020]"]))
    assert record["model"]["name"] == "plugin-demo" and record["model"]["library"] == "plugin"
    assert record["n_predictions"] == 32 * 12
