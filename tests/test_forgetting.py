"""Merging toolkit, paired bootstrap, the one-decode interpolation sweep and the forgetting study."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from conftest import REPO, build_model, run_cli
from microbench.data.datamodule import PerceptionDataModule
from microbench.data.labelled import LabelledDataModule
from microbench.metrics.bootstrap import paired_bootstrap_delta
from microbench.models.backbones import build_backbone
from microbench.models.finetune import FineTuneModule
from microbench.models.zero_shot import ZeroShotScorer
from microbench.studies.forgetting import StudySpec, load_finetuned_state, run_study
from microbench.studies.merging import (
    MergeError,
    task_arithmetic,
    ties_merge,
    tower_selector,
    uniform_soup,
    wise_ft,
)
from microbench.studies.report import write_report
from microbench.studies.sweep import InterpolationScorer


def _sd(seed, extra=None):
    g = torch.Generator().manual_seed(seed)
    sd = {"w": torch.randn(4, 3, generator=g), "visual.b": torch.randn(3, generator=g),
          "steps": torch.tensor([seed], dtype=torch.long)}
    sd.update(extra or {})
    return sd


def test_wise_ft_endpoints_and_buffers():
    a, b = _sd(0), _sd(1)
    assert all(torch.equal(wise_ft(a, b, 0.0)[k], a[k]) for k in a)
    assert torch.equal(wise_ft(a, b, 1.0)["w"], b["w"]) and torch.equal(wise_ft(a, b, 1.0)["steps"], a["steps"])
    mid = wise_ft(a, b, 0.25)
    assert torch.allclose(mid["w"], 0.75 * a["w"] + 0.25 * b["w"]) and torch.equal(mid["steps"], a["steps"])
    image_only = wise_ft(a, b, 1.0, keys=tower_selector("image", ["visual."]))
    assert torch.equal(image_only["visual.b"], b["visual.b"]) and torch.equal(image_only["w"], a["w"])


def test_soups_task_arithmetic_ties():
    a = _sd(0)
    soup = uniform_soup([a, {k: v.clone() for k, v in a.items()}, a])
    assert all(torch.equal(soup[k], a[k]) for k in a)
    b, c = _sd(1), _sd(2)
    assert torch.allclose(uniform_soup([a, b])["w"], (a["w"] + b["w"]) / 2)
    assert torch.allclose(task_arithmetic(a, [b])["w"], b["w"], atol=1e-6)
    assert torch.allclose(task_arithmetic(a, [b, c], scale=0.5)["w"], a["w"] + 0.5 * (b["w"] - a["w"] + c["w"] - a["w"]),
                          atol=1e-6)
    assert torch.allclose(ties_merge(a, [b], density=1.0)["w"], b["w"], atol=1e-6)
    tv = (b["w"] - a["w"]).flatten()
    kept = ties_merge(a, [b], density=0.25, per_tensor=True)["w"].flatten() - a["w"].flatten()
    assert (kept != 0).sum() == 3 and set(kept.nonzero().flatten().tolist()) == set(tv.abs().topk(3).indices.tolist())


def test_mismatched_checkpoints_give_a_clear_error():
    a = _sd(0)
    with pytest.raises(MergeError, match="key 'extra' is only in fine-tuned"):
        wise_ft(a, _sd(1, {"extra": torch.zeros(1)}), 0.5)
    with pytest.raises(MergeError, match="'w' has shape \\(4, 3\\) vs \\(3, 4\\)"):
        wise_ft(a, {**_sd(1), "w": torch.zeros(3, 4)}, 0.5)
    with pytest.raises(MergeError, match="at least one"):
        uniform_soup([])


def test_mismatched_architecture_checkpoint_file(tmp_path):
    tiny = build_model("tiny")
    other = build_backbone("timm", "resnet10t")
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(MergeError, match="cannot merge base and fine-tuned \\(other.pt\\): key .* different "
                                         "architectures"):
        load_finetuned_state(tmp_path / "other.pt", tiny)
    from microbench.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        load_finetuned_state(tmp_path / "missing.ckpt", tiny)


def test_paired_bootstrap_agrees_with_direct_resampling():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.6
    model = np.where(rng.random(400) < 0.2, ~base, base)  # 20 % of the answers flipped
    est = paired_bootstrap_delta(base, model, n_resamples=4000, seed=0)
    assert est.value == pytest.approx(model.mean() - base.mean())
    idx = rng.integers(0, 400, size=(4000, 400))  # resample items, the same ones for both models
    direct = model[idx].mean(1) - base[idx].mean(1)
    lo, hi = 2 * est.value - np.percentile(direct, 97.5), 2 * est.value - np.percentile(direct, 2.5)
    assert est.low == pytest.approx(lo, abs=0.008) and est.high == pytest.approx(hi, abs=0.008)
    # pairing matters: the unpaired interval is much wider
    unpaired = model[rng.integers(0, 400, (4000, 400))].mean(1) - base[rng.integers(0, 400, (4000, 400))].mean(1)
    assert np.percentile(unpaired, 97.5) - np.percentile(unpaired, 2.5) > 1.5 * (est.high - est.low)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_delta(base, model[:-1])


def _trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def _score(backbone, split="test"):
    dm = PerceptionDataModule("sample", transform=backbone.preprocess, split=split)
    scorer = ZeroShotScorer(backbone, progress=False)
    _trainer().test(scorer, datamodule=dm, verbose=False)
    return scorer.predictions


@pytest.fixture(scope="module")
def trained_base():
    """A tiny model that learned the sample contrastively (all datasets), so that forgetting is measurable."""
    L.seed_everything(0)
    bb = build_model("tiny")
    dm = LabelledDataModule("sample", transform=bb.preprocess, train_transform=bb.train_transform, batch_size=32,
                            drop_last_train=True)
    module = FineTuneModule(bb, objective="contrastive", lr=3e-3, weight_decay=0.05)
    L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0).fit(module, datamodule=dm)
    return {k: v.detach().clone() for k, v in bb.state_dict().items()}


def _destroyed(state, scale=0.5, seed=7):
    """A 'fine-tune' that wrecks the image tower."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g) * v.std()) if k.startswith("model.visual.") and
            v.is_floating_point() and v.ndim > 1 else v.clone() for k, v in state.items()}


