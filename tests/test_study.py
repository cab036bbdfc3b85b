"""The forgetting study, method by method: one study config, image-tower keys of every adapter, merge
methods as plug-ins walked by the one-decode sweep, the trade-off metrics (normalized accuracy, the trade-off rule,
the curve area with a paired bootstrap CI, the change by metadata axis)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import build_model, run_cli
from microbench.errors import UserError
from microbench.models.backbones import build_backbone
from microbench.models.backbones.base import Backbone, BackboneError
from microbench.studies.forgetting import StudySpec, tower_keys
from microbench.studies.merging import (
    MergeError,
    add_vector,
    dare,
    lines,
    model_stock,
    residual_block_depths,
    task_vector,
    ties_merge,
    wise_ft,
)
from microbench.studies.methods import METHODS, MergeInputs, method_paths
from microbench.studies.sweep import WeightInterpolator
from microbench.studies.tradeoff import curve_areas, pareto_area, select_trade_off

ROOT = Path(__file__).resolve().parents[1]


# --- image-tower keys of every adapter --------------------------------------------------------------------------

def _moved(bb: Backbone, towers: str) -> set[str]:
    """The keys a study with ``towers`` changes: interpolate to a fine-tune that moved every float tensor."""
    base = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    ft = {k: v + 1 if v.is_floating_point() else v.clone() for k, v in base.items()}
    WeightInterpolator(bb, base, ft, tower_keys(bb, towers)).set_alpha(1.0)
    after = bb.state_dict()
    return {k for k in base if not torch.equal(after[k], base[k])}


def test_towers_image_moves_exactly_the_image_keys_of_open_clip():
    bb = build_model("tiny")
    image = {k for k in bb.state_dict() if k.startswith("model.visual.")}
    assert set(bb.image_tower_keys()) == image and image
    assert _moved(bb, "image") == {k for k in image if bb.state_dict()[k].is_floating_point()}
    assert len(_moved(build_model("tiny"), "both")) > len(image)


def test_towers_image_on_a_transformers_clip_selects_its_vision_keys(tmp_path):
    """The image tower was found by module identity, which the HF adapter builds anew on every
    call, so 0 of its keys were selected and every θ(α) was the base."""
    from test_backbones import _tiny_hf_clip

    bb = build_backbone("hf", str(_tiny_hf_clip(tmp_path / "hf")))
    keys = bb.state_dict()
    image = {k for k in keys if k.startswith(("model.vision_model.", "model.visual_projection."))}
    assert len(keys) == 78 and 0 < len(image) < 78
    assert set(bb.image_tower_keys()) == image
    assert _moved(bb, "image") == {k for k in image if keys[k].is_floating_point()}
    depths = bb.residual_block_depths()  # LiNeS reads each tower's own depth
    assert depths["model.vision_model.encoder.layers.1.mlp.fc1.weight"] == (1, 2)
    assert depths["model.text_model.encoder.layers.0.mlp.fc1.weight"] == (0, 2)


def test_towers_image_on_timm_is_the_whole_model():
    bb = build_backbone("timm", "resnet10t", pretrained=False)
    assert set(bb.image_tower_keys()) == set(bb.state_dict())
    assert _moved(bb, "image") == {k for k, v in bb.state_dict().items() if v.is_floating_point()}


def test_a_plugin_says_its_image_tower_or_towers_image_is_one_line():
    from plugin_backbone import PluginBackbone

    plain = PluginBackbone()  # implements no image_tower(): the study cannot know which weights to move
    with pytest.raises(BackboneError, match="does not say which of its weights are the image tower.*towers=both"):
        tower_keys(plain, "image")

    class WithTower(PluginBackbone):
        def image_tower(self):
            return self.inner.model.visual  # the default image_tower_keys() matches its tensors by identity

    bb = WithTower()
    image = {k for k in bb.state_dict() if k.startswith("inner.model.visual.")}
    assert set(bb.image_tower_keys()) == image and image
    assert _moved(bb, "image") == {k for k in image if bb.state_dict()[k].is_floating_point()}

    class Empty(PluginBackbone):
        def image_tower_keys(self):
            return []

    with pytest.raises(MergeError, match="towers=image selects none of the .* weights"):
        tower_keys(Empty(), "image")


def test_a_study_on_a_transformers_model_with_towers_image_reports_the_real_change(tmp_path):
    from microbench.data.datamodule import PerceptionDataModule
    from microbench.studies.forgetting import run_study
    from test_backbones import _tiny_hf_clip

    bb = build_backbone("hf", str(_tiny_hf_clip(tmp_path / "hf")))
    base = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ft = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if k.startswith("model.vision_model.") and
          v.is_floating_point() and v.ndim > 1 else v.clone() for k, v in base.items()}
    study = run_study(bb, base, ft, make_dm=lambda split: PerceptionDataModule("sample", transform=bb.preprocess,
                                                                               split=split),
                      out_dir=tmp_path / "study", target_datasets=["kather_et_al_2016"],
                      spec=StudySpec(alphas=[0, 1], towers="image", n_resamples=99))
    assert study["settings"]["tower_keys"] == len(bb.image_tower_keys()) > 0
    # the text tower does not move: its prompts are encoded once per split, not once per model
    sweeps = {split: study["splits"][split]["sweep"] for split in ("val", "test")}
    assert sweeps["test"]["models"] == 2  # the prompts: encoded once (one text tower), reused by the test split
    assert (sweeps["val"]["text_encodings"], sweeps["test"]["text_encodings"]) == (1, 0)
    import pandas as pd

    p0 = pd.read_parquet(tmp_path / "study" / "predictions" / "alpha=0.00.parquet")
    p1 = pd.read_parquet(tmp_path / "study" / "predictions" / "alpha=1.00.parquet")
    assert not np.allclose(np.concatenate(p0["scores"].to_list()), np.concatenate(p1["scores"].to_list()))
    assert (p0["pred_idx"] != p1["pred_idx"]).any()  # the image tower's change shows in the predictions


# --- every method's path against a direct computation -----------------------------------------------------------

class Toy(nn.Module):
    """Two towers of residual blocks, a projection outside the blocks and a non-float buffer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.visual = nn.Module()
        self.visual.resblocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.visual.proj = nn.Parameter(torch.randn(4, 2))
        self.text = nn.Module()
        self.text.resblocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.register_buffer("steps", torch.tensor([3]))
        self.to(dtype)


