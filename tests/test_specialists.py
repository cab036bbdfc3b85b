"""Specialists: fine-tunes on one corner of μ-Bench and their studies."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli


def _walk_floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_floats(v)


def test_a_fluorescence_specialist_is_studied_on_the_whole_benchmark_without_nan(tmp_path, cfg_train):
    """The issue's command died in the report (NaN in JSON): the study scored only the training modality (its
    `data.modalities` filter was kept), so nothing was 'supported' and the chance level of that empty group was NaN.
    Now the study scores every row of the copy, and an undefined number is None with its reason."""
    from microbench.tasks.registry import train

    out = tmp_path / "fluo"
    train(cfg_train(["experiment=demo", "run_name=fluo_specialist", "data.datasets=null",
                     "data.modalities=[fluorescence microscopy]", "trainer.max_epochs=1", "eval_in_domain=false",
                     "study.alphas=[0,0.5,1]", "study.result_cache=null",
                     "+trainer.enable_progress_bar=false", f"paths.output_dir={out}", f"checkpoint_dir={out / 'ckpt'}"]))
    text = (out / "forgetting" / "forgetting.json").read_text()
    assert "NaN" not in text
    study = json.loads(text)
    assert all(math.isfinite(x) for x in _walk_floats(study))
    targets = set(study["target_datasets"])
    assert "held_et_al_2010_h2b" in targets and "kather_et_al_2016" not in targets
    ft = study["splits"]["test"]["models"]["finetuned"]
    assert ft["supported/all"]["acc"]["n"] > 0  # the rest of the benchmark is scored
    assert "kather_et_al_2016/coarse" in ft["datasets"]
    assert study["splits"]["test"]["chance"]["supported"] is not None


def test_undefined_numbers_become_none_with_their_place_and_reason():
    from microbench.studies.report import undefined_numbers

    study = {"a": {"b": float("nan"), "c": 1.0}, "d": [0.5, float("inf")]}
    found = undefined_numbers(study)
    assert study == {"a": {"b": None, "c": 1.0}, "d": [0.5, None]}
    assert set(found) == {"a/b", "d/1"} and all(v.startswith("undefined:") for v in found.values())


def test_a_plugin_backbone_without_a_learnable_temperature_fine_tunes_contrastively(tmp_path, cfg_train,
                                                                                     monkeypatch):
    """`logit_scale_parameter()` may return None (the base class's default): the contrastive loss then uses a
    fixed scale, CLIP's initial 1/0.07, instead of dying with AttributeError in training_step."""
    import sys

    from conftest import REPO
    from microbench.models.finetune import FIXED_LOGIT_SCALE
    from microbench.tasks.registry import train

    monkeypatch.syspath_prepend(str(REPO / "tests"))
    sys.modules.pop("plugin_backbone", None)
    out = tmp_path / "plugin"
    record, objs = train(cfg_train(["experiment=demo", "model=plugin", "model._target_=plugin_backbone.PluginBackbone",
                                    "trainer.max_epochs=1", "forgetting.enabled=false", "eval_in_domain=false",
                                    "+trainer.enable_progress_bar=false", f"paths.output_dir={out}",
                                    f"checkpoint_dir={out / 'ckpt'}"]))
    module = objs["module"]
    assert module.backbone.logit_scale_parameter() is None and module.objective == "contrastive"
    assert float(module.contrastive_scale()) == pytest.approx(FIXED_LOGIT_SCALE)
    assert record["best_checkpoint"] and 0 <= record["test"]["test/acc"] <= 1


# --- specialists by μ-Bench's own taxonomy -------------------------------------------------------------------------

def test_a_specialty_resolves_to_the_datasets_of_its_group_on_the_copy():
    from microbench.data import schema
    from microbench.data.specialty import metadata_rows, resolve_specialty
    from microbench.errors import UserError

    rows = metadata_rows("sample")
    path = resolve_specialty(rows, "pathology", "domain", "pathology")
    assert set(path.datasets) == set(rows.loc[rows["domain"] == "pathology", "dataset"])
    assert set(path.datasets) & schema.PATHOLOGY_DATASETS and not path.split_datasets
    fluo = resolve_specialty(rows, "fluorescence", "modality", "fluorescence microscopy")
    assert "held_et_al_2010_h2b" in fluo.datasets and not set(fluo.datasets) & set(path.datasets)
    he = resolve_specialty(rows, "he", "stain", "H&E")
    assert set(rows["dataset"]) & schema.HE_DATASETS <= set(he.datasets)  # the paper's H&E table, and GlaS
    assert resolve_specialty(rows, "x", datasets=["kather_et_al_2016"]).datasets == ["kather_et_al_2016"]
    with pytest.raises(UserError, match=r"no row of this copy has modality='x-ray'; its modality values: "
                                        r"'fluorescence microscopy' \(154 rows\)"):
        resolve_specialty(rows, "custom", "modality", "x-ray")
    with pytest.raises(UserError, match="axis 'colour' is not a μ-Bench metadata axis; use one of domain"):
        resolve_specialty(rows, "custom", "colour", "red")
    with pytest.raises(UserError, match="dataset.s. nope are not on this copy"):
        resolve_specialty(rows, "x", datasets=["nope"])
    # a dataset split across values belongs to the group its majority is in, and is named
    mixed = rows.copy()
    kather = mixed.index[mixed["dataset"] == "kather_et_al_2016"]
    mixed.loc[kather[: len(kather) // 3], "domain"] = "biology"
    bio = resolve_specialty(mixed, "biology", "domain", "biology")
    assert "kather_et_al_2016" not in bio.datasets and 0.3 < bio.split_datasets["kather_et_al_2016"] < 0.4


def test_experiment_specialist_fine_tunes_on_its_group_and_studies_the_rest(tmp_path, cfg_train):
    from microbench.data.specialty import metadata_rows
    from microbench.tasks.registry import train

    out = tmp_path / "em"
    record, _ = train(cfg_train(["experiment=specialist", "specialty=electron", "trainer.max_epochs=1",
                                 "eval_in_domain=false", "study.alphas=[0,0.5,1]", "study.result_cache=null", "+trainer.enable_progress_bar=false",
                                 f"paths.output_dir={out}", f"checkpoint_dir={out / 'ckpt'}"]))
    rows = metadata_rows("sample")
    em = sorted(set(rows.loc[rows["modality"] == "electron microscopy", "dataset"]))
    assert record["specialty"]["datasets"] == em and record["specialty"]["axis"] == "modality"
    assert record["class_space"]["datasets"] == em
    study = json.loads((out / "forgetting" / "forgetting.json").read_text())
    assert study["target_datasets"] == em
    supported = {k.rsplit("/", 1)[0] for k in study["splits"]["test"]["models"]["finetuned"]["datasets"]} - set(em)
    assert "kather_et_al_2016" in supported  # the rest of the benchmark
    with pytest.raises(Exception, match="specialty=electron and data.datasets both choose the training data"):
        train(cfg_train(["experiment=specialist", "specialty=electron", "data.datasets=[kather_et_al_2016]",
                         f"paths.output_dir={tmp_path / 'both'}"]))


# --- one study of many models --------------------------------------------------------------------------------------

def test_the_specialists_study_scores_every_model_in_one_pass_as_one_matrix(tmp_path):
    """Two specialists of the tiny model (weights moved along two random directions): one sweep per split decodes
    each image once for every model; the soup is the specialists' mean; each cell's Δ is the model's accuracy minus the
    base's on the same items; normalized accuracy follows its definition."""
    from functools import partial

    import torch

    from conftest import compose_config
    from microbench.data.config import make_eval_dm, whole_benchmark_cfg
    from microbench.studies.specialists import (
        Specialist,
        plan_models,
        run_specialists,
        write_specialists_report,
    )
    from microbench.tasks.trainer import build_model

    cfg = compose_config("train", ["experiment=specialist"])
    bb = build_model(cfg.model)
    base = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def moved(scale):
        return {k: v + scale * torch.randn(v.shape, generator=gen) * v.std() if v.is_floating_point() and v.ndim > 1
                else v.clone() for k, v in base.items()}

    sps = [Specialist("pathology", moved(0.3), ["kather_et_al_2016", "acevedo_et_al_2020"]),
           Specialist("electron", moved(0.3), ["empiar_sbfsem"])]
    paths, points, families = plan_models(base, sps, lambdas=(0.5, 1.0),
                                          merge_options={"ties": {"densities": [0.2]}})
    soup = paths["uniform_soup"][1]
    k = next(k for k, v in base.items() if v.is_floating_point() and v.ndim > 1)
    assert torch.allclose(soup[k], (sps[0].state[k] + sps[1].state[k]) / 2, atol=1e-6)
    assert families["ties"] == [("ties[k=0.2]", 0.5), ("ties[k=0.2]", 1.0)] and len(points) == 1 + 2 + 1 + 2 + 2
    study = run_specialists(bb, base, sps, make_dm=partial(make_eval_dm, whole_benchmark_cfg(cfg.data), bb.preprocess),
                            n_resamples=199, lambdas=(0.5, 1.0), merge_options={"ties": {"densities": [0.2]}})
    test = study["splits"]["test"]
    assert test["sweep"]["decoded_images"] == test["images"] and test["sweep"]["models"] == len(points)
    assert set(test["models"]) == {"base", "specialist:pathology", "specialist:electron", "uniform_soup",
                                   "task_arithmetic", "ties"}
    assert study["chosen"]["task_arithmetic"]["scale"] in (0.5, 1.0)
    base_cell = test["models"]["base"]["pathology/fine"]
    assert base_cell["delta"]["value"] == base_cell["delta"]["low"] == base_cell["delta"]["high"] == 0.0
    for model, cells in test["models"].items():
        for name, cell in cells.items():
            assert cell["delta"]["value"] == pytest.approx(
                cell["acc"]["value"] - test["models"]["base"][name]["acc"]["value"], abs=1e-12), (model, name)
    gain = test["scalars"]["specialists"]["pathology"]["gain"]
    assert gain == test["models"]["specialist:pathology"]["pathology/fine"]["delta"]
    forgetting = test["scalars"]["specialists"]["electron"]["forgetting"]
    elsewhere = test["models"]["specialist:electron"]["elsewhere:electron/all"]["delta"]
    assert forgetting["value"] == -elsewhere["value"] and forgetting["low"] == -elsewhere["high"]
    norm = test["scalars"]["merges"]["uniform_soup"]["normalized_accuracy"]
    for g in ("pathology", "electron"):
        acc = test["models"]["uniform_soup"][f"{g}/all"]["acc"]["value"]
        own = test["models"][f"specialist:{g}"][f"{g}/all"]["acc"]["value"]
        assert norm[g] == pytest.approx(acc / own)
    out = tmp_path / "study"
    write_specialists_report(study, out)
    md = (out / "specialists.md").read_text()
    assert md.startswith("# Specialists study\n\n**What happened.**") and "## Accuracy matrix (fine)" in md
    assert (out / "specialists_matrix.png").stat().st_size > 0
    assert "NaN" not in (out / "specialists.json").read_text()


@pytest.fixture(scope="module")
def three_specialists(tmp_path_factory):
    """The README's multirun as a user runs it (30 epochs each, the tiny generalist base, the sample), with the
    study at its end: trained once for the tests of this file that study specialists (the sweep folder)."""
    import os

    from conftest import REPO

    tmp = tmp_path_factory.mktemp("three_specialists")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    res = run_cli([str(REPO / "src" / "train.py"), "-m", "experiment=specialist",
                   "specialty=pathology,fluorescence,electron", "study_specialists=true",
                   "forgetting.enabled=false", "eval_in_domain=false", f"paths.log_dir={tmp}",
                   f"paths.checkpoint_dir={tmp / 'ckpt'}", "+trainer.enable_progress_bar=false"],
                  cwd=REPO, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp / "specialists" / "multiruns").iterdir()  # one folder, one job per specialty
    return sweep


@pytest.mark.slow
def test_src_specialists_studies_a_multirun_and_is_identical_under_ddp(three_specialists, tmp_path, capsys):
    """A multirun (`specialty=pathology,fluorescence,electron`) trains one specialist per group into one folder (an
    unknown specialty is one line); `python src/specialists.py runs=<that folder>`: one process and two DDP ranks
    give the same study."""
    import os
    import shutil

    from conftest import REPO

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    sweep = tmp_path / "sweep"  # the shared multirun's job folders (their records name their checkpoints), to add to
    shutil.copytree(three_specialists, sweep, ignore=shutil.ignore_patterns("study"))
    names = {}
    for sub in sorted(sweep.iterdir()):
        if (sub / "train_metrics.json").exists():
            names[sub.name] = json.loads((sub / "train_metrics.json").read_text())["specialty"]["name"]
    assert names == {"pathology": "pathology", "fluorescence": "fluorescence", "electron": "electron"}
    bad = run_cli([str(REPO / "src" / "train.py"), "-m", "experiment=specialist", "specialty=pathology,nope"],
                  cwd=REPO, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: specialty=nope is not a preset; presets: biology")

    shutil.copytree(sweep / "electron" / ".hydra", sweep / "crashed" / ".hydra")  # a job that died before its record
    shutil.copytree(sweep / "electron" / ".hydra", sweep / "failed" / ".hydra")  # and one that said why it failed
    (sweep / "failed" / "failed.json").write_text(json.dumps({"error": "RuntimeError: CUDA out of memory"}))
    studies = {}
    for name, extra in (("one", ["logger=wandb", "logger.wandb.offline=true"]), ("ddp", ["trainer=ddp_sim"])):
        res = run_cli([str(REPO / "src" / "specialists.py"), f"runs={sweep}",
                              "bootstrap.n_resamples=199", "lambdas=[0.5,1.0]", "merge_options.ties.densities=[0.2]",
                              "merges=[uniform_soup,task_arithmetic,ties,dare,model_stock]",
                              f"paths.output_dir={tmp_path / name}", *extra], cwd=REPO, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.strip().splitlines()[-1].startswith("report: ")
        studies[name] = json.loads((tmp_path / name / "specialists.json").read_text())
    one, ddp = studies["one"], studies["ddp"]
    crashed, failed = str(sweep / "crashed"), str(sweep / "failed")
    assert one["left_out"] == {"jobs_without_a_record": [crashed, failed], "why": {
        crashed: "no failed.json: still running, or killed", failed: "failed: RuntimeError: CUDA out of memory"}}
    assert (f"Left out: 2 job folder(s) of the runs without a train_metrics.json: {crashed} (no failed.json: still "
            f"running, or killed); {failed} (failed: RuntimeError: CUDA out of memory).") in (
        tmp_path / "one" / "specialists.md").read_text()
    assert one["splits"]["test"]["models"] == ddp["splits"]["test"]["models"]
    assert one["splits"]["test"]["scalars"] == ddp["splits"]["test"]["scalars"] and one["chosen"] == ddp["chosen"]
    assert ddp["splits"]["test"]["sweep"]["ranks"] == 2
    assert ddp["splits"]["test"]["sweep"]["decoded_images"] == one["splits"]["test"]["images"]
    assert {s["name"] for s in one["specialists"]} == {"pathology", "fluorescence", "electron"}
    assert set(one["splits"]["test"]["models"]) == {"base", "specialist:pathology", "specialist:fluorescence",
                                                   "specialist:electron", "uniform_soup", "task_arithmetic", "ties",
                                                   "dare", "model_stock"}
    # W&B: the matrix and merges tables, the heatmap, the scalars as summary values (read from the offline run)
    from wandb_files import offline_run

    (path,) = sorted((tmp_path / "one" / "wandb").glob("offline-run-*"))
    run = offline_run(path)
    tables = {k: [f for f in run["files"] if f.startswith(f"files/media/table/specialists/{k}_")]
              for k in ("matrix", "merges")}
    assert len(tables["matrix"]) == 1 and len(tables["merges"]) == 1, run["files"]
    assert any(f.startswith("files/media/images/specialists/matrix_plot_") for f in run["files"])
    matrix = json.loads((path / tables["matrix"][0]).read_text())
    cells = {(r[0], r[1], r[2]): dict(zip(matrix["columns"], r, strict=True)) for r in matrix["data"]}
    cell = cells[("specialist:pathology", "pathology", "fine")]
    want = one["splits"]["test"]["models"]["specialist:pathology"]["pathology/fine"]
    assert cell["acc"] == pytest.approx(want["acc"]["value"]) and cell["delta_low"] == pytest.approx(
        want["delta"]["low"])
    merges = json.loads((path / tables["merges"][0]).read_text())
    assert [r[0] for r in merges["data"]] == list(one["splits"]["test"]["scalars"]["merges"])
    gain = one["splits"]["test"]["scalars"]["specialists"]["electron"]["gain"]["value"]
    assert run["summary"]["specialists/electron/gain"] == pytest.approx(gain)
    assert run["config"]["specialists"]["groups"] == one["groups"]
    bad = run_cli([str(REPO / "src" / "specialists.py"), f"runs={tmp_path / 'nowhere'}",
                          f"paths.output_dir={tmp_path / 'bad'}"], cwd=REPO, env=env,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: runs: ")
    twice = run_cli([str(REPO / "src" / "specialists.py"),
                            f"runs=[{sweep / 'pathology'},{sweep / 'pathology'}]", f"paths.output_dir={tmp_path / 'tw'}"],
                           cwd=REPO, env=env, timeout=120)
    assert twice.returncode == 2, twice.stderr[-1000:]
    assert twice.stderr.strip().splitlines()[-1].startswith("error: runs: pathology is there 2 times")


# --- chains of specialists and the continual-learning scalars ------------------------------------------------------

def test_continual_scalars_follow_mammoth_and_zscl():
    """Pinned to the definitions: GEM/mammoth backward transfer and forgetting (the max over every row, the final one
    included), GEM's forward transfer (reference: the base), ZSCL's MTIL transfer / avg / last (its results notebook:
    ``transfer = mean_j mean_{i<j} R[i, j]``, ``avg = R.mean(axis=0).mean()``, ``last = R[-1].mean()``)."""
    import numpy as np

    from microbench.studies.continual import chain_scalars, merged_as_last

    R = [[0.9, 0.2, 0.1], [0.7, 0.8, 0.3], [0.6, 0.5, 0.85]]
    got = chain_scalars(R, base=[0.3, 0.25, 0.2])
    assert got["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert got["average_forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert got["forward_transfer_vs_base"] == pytest.approx(((0.2 - 0.25) + (0.3 - 0.2)) / 2)
    assert got["transfer"] == pytest.approx((0.2 + (0.1 + 0.3) / 2) / 2)
    assert got["avg"] == pytest.approx(np.mean([(0.9 + 0.7 + 0.6) / 3, 1.5 / 3, 1.25 / 3]))
    assert got["last"] == pytest.approx((0.6 + 0.5 + 0.85) / 3)
    # a task the final step does best on forgets 0 (mammoth), not a negative number (Chaudhry's max over l < T−1)
    rising = chain_scalars([[0.5, 0.1], [0.9, 0.8]], base=[0.0, 0.0])
    assert rising["average_forgetting"] == 0.0 and rising["backward_transfer"] == pytest.approx(0.4)
    # against a direct transcription of the definitions on random matrices
    rng = np.random.default_rng(0)
    for T in (2, 3, 5):
        M = rng.random((T, T))
        s = chain_scalars(M, base=rng.random(T))
        bwt = sum(M[T - 1][i] - M[i][i] for i in range(T - 1)) / (T - 1)
        fgt = sum(max(M[step][j] for step in range(T)) - M[T - 1][j] for j in range(T - 1)) / (T - 1)
        transfer = sum(sum(M[i][j] for i in range(j)) / j for j in range(1, T)) / (T - 1)
        assert (s["backward_transfer"], s["average_forgetting"], s["transfer"]) == pytest.approx((bwt, fgt, transfer))
    assert chain_scalars([[0.7]], base=[0.5])["backward_transfer"] is None  # one step has no backward transfer
    merge = merged_as_last([[0.9, 0.2], [0.3, 0.8]], merged=[0.7, 0.85])
    assert merge["backward_transfer"] == pytest.approx(((0.7 - 0.9) + (0.85 - 0.8)) / 2)
    assert merge["average_forgetting"] == pytest.approx((0.9 - 0.7 + 0.0) / 2)
    with pytest.raises(ValueError, match="T×T"):
        chain_scalars([[0.1, 0.2]], base=[0, 0])


@pytest.mark.slow
def test_init_from_starts_the_fit_from_another_fit_and_the_study_base_stays_the_preset(tmp_path, cfg_train):
    """B fine-tuned from A: with lr = 0, B's weights are A's exactly; B's record names A; its forgetting study's
    base is the preset (the generalist), not A; chain=true outside a multirun is one line."""
    import torch

    from microbench.studies.forgetting import load_finetuned_state
    from microbench.tasks.registry import train
    from microbench.tasks.trainer import build_model

    common = ["experiment=specialist", "trainer.max_epochs=1", "eval_in_domain=false", "test_after_fit=false",
              "+trainer.enable_progress_bar=false", "forgetting.enabled=false"]
    a, _ = train(cfg_train([*common, "specialty=electron", f"paths.output_dir={tmp_path / 'a'}",
                            f"checkpoint_dir={tmp_path / 'a' / 'ckpt'}"]))
    b, _ = train(cfg_train([*common, "specialty=pathology", f"init_from={tmp_path / 'a'}", "module.lr=0",
                            "module.weight_decay=0", "forgetting.enabled=true", "study.alphas=[0,1]",
                            "study.result_cache=null", f"paths.output_dir={tmp_path / 'b'}",
                            f"checkpoint_dir={tmp_path / 'b' / 'ckpt'}"]))
    a_ckpt = a["last_checkpoint"]
    assert b["chain"] == {"job": None, "init_from": a_ckpt, "after": ["electron"]}
    bb = build_model(cfg_train(["experiment=specialist"]).model)
    sa, _ = load_finetuned_state(a_ckpt, bb)
    sb, _ = load_finetuned_state(b["last_checkpoint"], bb)
    base = bb.state_dict()
    moved = [k for k, v in sa.items() if v.is_floating_point() and not torch.equal(v, base[k])]
    assert moved and all(torch.equal(sa[k], sb[k]) for k in moved)
    study = json.loads((tmp_path / "b" / "forgetting" / "forgetting.json").read_text())
    assert study["base"]["fingerprint"] == bb.fingerprint(refresh=True)  # the preset, not A
    with pytest.raises(Exception, match="chain=true chains the jobs of a multirun"):
        train(cfg_train([*common, "chain=true", f"paths.output_dir={tmp_path / 'c'}"]))
    with pytest.raises(Exception, match="init_from=.*nowhere: no such run folder"):
        train(cfg_train([*common, f"init_from={tmp_path / 'nowhere'}", f"paths.output_dir={tmp_path / 'd'}"]))


@pytest.mark.slow
def test_a_chain_multirun_is_studied_as_one_sequence(tmp_path):
    """`-m ... chain=true`: job 1 starts from job 0's checkpoint; the study with chain=true orders the runs, scores
    base + each step (no merges) and reports the chain's scalars from its own matrix; chain=false refuses it."""
    import os

    from conftest import REPO
    from microbench.studies.continual import chain_scalars

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    res = run_cli([str(REPO / "src" / "train.py"), "-m", "experiment=specialist",
                          "specialty=electron,pathology", "chain=true", "trainer.max_epochs=1",
                          "forgetting.enabled=false", "eval_in_domain=false", "test_after_fit=false",
                          f"paths.log_dir={tmp_path}", f"paths.checkpoint_dir={tmp_path / 'ckpt'}",
                          "+trainer.enable_progress_bar=false"], cwd=REPO, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (sweep,) = (tmp_path / "specialists" / "multiruns").iterdir()
    em = json.loads((sweep / "electron" / "train_metrics.json").read_text())
    path = json.loads((sweep / "pathology" / "train_metrics.json").read_text())
    assert em["chain"] == {"job": 0, "init_from": None, "after": []}
    assert path["chain"]["init_from"] == em["last_checkpoint"]
    assert path["chain"]["after"] == ["electron"] and path["chain"]["job"] == 1
    study_cmd = [str(REPO / "src" / "specialists.py"), f"runs={sweep}", "bootstrap.n_resamples=99"]
    refused = run_cli([*study_cmd, f"paths.output_dir={tmp_path / 'no'}"], cwd=REPO, env=env, timeout=300)
    assert refused.returncode == 2 and "study the runs as one chain with chain=true" in refused.stderr
    ok = run_cli([*study_cmd, "chain=true", f"paths.output_dir={tmp_path / 'study'}"], cwd=REPO,
                        env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    study = json.loads((tmp_path / "study" / "specialists.json").read_text())
    test = study["splits"]["test"]
    assert study["chain"] is True and set(test["models"]) == {"base", "specialist:electron", "specialist:pathology"}
    cont = test["scalars"]["continual"]
    assert cont["kind"] == "chain" and cont["order"] == ["electron", "pathology"]
    R = [[test["models"][f"specialist:{r}"][f"{c}/fine"]["acc"]["value"] for c in cont["order"]] for r in cont["order"]]
    base = [test["models"]["base"][f"{c}/fine"]["acc"]["value"] for c in cont["order"]]
    assert cont["fine"] == chain_scalars(R, base)
    md = (tmp_path / "study" / "specialists.md").read_text()
    assert "As one chain (electron → pathology)" in md


def test_specialists_merges_are_plugins_pinned_to_the_merging_functions(tmp_path, monkeypatch):
    """DARE (+ task arithmetic) and Model Stock of every specialist are the toolkit's functions; a new merge is one
    registered function, imported with plugins=[module]; a wrong name or option is one line."""
    import sys

    import torch

    from microbench.errors import UserError
    from microbench.studies import methods
    from microbench.studies.merging import add_vector, dare, model_stock, task_vector
    from microbench.studies.specialists import Specialist, plan_models

    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=gen), "b": torch.randn(4, generator=gen), "n": torch.tensor(3)}
    sps = [Specialist(f"s{i}", {**base, "w": base["w"] + torch.randn(6, 4, generator=gen),
                                "b": base["b"] + torch.randn(4, generator=gen)}, [f"d{i}"]) for i in range(3)]
    paths, points, families = plan_models(base, sps, lambdas=(0.5, 1.0), merges=["dare", "model_stock"],
                                          merge_options={"dare": {"p": 0.3, "seeds": [0, 1]}})
    for s in (0, 1):
        vec = [dare(task_vector(base, sp.state), 0.3, 1000 * s + i) for i, sp in enumerate(sps)]
        want = add_vector(base, {k: sum(v[k] for v in vec) for k in vec[0]})
        assert all(torch.equal(paths[f"dare[seed={s}]"][1][k], want[k]) for k in base)
    assert families["dare"] == [("dare[seed=0]", 0.5), ("dare[seed=0]", 1.0), ("dare[seed=1]", 0.5),
                                ("dare[seed=1]", 1.0)]
    stock = model_stock(base, [sp.state for sp in sps])
    assert all(torch.equal(paths["model_stock"][1][k], stock[k]) for k in base)
    assert families["model_stock"] == [("model_stock", 1.0)]  # not scaled: the merged point alone
    # a plug-in, as a user's module registers it
    plugin = tmp_path / "my_merges.py"
    plugin.write_text(
        "from microbench.studies.methods import MergePath, specialists_merge\n"
        "@specialists_merge('first_half', 'halfway to the first specialist', scaled=False)\n"
        "def first_half(inputs, share=0.5):\n"
        "    end = {k: v + share * (inputs.finetuned[0][k] - v) if v.is_floating_point() else v\n"
        "           for k, v in inputs.base.items()}\n"
        "    return [MergePath('first_half', 'first_half', inputs.base, end)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from omegaconf import OmegaConf

    from microbench.tasks.specialists import merges_of

    cfg = OmegaConf.create({"plugins": ["my_merges"], "merges": ["first_half", "ties"],
                            "merge_options": {"first_half": {"share": 0.25}, "dare": {"p": 0.5}}})
    try:
        names, options = merges_of(cfg)
        assert names == ["first_half", "ties"] and options == {"first_half": {"share": 0.25}}
        paths, _, families = plan_models(base, sps, merges=names, merge_options=options)
        assert torch.allclose(paths["first_half"][1]["w"], base["w"] + 0.25 * (sps[0].state["w"] - base["w"]))
        with pytest.raises(UserError, match="merges: unknown merge 'nope'; known: uniform_soup"):
            merges_of(OmegaConf.create({"merges": ["nope"]}))
        with pytest.raises(UserError, match=r"merge_options.ties.k is not an option of ties; its options: densities"):
            merges_of(OmegaConf.create({"merges": ["ties"], "merge_options": {"ties": {"k": 0.2}}}))
        with pytest.raises(UserError, match=r"merge_options.ties.densities must be a number in \(0, 1\] or a "
                                            r"non-empty list, each a number in \(0, 1\], got \[2\]"):
            merges_of(OmegaConf.create({"merges": ["ties"], "merge_options": {"ties": {"densities": [2]}}}))
        with pytest.raises(UserError, match="plugins: cannot import not_a_module"):
            merges_of(OmegaConf.create({"plugins": ["not_a_module"], "merges": ["ties"]}))
    finally:
        methods.SPECIALIST_MERGES.pop("first_half", None)
        sys.modules.pop("my_merges", None)


# --- it shows something on the embedded default --------------------------------------------------------------------

@pytest.mark.slow
def test_three_specialists_on_the_sample_gain_on_their_group_and_the_report_names_the_merges_that_beat_them(
        three_specialists):
    """The README's multirun as a user runs it (the `three_specialists` fixture: 30 epochs each, the study at its
    end): a specialist gains on its own group with a paired CI above 0, and the report states, for each specialist,
    which merged models beat it outside its group (exactly those whose paired CI is above 0)."""
    import re

    sweep = three_specialists
    study = json.loads((sweep / "study" / "specialists.json").read_text())
    test = study["splits"]["test"]["scalars"]
    gains = {n: s["gain"] for n, s in test["specialists"].items()}
    assert any(g["low"] > 0 for g in gains.values()), gains
    md = (sweep / "study" / "specialists.md").read_text()
    head = md.split("## Accuracy matrix")[0]
    for name in gains:
        line = next(x for x in head.splitlines() if x.startswith(f"- Outside the **{name}** group, "))
        winners = {fam for fam, m in test["merges"].items() if m["versus_specialist_elsewhere"][name]["beats"]}
        named = set(re.findall(r"(\w+) \([+-]", line))
        assert named == winners, (line, winners)
        assert ("no merged model beats" in line) == (not winners)
    assert (sweep / "study" / "specialists_matrix.png").stat().st_size > 0