@pytest.mark.slow
def test_sweep_equals_separate_evaluations(trained_base):
    bb = build_model("tiny")
    ft = _destroyed(trained_base, scale=0.3)
    dm = PerceptionDataModule("sample", transform=bb.preprocess, split="test")
    scorer = InterpolationScorer(bb, trained_base, ft, [0.0, 0.5, 1.0], progress=False)
    _trainer().test(scorer, datamodule=dm, verbose=False)
    for alpha, state in ((0.0, trained_base), (0.5, wise_ft(trained_base, ft, 0.5)), (1.0, ft)):
        ref_bb = build_model("tiny")
        ref_bb.load_state_dict(state)
        ref = _score(ref_bb)
        got = scorer.predictions_by_alpha[alpha]
        assert (got["pred_idx"].to_numpy() == ref["pred_idx"].to_numpy()).all(), alpha
        assert np.allclose(np.concatenate(got["scores"]), np.concatenate(ref["scores"]), atol=1e-5)


@pytest.mark.slow
def test_destructive_finetune_shows_significant_forgetting(trained_base, tmp_path, capsys):
    bb = build_model("tiny")
    ft = _destroyed(trained_base, scale=4.0)
    targets = ["kather_et_al_2016"]

    def make_dm(split):
        return PerceptionDataModule("sample", transform=bb.preprocess, split=split)

    study = write_report(run_study(bb, trained_base, ft, make_dm=make_dm, out_dir=tmp_path / "study",
                                   target_datasets=targets, spec=StudySpec(alphas=[0, 0.5, 1], n_resamples=999),
                                   cache_dir=tmp_path / "cache", finetuned_path="destroyed"), tmp_path / "study")
    bars = capsys.readouterr().err  # the sweep has a progress bar per split (images × models)
    assert "forgetting study, val split: 3 models" in bars and "forgetting study, test split: 3 models" in bars
    test = study["splits"]["test"]["models"]
    d = test["finetuned"]["supported/all"]["delta"]
    base_acc = test["base"]["supported/all"]["acc"]["value"]
    assert d["value"] < 0 and d["high"] < 0 and d["significant"], (base_acc, d)  # significantly worse
    # α = 0 reproduces the base exactly, α = 1 the fine-tuned model exactly
    base_bb = build_model("tiny")
    base_bb.load_state_dict(trained_base)
    base_preds = _score(base_bb)
    assert test["base"]["all/all"]["acc"]["value"] == pytest.approx(base_preds["correct"].mean(), abs=0)
    ft_bb = build_model("tiny")
    ft_bb.load_state_dict(ft)
    ft_preds = _score(ft_bb)
    assert test["alpha=1.00"]["all/all"]["acc"]["value"] == pytest.approx(ft_preds["correct"].mean(), abs=0)
    assert test["base"]["all/all"]["delta"]["value"] == 0.0
    # report files, and the base came from the cache the second time
    for f in ("forgetting.json", "forgetting.md", "alpha_sweep.png", "dataset_deltas.png"):
        assert (tmp_path / "study" / f).exists(), f
    assert study["selection"]["alpha"] in (0.0, 0.5, 1.0)
    again = run_study(bb, trained_base, ft, make_dm=make_dm, out_dir=tmp_path / "study2", target_datasets=targets,
                      spec=StudySpec(alphas=[0, 1], n_resamples=99), cache_dir=tmp_path / "cache")
    assert again["splits"]["test"]["sweep"]["base_from_cache"] and again["splits"]["test"]["sweep"]["models"] == 1
    assert again["splits"]["test"]["models"]["base"]["all/all"]["acc"]["value"] == \
        test["base"]["all/all"]["acc"]["value"]