def _states(dtype):
    torch.manual_seed(0)
    base = Toy(dtype).state_dict()
    out = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        out.append({k: (v.float() + 0.3 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point()
                    else v + seed for k, v in base.items()})
    return {k: v.clone() for k, v in base.items()}, out[0], out[1]


def _direct(name, base, ft, ft2, alpha, keys, depths):
    """Each method's θ(α) computed directly from its published definition (merging.py's pure merges)."""
    if name == "wise_ft":
        return wise_ft(base, ft, alpha, keys)
    if name == "lines":
        return lines(base, ft, alpha, depths, keys)
    if name == "ties_trim":
        end = ties_merge(base, [ft], density=0.2, keys=keys)
        return add_vector(base, task_vector(base, end, keys), alpha)
    if name == "dare":
        return add_vector(base, dare(task_vector(base, ft, keys), 0.5, seed=0), alpha)
    end = model_stock(base, [ft, ft2], keys)
    return add_vector(base, task_vector(base, end, keys), alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("towers", ["both", "image"])
@pytest.mark.parametrize("name", ["wise_ft", "lines", "ties_trim", "dare", "model_stock"])
def test_each_method_walks_its_published_path(name, towers, dtype):
    base, ft, ft2 = _states(dtype)
    keys = None if towers == "both" else (lambda k: k.startswith("visual."))
    depths = residual_block_depths(base, image_keys=[k for k in base if k.startswith("visual.")])
    options = {"dare": {"seeds": [0]}}.get(name)
    paths = method_paths(name, MergeInputs(base, ft, keys, depths, [ft2]), options)
    assert len(paths) == 1
    model = Toy(dtype)
    model.load_state_dict(base)
    interp = WeightInterpolator(model, paths[0].start, paths[0].end, keys)
    for alpha in (0.0, 0.3, 1.0):
        interp.set_alpha(alpha)
        got, want = model.state_dict(), _direct(name, base, ft, ft2, alpha, keys, depths)
        for k in base:
            assert got[k].dtype == base[k].dtype
            tol = 1e-6 if dtype == torch.float32 else 2e-2
            assert torch.allclose(got[k].float(), want[k].float(), atol=tol, rtol=tol), (name, alpha, k)
        assert torch.equal(got["steps"], base["steps"])  # a non-float buffer stays the base's
        if towers == "image":
            assert all(torch.equal(got[k], base[k]) for k in base if k.startswith("text."))


def test_dare_gives_one_path_per_seed_and_lines_needs_blocks():
    base, ft, _ = _states(torch.float32)
    paths = method_paths("dare", MergeInputs(base, ft), {"seeds": [0, 1, 2]})
    assert [p.label for p in paths] == ["dare[seed=0]", "dare[seed=1]", "dare[seed=2]"]
    assert not torch.equal(paths[0].end["visual.proj"], paths[1].end["visual.proj"])
    with pytest.raises(UserError, match="no residual blocks"):
        method_paths("lines", MergeInputs(base, ft, depths={}))
    with pytest.raises(UserError, match="second fine-tune.*study.options.model_stock.finetuned"):
        method_paths("model_stock", MergeInputs(base, ft))


def test_the_configs_options_are_the_methods_defaults_and_each_method_has_a_yaml():
    common = yaml.safe_load((ROOT / "configs/study/common.yaml").read_text())
    assert set(common["options"]) == set(METHODS)
    for name, method in METHODS.items():
        want = {k: list(v) if isinstance(v, tuple) else v for k, v in method.defaults.items()}
        assert common["options"][name] == want, name
        assert yaml.safe_load((ROOT / f"configs/study/{name}.yaml").read_text())["methods"] == [name]


# --- one study configuration ------------------------------------------------------------------------------------

def test_one_reader_of_the_study_config_for_train_and_forgetting(cfg_train, cfg_forgetting):
    from microbench.tasks.study import study_spec

    for cfg in (cfg_train(["experiment=demo", "study=compare", "study.selection.rule=trade_off",
                           "bootstrap.n_resamples=123"]),
                cfg_forgetting(["study=compare", "study.selection.rule=trade_off", "bootstrap.n_resamples=123"])):
        spec = study_spec(cfg)
        assert list(spec.methods) == ["wise_ft", "lines", "ties_trim", "dare"]
        assert spec.selection == "trade_off" and spec.n_resamples == 123 and spec.trade_off_weight == 2.0
        assert spec.method_options("dare") == {"p": 0.5, "seeds": [0, 1, 2]}
        assert spec.result_cache.endswith(".cache/results")
    default = study_spec(cfg_train([]))
    assert list(default.methods) == ["wise_ft"] and default.alphas == [round(a / 10, 1) for a in range(11)]
    with pytest.raises(UserError, match="unknown merge method 'tiez'; known: wise_ft, lines"):
        study_spec(cfg_forgetting(["study.methods=[tiez]"]))
    with pytest.raises(UserError, match="study.options.dare.q is not an option of dare; its options: p, seeds"):
        study_spec(cfg_forgetting(["+study.options.dare.q=1"]))
    with pytest.raises(UserError, match="study.selection.rule must be one of keep_gain, trade_off"):
        study_spec(cfg_forgetting(["study.selection.rule=best"]))
    with pytest.raises(UserError, match="study.towers must be one of both, image, got 'text'"):
        study_spec(cfg_forgetting(["study.towers=text"]))


def test_the_in_domain_check_reads_the_root_bootstrap(cfg_train):
    from microbench.tasks.trainer import bootstrap_settings

    assert bootstrap_settings(cfg_train(["bootstrap.n_resamples=77"])) == {"n_resamples": 77, "confidence": 0.95,
                                                                            "seed": 0}
    text = (ROOT / "src/microbench/tasks/finetune.py").read_text()
    assert "9999" not in text  # no literal bootstrap settings left in the in-domain check


def test_old_override_names_keep_working_with_one_line_naming_the_new(capsys):
    from microbench.entry import rename_overrides

    argv = ["x", "forgetting.alphas=[0,1]", "forgetting.keep_target_gain=0.5", "+forgetting.n_resamples=9",
            "forgetting.enabled=true"]
    rename_overrides(argv, "train")
    assert argv[1:] == ["study.alphas=[0,1]", "study.selection.keep_target_gain=0.5", "+bootstrap.n_resamples=9",
                        "forgetting.enabled=true"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[0].startswith("note: forgetting.alphas= is now study.alphas=")
    argv = ["x", "alphas=[0,1]", "towers=image", "selection.keep_target_gain=0.9", "result_cache=null"]
    rename_overrides(argv, "forgetting")
    assert argv[1:] == ["study.alphas=[0,1]", "study.towers=image", "study.selection.keep_target_gain=0.9",
                        "study.result_cache=null"]


@pytest.mark.slow
def test_an_old_name_on_the_command_line_reaches_the_new_key(tmp_path):
    res = run_cli(["src/forgetting.py", "finetuned=missing.ckpt", "alphas=[a,b]",
                          f"paths.output_dir={tmp_path}"], cwd=ROOT, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines[0].startswith("note: alphas= is now study.alphas=")
    assert lines[-1].startswith("error: 1 config problem(s), nothing was run: study.alphas must be numbers "
                                "(interpolation weights), got 'a'")


# --- the trade-off metrics --------------------------------------------------------------------------------------

def test_pareto_area_of_the_box():
    base, ft = (0.0, 1.0), (1.0, 0.0)

    def area(*pts):
        x, y = np.array([base[0], ft[0], *[p[0] for p in pts]]), np.array([base[1], ft[1], *[p[1] for p in pts]])
        return pareto_area(x, y)

    assert area() == pytest.approx(0.5)  # the straight line between base and fine-tune
    assert area((0.5, 0.5)) == pytest.approx(0.5)  # a point on it adds nothing
    assert area((1.0, 1.0)) == pytest.approx(1.0)  # all of the gain, nothing forgotten
    assert area((0.8, 0.6)) == pytest.approx(0.8 * 1 - 0.8 * 0.4 / 2 + 0.2 * 0.6 / 2)  # two trapezoids
    assert area((0.8, 0.6), (0.5, 0.3)) == pytest.approx(area((0.8, 0.6)))  # a dominated point is ignored


def test_curve_areas_are_paired_over_the_same_resamples():
    rng = np.random.default_rng(0)
    n_t, n_s = 400, 600
    base_t, ft_t = rng.random(n_t) < 0.4, rng.random(n_t) < 0.9
    base_s, ft_s = rng.random(n_s) < 0.7, rng.random(n_s) < 0.3
    mid_t = np.where(rng.random(n_t) < 0.5, base_t, ft_t)  # a good method keeps the gain and wins back half
    good_t, good_s = ft_t, np.where(rng.random(n_s) < 0.5, base_s, ft_s)
    lin_t, lin_s = mid_t, np.where(rng.random(n_s) < 0.5, base_s, ft_s)
    target = np.stack([base_t, ft_t, good_t, lin_t]).astype(float)
    supported = np.stack([base_s, ft_s, good_s, lin_s]).astype(float)
    out = curve_areas(target, supported, {"good": [2], "linear": [3], "same": [2]}, n_resamples=999, seed=0)
    good, lin = out["areas"]["good"], out["areas"]["linear"]
    assert good["low"] <= good["value"] <= good["high"] and good["value"] > 0.7
    assert 0.35 < lin["value"] < 0.65
    pair = out["pairs"]["good vs linear"]
    assert pair["significant"] and pair["value"] == pytest.approx(good["value"] - lin["value"]) and pair["p"] < 0.05
    same = out["pairs"]["good vs same"]
    assert same["value"] == 0 and same["low"] == 0 and same["high"] == 0 and same["p"] == 1.0
    none = curve_areas(target[[0, 0, 2]], supported[[0, 0, 2]], {"x": [2]}, n_resamples=9)
    assert none["areas"] == {} and "did not gain" in none["undefined"]


def test_the_trade_off_rule_is_lines_argmax():
    val = {0.0: {"normalized": {"target": 0.5, "control": 1.0}}, 0.5: {"normalized": {"target": 0.9, "control": 0.8}},
           1.0: {"normalized": {"target": 1.0, "control": 0.5}}}
    assert select_trade_off(val)["alpha"] == 0.5  # 2·0.9 + 0.8 = 2.6 > 2.5 (α = 1) > 2.0 (α = 0)
    assert select_trade_off(val, weight=10)["alpha"] == 1.0


def test_seed_means_get_scipys_interval_when_every_image_has_one_item():
    """DARE's seed means (k/S per item) go through the clustered bootstrap: with one item per image it is the
    ordinary percentile bootstrap, scipy's."""
    from scipy import stats

    from microbench.metrics.bootstrap import ClusterBootstrap

    rng = np.random.default_rng(1)
    values = rng.integers(0, 4, 500) / 3  # per-item correctness averaged over 3 seeds
    ours = ClusterBootstrap(np.arange(500), 9999, seed=0).estimates(values, {"all": np.ones(500, bool)})["all"]
    ref = stats.bootstrap((values,), np.mean, n_resamples=9999, method="percentile",
                          rng=np.random.default_rng(0)).confidence_interval
    assert ours.value == pytest.approx(values.mean())
    assert ours.low == pytest.approx(ref.low, abs=0.006) and ours.high == pytest.approx(ref.high, abs=0.006)


def test_model_stock_refuses_the_same_fine_tune_twice_and_reads_the_depths_of_open_clip(tmp_path):
    from microbench.studies.forgetting import _sweep_plan

    bb = build_model("tiny")
    base = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    ft = {k: v + 0.1 if v.is_floating_point() else v.clone() for k, v in base.items()}
    torch.save(ft, tmp_path / "same.pt")
    spec = StudySpec(alphas=[0, 1], methods=("model_stock",), options={"model_stock": {"finetuned": [
        str(tmp_path / "same.pt")]}})
    with pytest.raises(UserError, match="holds the same weights as the fine-tune studied"):
        _sweep_plan(bb, base, ft, spec, None, [0.0, 1.0])
    depths = bb.residual_block_depths()
    visual = {v for k, v in depths.items() if k.startswith("model.visual.")}
    text = {v for k, v in depths.items() if not k.startswith("model.visual.")}
    n_visual = len(bb.model.visual.transformer.resblocks)
    assert visual == {(i, n_visual) for i in range(n_visual)}
    assert text == {(i, len(bb.model.transformer.resblocks)) for i in range(len(bb.model.transformer.resblocks))}


def test_an_old_name_in_a_config_file_is_one_line_not_ignored(cfg_train, cfg_forgetting):
    """An experiment YAML written for the old layout (forgetting.alphas: ...) would be merged and silently unused."""
    from omegaconf import open_dict

    from microbench.tasks.study import study_spec

    cfg = cfg_train(["experiment=demo"])
    with open_dict(cfg):
        cfg.forgetting.alphas = [0, 1]
    with pytest.raises(UserError, match=r"forgetting.alphas in the config has moved to study.alphas"):
        study_spec(cfg)
    cfg = cfg_forgetting([])
    with open_dict(cfg):
        cfg.towers = "image"
    with pytest.raises(UserError, match=r"towers in the config has moved to study.towers"):
        study_spec(cfg)


def test_a_new_merge_method_is_one_function(tmp_path):
    """A plug-in method registered at run time is swept, summarised, selected and reported like the built-in ones."""
    from microbench.data.datamodule import PerceptionDataModule
    from microbench.studies.forgetting import run_study
    from microbench.studies.methods import MergePath, merge_method
    from microbench.studies.report import write_report

    @merge_method("halfway", "to the midpoint of base and fine-tune")
    def _halfway(inputs, share: float = 0.5):
        return [MergePath("halfway", "halfway", inputs.base, wise_ft(inputs.base, inputs.finetuned, share))]

    try:
        bb = build_model("tiny")
        base = {k: v.detach().clone() for k, v in bb.state_dict().items()}
        ft = {k: v * 1.5 if v.is_floating_point() else v.clone() for k, v in base.items()}
        study = write_report(run_study(bb, base, ft, out_dir=tmp_path, target_datasets=["kather_et_al_2016"],
                                       make_dm=lambda s: PerceptionDataModule("sample", transform=bb.preprocess,
                                                                              split=s),
                                       spec=StudySpec(alphas=[0, 0.5, 1], n_resamples=49,
                                                      methods=("wise_ft", "halfway"),
                                                      options={"halfway": {"share": 0.5}})), tmp_path)
        # halfway at α = 1 is WiSE-FT at α = 0.5: the same predictions
        import pandas as pd

        h = pd.read_parquet(tmp_path / "predictions" / "halfway_alpha=1.00.parquet")
        w = pd.read_parquet(tmp_path / "predictions" / "alpha=0.50.parquet")
        assert (h["pred_idx"].to_numpy() == w["pred_idx"].to_numpy()).all()
        assert np.allclose(np.concatenate(h["scores"].to_list()), np.concatenate(w["scores"].to_list()), atol=1e-5)
        assert study["methods"]["halfway"]["options"] == {"share": 0.5}
        assert study["splits"]["test"]["sweep"]["models"] == 5  # base, fine-tune, WiSE-FT 0.5, halfway 0.5 and 1
        assert "| halfway" in (tmp_path / "forgetting.md").read_text()
    finally:
        METHODS.pop("halfway")


def test_a_localization_study_sweeps_wise_ft_only(tmp_path):
    from microbench.studies.forgetting import run_study

    bb = build_model("tiny")
    state = bb.state_dict()
    with pytest.raises(UserError, match="a localization head's study sweeps WiSE-FT only"):
        run_study(bb, state, state, make_dm=None, out_dir=tmp_path, target_datasets=["x"],
                  spec=StudySpec(methods=("wise_ft", "lines")), localization=lambda *a: {})


def test_curve_area_intervals_resample_images_with_all_their_questions():
    rng = np.random.default_rng(0)
    n_t, n_s = 300, 400
    base_t, ft_t = rng.random(n_t) < 0.4, rng.random(n_t) < 0.9
    base_s, ft_s = rng.random(n_s) < 0.7, rng.random(n_s) < 0.3
    mid_t, mid_s = np.where(rng.random(n_t) < 0.5, base_t, ft_t), np.where(rng.random(n_s) < 0.5, base_s, ft_s)
    target = np.stack([base_t, ft_t, mid_t]).astype(float)
    supported = np.stack([base_s, ft_s, mid_s]).astype(float)
    one = curve_areas(target, supported, {"m": [2]}, n_resamples=1999, seed=0)["areas"]["m"]
    k = 4  # every image asked k questions, answered alike
    dup_t, dup_s = np.repeat(target, k, axis=1), np.repeat(supported, k, axis=1)
    clustered = curve_areas(dup_t, dup_s, {"m": [2]}, n_resamples=1999, seed=0,
                            target_clusters=np.repeat(np.arange(n_t), k),
                            supported_clusters=np.repeat(np.arange(n_s), k))
    iid = curve_areas(dup_t, dup_s, {"m": [2]}, n_resamples=1999, seed=0)["areas"]["m"]
    c = clustered["areas"]["m"]
    assert c["value"] == pytest.approx(one["value"]) and "image-clustered" in clustered["interval"]
    assert c["high"] - c["low"] == pytest.approx(one["high"] - one["low"], rel=0.2)
    assert (iid["high"] - iid["low"]) < 0.7 * (c["high"] - c["low"])  # i.i.d. items: too narrow by about √k


def test_the_area_p_value_agrees_with_the_interval():
    rng = np.random.default_rng(4)
    for trial in range(6):
        n_t, n_s = 60, 80
        base_t, ft_t = rng.random(n_t) < 0.4, rng.random(n_t) < 0.9
        base_s, ft_s = rng.random(n_s) < 0.7, rng.random(n_s) < 0.3
        a_t, a_s = np.where(rng.random(n_t) < 0.6, ft_t, base_t), np.where(rng.random(n_s) < 0.5 + 0.05 * trial,
                                                                            base_s, ft_s)
        b_t, b_s = np.where(rng.random(n_t) < 0.5, ft_t, base_t), np.where(rng.random(n_s) < 0.4, base_s, ft_s)
        out = curve_areas(np.stack([base_t, ft_t, a_t, b_t]).astype(float),
                          np.stack([base_s, ft_s, a_s, b_s]).astype(float), {"a": [2], "b": [3]}, 999, seed=trial)
        if out["undefined"]:
            continue
        pair = out["pairs"]["a vs b"]
        assert pair["significant"] == (pair["p"] < 0.05), pair


def test_the_study_intervals_are_image_clustered_and_paired_across_models(tmp_path):
    """Image-clustered intervals in the forgetting study: every group and dataset interval resamples images with all their
    questions (named in the record), shared by all models; wider than the i.i.d. interval where an image has
    several questions; the base against itself exactly 0."""
    import pandas as pd

    from microbench.data.datamodule import PerceptionDataModule
    from microbench.metrics.bootstrap import (
        CLUSTERED,
        ClusterBootstrap,
        clustered_bootstrap,
        paired_bootstrap_delta,
    )
    from microbench.studies.forgetting import run_study, summarize_model

    bb = build_model("tiny")
    base = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ft = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.ndim > 1
          else v.clone() for k, v in base.items()}
    study = run_study(bb, base, ft, out_dir=tmp_path, target_datasets=["kather_et_al_2016"],
                      make_dm=lambda s: PerceptionDataModule("sample", transform=bb.preprocess, split=s),
                      spec=StudySpec(alphas=[0, 1], n_resamples=1999))
    sweeps = {split: study["splits"][split]["sweep"] for split in ("val", "test")}
    # towers=both: the text tower moves too (one encoding per model), then reused by the test split
    assert (sweeps["val"]["text_encodings"], sweeps["test"]["text_encodings"]) == (2, 0)
    test = study["splits"]["test"]["models"]
    for key in ("supported/all", "all/coarse", "target/fine"):
        assert test["finetuned"][key]["delta"]["interval"] == CLUSTERED and test["finetuned"][key]["acc"]["interval"]
        d = test["base"][key]["delta"]
        assert (d["value"], d["low"], d["high"], d["significant"]) == (0.0, 0.0, 0.0, False)
    assert all(0 <= v["acc"]["low"] <= v["acc"]["high"] <= 1 for v in test["finetuned"].values()
               if isinstance(v, dict) and "acc" in v and isinstance(v["acc"], dict) and "low" in v["acc"])
    p0 = pd.read_parquet(tmp_path / "predictions" / "alpha=0.00.parquet")
    p1 = pd.read_parquet(tmp_path / "predictions" / "alpha=1.00.parquet")
    cap0, cap1 = (p[p["source"] == "captions"] for p in (p0, p1))
    coarse = (cap0["question_type"] != "classification").to_numpy()  # 5 coarse questions per image
    iid = paired_bootstrap_delta(cap0["correct"].to_numpy()[coarse], cap1["correct"].to_numpy()[coarse], 1999)
    clustered = test["finetuned"]["all/coarse"]["delta"]
    assert clustered["value"] == pytest.approx(iid.value)
    assert clustered["high"] - clustered["low"] > 1.2 * (iid.high - iid.low)
    again = summarize_model(p0, p1, {"kather_et_al_2016"}, 1999)["all/coarse"]["delta"]  # its own resampler
    assert again["interval"] == CLUSTERED and again["value"] == pytest.approx(iid.value)
    # the shared resampler agrees with the one-statistic clustered bootstrap
    cap = p1[p1["source"] == "captions"]
    values, images = cap["correct"].to_numpy(float), cap["image_id"].to_numpy()
    shared = ClusterBootstrap(images, 4000, seed=1).estimates(values, {"all": np.ones(len(cap), bool)})["all"]
    single = clustered_bootstrap(values, images, 4000, seed=2)
    assert shared.value == pytest.approx(single.value)
    assert shared.low == pytest.approx(single.low, abs=0.02) and shared.high == pytest.approx(single.high, abs=0.02)


@pytest.mark.parametrize(("options", "message"), [
    ({"dare": {"p": 1.5}}, "study.options.dare.p must be a number in \\[0, 1\\), got 1.5"),
    ({"dare": {"seeds": []}}, "study.options.dare.seeds must be an integer or a non-empty list, each an integer, "
                              "got \\[\\]"),
    ({"ties_trim": {"density": 0}}, "study.options.ties_trim.density must be a number in \\(0, 1\\], got 0"),
    ({}, "model_stock needs a second fine-tune"),
    ({"model_stock": {"finetuned": ["no/such.ckpt"]}}, "finetuned: no/such.ckpt is not a file"),
])
def test_bad_method_options_are_one_line_when_the_study_is_configured(options, message):
    with pytest.raises(UserError, match=message):
        StudySpec(methods=("wise_ft", "ties_trim", "dare", "model_stock"), options=options)


def test_a_study_a_model_cannot_do_stops_the_fit_before_it_starts(tmp_path, cfg_train):
    """towers=image on a plug-in without an image tower, or a bad option, used to surface after the whole fit."""
    from microbench.tasks.registry import train

    common = ["experiment=demo", "forgetting.enabled=true", f"paths.output_dir={tmp_path / 'out'}",
              f"checkpoint_dir={tmp_path / 'ck'}"]
    with pytest.raises(UserError, match="study.options.dare.p must be"):
        train(cfg_train([*common, "model=tiny", "study=dare", "study.options.dare.p=2"]))
    with pytest.raises(BackboneError, match="does not say which of its weights are the image tower"):
        train(cfg_train([*common, "model=plugin", "model._target_=plugin_backbone.PluginBackbone",
                         "study.towers=image"]))
    assert not (tmp_path / "ck").exists()  # nothing was fitted


def test_prompts_encoded_once_under_towers_image_give_the_same_predictions(monkeypatch):
    from microbench.data.datamodule import PerceptionDataModule
    from microbench.models.inference import TEXT_CACHE
    from microbench.studies.sweep import InterpolationScorer

    bb = build_model("tiny")
    base = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    ft = {k: v * 1.3 if v.is_floating_point() else v.clone() for k, v in base.items()}
    keys = tower_keys(bb, "image")
    dm = PerceptionDataModule("sample", transform=bb.preprocess, split="test")
    dm.setup("test")
    runs = {}
    for cached in (True, False):  # the text cache (keyed by the text tower's weights), and no cache at all
        if not cached:
            monkeypatch.setattr(TEXT_CACHE, "lookup", lambda key, texts, encode: encode(list(texts)))
        scorer = InterpolationScorer(bb, base, ft, [0.0, 0.5, 1.0], keys=keys, progress=False)
        runs[cached] = (scorer.sweep(dm), scorer.text_encodings)
    assert runs[False][1] == 3 and runs[True][1] == 1
    for a in (0.0, 0.5, 1.0):
        got, ref = runs[True][0][a], runs[False][0][a]
        assert (got["pred_idx"].to_numpy() == ref["pred_idx"].to_numpy()).all()
        assert np.array_equal(np.concatenate(got["scores"].to_list()), np.concatenate(ref["scores"].to_list()))