@pytest.mark.slow
def test_merge_methods_in_one_study_match_wise_ft_alone_and_separate_evaluations(trained_base, tmp_path):
    """Five methods in one study, every image decoded once; WiSE-FT's numbers are the same as in a
    study of WiSE-FT alone; a LiNeS point equals the separately evaluated LiNeS model; every method gets its
    normalized accuracies, selection, curve area with a CI, and the change by metadata axis."""
    import pandas as pd

    from microbench.studies.merging import lines
    from microbench.studies.tradeoff import select_trade_off

    bb = build_model("tiny")
    ft = _destroyed(trained_base, scale=1.0)
    torch.save(_destroyed(trained_base, scale=1.0, seed=8), tmp_path / "second_seed.pt")
    targets = ["kather_et_al_2016", "acevedo_et_al_2020"]

    def make_dm(split):
        return PerceptionDataModule("sample", transform=bb.preprocess, split=split)

    methods = ("wise_ft", "lines", "ties_trim", "dare", "model_stock")
    spec = StudySpec(alphas=[0, 0.5, 1], n_resamples=199, methods=methods,
                     options={"dare": {"seeds": [0, 1]}, "model_stock": {"finetuned": [str(tmp_path / "second_seed.pt")]}})
    study = write_report(run_study(bb, trained_base, ft, make_dm=make_dm, out_dir=tmp_path / "all",
                                   target_datasets=targets, spec=spec), tmp_path / "all")
    alone = run_study(bb, trained_base, ft, make_dm=make_dm, out_dir=tmp_path / "alone", target_datasets=targets,
                      spec=StudySpec(alphas=[0, 0.5, 1], n_resamples=199))
    for split in ("val", "test"):
        assert study["splits"][split]["models"] == alone["splits"][split]["models"]  # the same numbers
        sweep = study["splits"][split]["sweep"]
        # 13 models: base, fine-tune, WiSE-FT 0.5, LiNeS 0 and 0.5, TIES 0.5 and 1, DARE 2 seeds x 2, Model Stock 2
        assert sweep["models"] == 13 and sweep["decoded_images"] == sweep["images"] == study["splits"][split]["images"]
    assert study["methods"]["wise_ft"]["selection"] == alone["selection"]
    # a LiNeS point of the sweep is the LiNeS model evaluated on its own
    ref_bb = build_model("tiny")
    ref_bb.load_state_dict(lines(trained_base, ft, 0.5, ref_bb.residual_block_depths()))
    ref = _score(ref_bb)
    got = pd.read_parquet(tmp_path / "all" / "predictions" / "lines_alpha=0.50.parquet")
    assert (got["pred_idx"].to_numpy() == ref["pred_idx"].to_numpy()).all()
    assert np.allclose(np.concatenate(got["scores"].to_list()), np.concatenate(ref["scores"].to_list()), atol=1e-5)
    test = study["splits"]["test"]["models"]
    assert test["finetuned"]["normalized"]["target"] == 1.0 and test["base"]["normalized"]["control"] == 1.0
    for name in methods:
        m = study["methods"][name]
        assert set(m["splits"]["test"]) == {"alpha=0.00", "alpha=0.50", "alpha=1.00"}
        n = m["splits"]["test"]["alpha=0.50"]["normalized"]
        want = m["splits"]["test"]["alpha=0.50"]["target/fine"]["acc"]["value"] / \
            test["finetuned"]["target/fine"]["acc"]["value"]
        assert n["target"] == pytest.approx(want)
        assert m["chosen_test"] == m["splits"]["test"][f"alpha={m['selection']['alpha']:.2f}"]
        assert set(m["vs_finetuned"]) == {"target/fine", "supported/all"}
    dare = study["methods"]["dare"]
    assert dare["paths"] == ["dare[seed=0]", "dare[seed=1]"]
    seeds = dare["splits"]["test"]["alpha=1.00"]["seeds"]
    per_seed = [v["supported/all"] for v in seeds["per_seed"].values()]
    assert dare["splits"]["test"]["alpha=1.00"]["supported/all"]["acc"]["value"] == pytest.approx(np.mean(per_seed))
    assert seeds["spread"]["supported/all"]["n_seeds"] == 2
    areas = study["areas"]
    if areas["undefined"] is None:
        assert set(areas["areas"]) == set(methods) and len(areas["pairs"]) == 10
        for a in areas["areas"].values():
            assert 0 <= a["low"] <= a["value"] <= a["high"] <= 1
    assert {"domain", "modality", "institution"} <= set(study["axes"])
    entry = next(iter(study["axes"]["modality"].values()))
    assert "finetuned" in entry and f"lines α={study['methods']['lines']['selection']['alpha']:.2f}" in entry
    md = (tmp_path / "all" / "forgetting.md").read_text()
    assert "## Merge methods side by side" in md and "## What was forgotten, by μ-Bench's metadata" in md
    for name in methods:
        assert f"| {name}" in md
    # the trade-off rule: argmax of 2 x normalized target + normalized control on val
    traded = run_study(bb, trained_base, ft, make_dm=make_dm, out_dir=tmp_path / "traded", target_datasets=targets,
                       spec=StudySpec(alphas=[0, 0.5, 1], n_resamples=99, selection="trade_off"))
    val = {float(k.split("=")[1]): v for k, v in traded["methods"]["wise_ft"]["splits"]["val"].items()}
    assert traded["selection"]["alpha"] == select_trade_off(val)["alpha"]
    assert "trade-off" in traded["selection"]["rule"]


@pytest.mark.slow
def test_forgetting_cli_on_a_trained_checkpoint(tmp_path, cfg_train, cfg_forgetting):
    """train (demo settings, short) → src/forgetting.py on its last checkpoint."""
    from microbench.tasks.registry import forgetting, train

    metrics, _ = train(cfg_train([
        "experiment=demo", "trainer.max_epochs=3", "forgetting.enabled=false", "eval_in_domain=false",
        f"paths.output_dir={tmp_path / 'train'}", f"checkpoint_dir={tmp_path / 'ckpt'}"]))
    record, objects = forgetting(cfg_forgetting([
        f"finetuned={metrics['last_checkpoint']}", "study.alphas=[0,0.5,1]", "bootstrap.n_resamples=199",
        f"paths.output_dir={tmp_path / 'study'}", f"study.result_cache={tmp_path / 'cache'}",
        "study.feature_probe=true"]))
    study = objects["study"]
    assert study["target_datasets"] == ["acevedo_et_al_2020", "kather_et_al_2016", "nirschl_et_al_2018"]
    assert record.task == "forgetting" and record["chosen_alpha"] == study["selection"]["alpha"]
    assert record.headline["fine-tuned/supported"] == study["splits"]["test"]["models"]["finetuned"]["supported/all"][
        "acc"]
    rec = json.loads((tmp_path / "study" / "forgetting.json").read_text())
    assert set(rec["splits"]) == {"val", "test"} and rec["finetuned_record"]["objective"] == "contrastive"
    assert "target/fine" in rec["chosen_test"] and (tmp_path / "study" / "alpha_sweep.png").exists()
    # study.feature_probe=true: the probes of base, fine-tune and chosen model, with the verdicts
    fp = rec["feature_probe"]
    assert fp["models"][0] == "base" and "finetuned" in fp["verdicts"] and set(fp["pooled"]) == {"target", "supported"}
    assert "## Features or alignment?" in (tmp_path / "study" / "forgetting.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), [
    ([], "error: 1 config problem(s), nothing was run: finetuned is required: pass finetuned=<a .ckpt written by "
         "src/train.py"),
    (["finetuned=/no/such.ckpt"], "error: finetuned=/no/such.ckpt does not exist"),
])
def test_forgetting_cli_bad_input_is_one_line(tmp_path, overrides, message):
    import os

    res = run_cli(["src/forgetting.py", *overrides, f"paths.output_dir={tmp_path}"],
                         cwd=REPO, timeout=180, env=dict(os.environ))
    assert res.returncode == 2, res.stderr[-1500:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message)


# --- the embedded default demonstrates the finding -----------------------------------------------------------------

@pytest.mark.slow
def test_the_demo_recipe_gains_on_its_target_forgets_elsewhere_and_alpha_wins_part_back(tmp_path, cfg_train):
    """`python src/train.py experiment=demo` as the Quick start runs it (its fixed seed, every setting), read back
    from the report it wrote."""
    from microbench.tasks.registry import train

    record, _ = train(cfg_train(["experiment=demo", f"paths.output_dir={tmp_path / 'out'}",
                                 f"checkpoint_dir={tmp_path / 'ck'}", f"paths.root_dir={tmp_path}",
                                 "+trainer.enable_progress_bar=false"]))
    study = json.loads((tmp_path / "out" / "forgetting" / "forgetting.json").read_text())
    assert study["base"]["initialization"] == "generalist"
    test = study["splits"]["test"]["models"]
    ft, chosen = test["finetuned"], study["chosen_test"]
    gain = ft["target/fine"]["delta"]
    loss = ft["supported/all"]["delta"]
    assert gain["low"] > 0, gain  # α = 1 gains on its target, paired 95 % CI excluding 0
    assert loss["high"] < 0, loss  # ... and loses on the supported datasets, CI excluding 0
    # the α chosen on val keeps most of the target gain (the configured rule, on val) and, on test, wins back part
    # of the supported loss
    val = study["splits"]["val"]["models"]
    a = study["selection"]["alpha"]
    assert 0 < a < 1
    keep = float(record["config"]["study"]["selection"]["keep_target_gain"])
    assert val[f"alpha={a:.2f}"]["target/fine"]["delta"]["value"] >= keep * val["finetuned"]["target/fine"]["delta"][
        "value"] - 1e-9
    assert chosen["target/fine"]["delta"]["value"] >= 0.5 * gain["value"]
    assert chosen["supported/all"]["acc"]["value"] > ft["supported/all"]["acc"]["value"]
    md = (tmp_path / "out" / "forgetting" / "forgetting.md").read_text()
    top = md.split("| model |")[0]
    assert "**What happened.**" in top and "gained +" in top and "forgot " in top and "wins back" in top
    assert "Warning" not in md
    assert (tmp_path / ".cache" / "bases").is_dir()  # the generalist base, cached for the next run


def test_a_random_init_base_is_called_out_at_the_top_of_the_report(tmp_path, cfg_train):
    from microbench.tasks.registry import train

    train(cfg_train(["experiment=demo", "model=tiny", "trainer.max_epochs=2", "study.alphas=[0,1]",
                     "eval_in_domain=false", f"paths.output_dir={tmp_path / 'out'}",
                     f"checkpoint_dir={tmp_path / 'ck'}", f"paths.root_dir={tmp_path}",
                     "+trainer.enable_progress_bar=false"]))
    md = (tmp_path / "out" / "forgetting" / "forgetting.md").read_text()
    assert md.splitlines()[2].startswith("> **Warning: the base model is random-init**")


def _study(base_acc: float, base_low: float, chance: float, init: str = "pretrained") -> dict:
    def entry(v, dv, low=None, high=None, sig=False):
        return {"acc": {"value": v, "low": v if low is None else low, "high": v}, "delta": {
            "value": dv, "low": dv if low is None else dv - 0.01, "high": dv if high is None else high,
            "significant": sig}}
    models = {"base": {"target/fine": entry(0.5, 0.0), "supported/all": entry(base_acc, 0.0, low=base_low)},
              "finetuned": {"target/fine": entry(0.7, 0.2, sig=True), "supported/all": entry(0.2, -0.05, sig=True)},
              "alpha=0.50": {"target/fine": entry(0.65, 0.15), "supported/all": entry(0.22, -0.03)}}
    return {"base": {"initialization": init}, "selection": {"alpha": 0.5},
            "splits": {"test": {"models": models, "chance": {"supported": chance}}}}


def test_a_base_at_chance_is_called_out_and_the_words_follow_the_numbers():
    from microbench.studies.report import findings

    words = findings(_study(base_acc=0.25, base_low=0.18, chance=0.2))
    assert words[0].startswith("> **Warning: the base model is at chance on the supported datasets** (25.0 %, "
                               "chance 20.0 %)")
    assert "gained +20.0 points" in words[1] and "forgot 5.0 points" in words[1]
    assert "keeps +15.0 of the +20.0-point target gain (75 %)" in words[2] and "wins back 2.0 of the 5.0" in words[2]
    assert not findings(_study(base_acc=0.25, base_low=0.22, chance=0.2))[0].startswith(">")


@pytest.mark.slow
def test_the_generalist_base_is_built_once_and_reused(tmp_path, caplog):
    import logging

    from microbench.models.generalist import build_generalist

    spec = {"kind": "open_clip", "name": "microbench-tiny", "pretrained": None, "seed": 0}
    torch.manual_seed(123)
    with caplog.at_level(logging.INFO, logger="microbench.models.generalist"):
        first = build_generalist(spec, epochs=1, cache_dir=str(tmp_path))
    after_building = torch.rand(3)
    assert "building the generalist base once" in caplog.text
    caplog.clear()
    torch.manual_seed(123)
    with caplog.at_level(logging.INFO, logger="microbench.models.generalist"):
        again = build_generalist(spec, epochs=1, cache_dir=str(tmp_path))
    assert "from the cache" in caplog.text and again.fingerprint() == first.fingerprint()
    assert torch.equal(torch.rand(3), after_building)  # the run goes on the same, built now or read from the cache
    assert first.fingerprint() != build_model("tiny").fingerprint()  # trained, not the random init
    assert first.family == "contrastive" and first.source["generalist"]["epochs"] == 1
    other = build_generalist(spec, epochs=2, cache_dir=str(tmp_path))  # another recipe, another entry
    assert other.fingerprint() != first.fingerprint() and len(list(tmp_path.glob("*/model.pt"))) == 2
    # a damaged cache entry is said and rebuilt (the same weights), never a traceback or a half-loaded base
    (cached,) = [p for p in tmp_path.glob("*/model.pt") if (p.parent / "recipe.json").read_text().count('"epochs": 1')]
    cached.write_bytes(b"not a torch file")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="microbench.models.generalist"):
        rebuilt = build_generalist(spec, epochs=1, cache_dir=str(tmp_path))
    assert "cannot be read" in caplog.text and rebuilt.fingerprint() == first.fingerprint()
    assert build_generalist(spec, epochs=1, cache_dir=str(tmp_path)).fingerprint() == first.fingerprint()


# --- W&B-tracked, read back from what the offline run wrote --------------------------------------------------------

def _one_run(folder, wait_for: str = "forgetting/finetuned/supported_all_delta"):
    """The offline run and what it holds; W&B's service process may still be flushing its last summary record
    when ``finish()`` returns on a loaded machine, so the log is read again (up to 20 s) until ``wait_for`` is in."""
    import time

    from wandb_files import offline_run

    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    deadline = time.monotonic() + 20
    run = offline_run(runs[0])
    while wait_for not in run["summary"] and time.monotonic() < deadline:
        time.sleep(0.5)
        run = offline_run(runs[0])
    return runs[0], run


def _check_study_in_run(path, run, study):
    sweep = [f for f in run["files"] if f.startswith("files/media/table/forgetting/alpha_sweep_")]
    datasets = [f for f in run["files"] if f.startswith("files/media/table/forgetting/datasets_")]
    images = [f for f in run["files"] if f.startswith("files/media/images/forgetting/plots_")]
    assert len(sweep) == 1 and len(datasets) == 1 and len(images) == 2, run["files"]
    table = json.loads((path / sweep[0]).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert [r["alpha"] for r in rows] == study["alphas"]
    test = study["splits"]["test"]["models"]
    for r in rows:
        m = test[f"alpha={r['alpha']:.2f}"]
        assert r["target_fine_acc"] == pytest.approx(m["target/fine"]["acc"]["value"])
        assert r["supported_all_delta_low"] == pytest.approx(m["supported/all"]["delta"]["low"])
        assert r["chosen"] == (r["alpha"] == study["selection"]["alpha"])
    ds = json.loads((path / datasets[0]).read_text())
    assert len(ds["data"]) == len(test["finetuned"]["datasets"]) and "finetuned_delta" in ds["columns"]
    assert run["summary"]["forgetting/chosen_alpha"] == study["selection"]["alpha"]
    assert run["summary"]["forgetting/finetuned/supported_all_delta"] == pytest.approx(
        test["finetuned"]["supported/all"]["delta"]["value"])
    assert run["config"]["forgetting"]["alphas"] == study["alphas"]
    # the methods side by side and the change by metadata axis: the same tables as forgetting.md
    methods = [f for f in run["files"] if f.startswith("files/media/table/forgetting/methods_")
               and not f.startswith("files/media/table/forgetting/methods_sweep_")]
    assert any(f.startswith("files/media/table/forgetting/methods_sweep_") for f in run["files"])
    axes = [f for f in run["files"] if f.startswith("files/media/table/forgetting/axes_")]
    assert len(methods) == 1 and len(axes) == 1, run["files"]
    table = json.loads((path / methods[0]).read_text())
    rows = {r[0]: dict(zip(table["columns"], r, strict=True)) for r in table["data"]}
    assert list(rows) == list(study["methods"]) == run["config"]["forgetting"]["methods"]
    for name, r in rows.items():
        assert r["alpha"] == study["methods"][name]["selection"]["alpha"]
        area = (study["areas"]["areas"].get(name) or {}).get("value")
        assert r["area"] == pytest.approx(area) if area is not None else r["area"] is None
    if study["areas"]["pairs"]:
        assert any(f.startswith("files/media/table/forgetting/area_tests_") for f in run["files"])


@pytest.mark.slow
def test_a_study_is_tracked_in_wandb_after_fit_and_from_src_forgetting(tmp_path, cfg_train, cfg_forgetting):
    from microbench.tasks.registry import forgetting, train

    common = ["logger=wandb", "logger.wandb.offline=true"]
    record, _ = train(cfg_train(["experiment=demo", *common, "trainer.max_epochs=3", "study.alphas=[0,0.5,1]",
                                 "eval_in_domain=false",
                                 f"paths.output_dir={tmp_path / 'fit'}", f"checkpoint_dir={tmp_path / 'ck'}",
                                 "+trainer.enable_progress_bar=false"]))
    path, run = _one_run(tmp_path / "fit")
    assert run["run"]["group"] == "demo" and run["run"]["job_type"] == "demo" and "microbench" in run["run"]["tags"]
    assert run["config"]["objective"] == "contrastive"  # the fit's own hyperparameters, beside the study's
    _check_study_in_run(path, run, json.loads((tmp_path / "fit" / "forgetting" / "forgetting.json").read_text()))

    # the same study from src/forgetting.py: its own run, in the group of the fit that wrote the checkpoint
    _, objects = forgetting(cfg_forgetting([
        "base=tiny_generalist", f"finetuned={record['last_checkpoint']}", *common, "study.alphas=[0,0.5,1]",
        "study=compare", "study.options.dare.seeds=[0]", f"paths.output_dir={tmp_path / 'study'}"]))
    path, run = _one_run(tmp_path / "study")
    assert run["run"]["group"] == "demo" and run["run"]["job_type"] == "forgetting"
    assert run["config"]["finetuned"] == record["last_checkpoint"] and run["config"]["study"]["towers"] == "both"
    _check_study_in_run(path, run, objects["study"])


# --- every rank of the run takes its shard -------------------------------------------------------------------------

@pytest.mark.slow
def test_the_study_is_sharded_over_ddp_ranks_and_identical_to_one_process(tmp_path, cfg_forgetting):
    """After a 2-process fit (`src/train.py experiment=demo trainer=ddp_sim trainer.strategy=ddp`: one process per
    rank, as trainer=ddp starts them on GPUs) and from src/forgetting.py with 1 and 2 (spawned) processes: the same
    predictions and every number of forgetting.json; each image decoded exactly once across the ranks. The fit
    itself once stopped on unused parameters (CE) and, with that fixed, hung: rank 0 ran the study alone while its
    Trainers and scorers waited in collectives for rank 1 (distributed.local_only); with one process per rank it
    hung again in the in-domain zero-shot evaluation that rank 0 runs alone. Its study is read back from
    forgetting.json only as this run's (its run id)."""
    import pandas as pd

    from microbench.tasks.registry import forgetting

    methods = "study.methods=[wise_ft,ties_trim]"  # a second merge method's points are sharded too
    res = run_cli(["src/train.py", "experiment=demo", "trainer=ddp_sim", "trainer.strategy=ddp", "trainer.max_epochs=3",
                   "+trainer.enable_progress_bar=false", methods, "study.alphas=[0,0.5,1]", "bootstrap.n_resamples=99",
                   "study.result_cache=null", f"paths.output_dir={tmp_path / 'fit'}", f"checkpoint_dir={tmp_path / 'ck'}"],
                  cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("forgetting report: ") and "chosen α" in last
    record = json.loads((tmp_path / "fit" / "train_metrics.json").read_text())
    fit_study = json.loads((tmp_path / "fit" / "forgetting" / "forgetting.json").read_text())
    assert fit_study["run_id"] and record["forgetting"]["chosen_alpha"] == fit_study["selection"]["alpha"]
    assert record["environment"]["world_size"] == 2 and record["in_domain_zero_shot"]["fine"]["n"] > 0  # rank 0 alone
    folders = {"after fit, 2 ranks": tmp_path / "fit" / "forgetting"}
    for trainer in ("cpu", "ddp_sim"):
        forgetting(cfg_forgetting([
            "base=tiny_generalist", f"finetuned={record['last_checkpoint']}", f"trainer={trainer}", methods,
            "study.alphas=[0,0.5,1]",
            "study.result_cache=null", f"paths.output_dir={tmp_path / trainer}"]))
        folders[f"src/forgetting.py trainer={trainer}"] = tmp_path / trainer
    studies = {k: json.loads((f / "forgetting.json").read_text()) for k, f in folders.items()}
    one = studies["src/forgetting.py trainer=cpu"]
    for name, study in studies.items():
        ranks = 1 if name.endswith("cpu") else 2
        for split in ("val", "test"):
            sweep = study["splits"][split]["sweep"]
            assert sweep["ranks"] == ranks and sweep["decoded_images"] == study["splits"][split]["images"], name
            assert len(sweep["decoded_per_rank"]) == ranks and min(sweep["decoded_per_rank"]) > 0
            assert study["splits"][split]["models"] == one["splits"][split]["models"], (name, split)
        assert study["selection"] == one["selection"] and study["chosen_test"] == one["chosen_test"], name
        assert study["methods"] == one["methods"] and study["areas"] == one["areas"], name
        assert study["axes"] == one["axes"], name
        pd.testing.assert_frame_equal(pd.read_parquet(folders[name] / "predictions" / "ties_trim_alpha=0.50.parquet"),
                                      pd.read_parquet(tmp_path / "cpu" / "predictions" / "ties_trim_alpha=0.50.parquet"))
        for a in ("0.00", "0.50", "1.00"):
            pd.testing.assert_frame_equal(pd.read_parquet(folders[name] / "predictions" / f"alpha={a}.parquet"),
                                          pd.read_parquet(tmp_path / "cpu" / "predictions" / f"alpha={a}.parquet"))
    assert not list((tmp_path / "ddp_sim").glob(".study-*.json"))  # rank 0's hand-over file, read and removed


@pytest.mark.parametrize(("override", "message"), [("model.epochs=0", "model.epochs must be an integer >= 1"),
                                                   ("model.lr=0", "model.lr must be a number > 0")])
def test_an_impossible_generalist_recipe_is_one_line(tmp_path, cfg_train, override, message):
    from microbench.errors import UserError
    from microbench.tasks.registry import train

    with pytest.raises(UserError, match=message):
        train(cfg_train(["experiment=demo", override, f"paths.root_dir={tmp_path}"]))
    assert not (tmp_path / ".cache" / "bases").exists()  # nothing built, nothing cached


# --- feature forgetting beside zero-shot forgetting ----------------------------------------------------------------

@pytest.mark.slow
def test_feature_probes_tell_lost_alignment_from_damaged_features(trained_base, tmp_path):
    """study.feature_probe=true re-fits every dataset's linear probe on the base's, the fine-tune's and the chosen
    model's frozen image features. A 'fine-tune' that scrambles the text tower alone forgets zero-shot but leaves the
    image features bit-identical: every probe Δ is exactly 0 and the verdict is lost alignment. One that zeroes the
    image tower's weights damages the features: the probe drops, CI below 0. The probes are the linear-probe task's
    own full-data probes on the same features (pinned), the pooled Δ the mean of the paired per-row changes."""
    from microbench.models.features import compute_image_features
    from microbench.models.linear_probe import dataset_probe_data, row_to_image_index, sweep
    from microbench.studies.feature_probe import feature_forgetting

    bb = build_model("tiny")
    g = torch.Generator().manual_seed(3)
    text_only = {k: (torch.randn(v.shape, generator=g) * v.std() if not k.startswith("model.visual.") and
                     v.is_floating_point() and v.ndim > 1 else v.clone()) for k, v in trained_base.items()}
    targets = ["kather_et_al_2016"]

    def make_dm(split):
        return PerceptionDataModule("sample", transform=bb.preprocess, split=split)

    study = write_report(run_study(bb, trained_base, text_only, make_dm=make_dm, out_dir=tmp_path / "study",
                                   target_datasets=targets, spec=StudySpec(alphas=[0, 0.5, 1], n_resamples=999,
                                                                           feature_probe=True),
                                   finetuned_path="text-scrambled"), tmp_path / "study")
    fp = study["feature_probe"]
    assert fp["models"][:2] == ["base", "finetuned"] and not fp["skipped"]
    for name, e in fp["datasets"].items():
        for m in fp["models"][1:]:
            assert e[m]["delta"]["value"] == 0.0 and e[m]["acc"]["value"] == e["base"]["acc"]["value"], (name, m)
    v = fp["verdicts"]["finetuned"]
    assert v["zero_shot_delta"]["high"] < 0 and v["probe_delta"]["value"] == 0.0, v
    assert v["verdict"] == "alignment lost, features intact"
    md = (tmp_path / "study" / "forgetting.md").read_text()
    assert "## Features or alignment?" in md and "**alignment lost, features intact**" in md
    assert "**Features or alignment.**" in md.split("| model |")[0]  # said at the top too
    # the probes are the linear-probe task's full-data probes (one seed) on the same features
    bb.load_state_dict(trained_base)
    dm = make_dm("all")
    dm.setup()
    feats = compute_image_features(bb, dm, progress=False)[0]
    r2i = row_to_image_index(dm)
    for name, e in fp["datasets"].items():
        data, _ = dataset_probe_data(dm, feats, name, r2i)
        ref = sweep(data, shots="full", seeds=[0])
        assert e["base"]["acc"]["value"] == pytest.approx(ref["acc"]["mean"], abs=1e-6), name  # torchmetrics: float32
        assert e["models"]["base"]["weight_decay"] == ref["weight_decay"][0]

    zeroed = {k: (torch.zeros_like(v) if k.startswith("model.visual.") and v.is_floating_point() and v.ndim > 1
                  else v.clone()) for k, v in trained_base.items()}
    from microbench.data.datamodule import UniqueImageDataset

    decoded, getitem = [], UniqueImageDataset.__getitem__

    def counting(self, i):
        decoded.append(int(self.rep_rows[i]))
        return getitem(self, i)

    all_dm = make_dm("all")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UniqueImageDataset, "__getitem__", counting)
        out = feature_forgetting(bb, {"base": lambda: bb.load_state_dict(trained_base),
                                      "zeroed": lambda: bb.load_state_dict(zeroed)}, all_dm, set(targets),
                                 n_resamples=999)
    assert sorted(decoded) == sorted(all_dm.images("all").rep_row.tolist())  # each image decoded once, 2 models
    d = out["pooled"]["supported"]["zeroed"]["delta"]
    assert d["high"] < 0 and d["significant"], d
    n = {k: e["n_test"] for k, e in out["datasets"].items() if not e["target"]}
    per_ds = {k: out["datasets"][k]["zeroed"]["delta"]["value"] for k in n}
    assert d["value"] == pytest.approx(sum(per_ds[k] * n[k] for k in n) / sum(n.values()), abs=1e-12)
    from microbench.studies.feature_probe import verdict
    assert verdict(d, None) == "features damaged"
