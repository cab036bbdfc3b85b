"""The merges of ``microbench.studies.merging`` pinned to their papers: TIES (Yadav et al., 2023) against an
independent implementation of the paper's algorithm (global trim, sign election, disjoint mean), DARE (Yu et al.,
2024), Model Stock (Jang et al., 2024, eq. 4), LiNeS (Wang et al., ICLR 2025); plus the dtype rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from microbench.studies.merging import (
    MergeError,
    dare,
    lines,
    lines_scales,
    model_stock,
    model_stock_ratios,
    residual_block_depths,
    task_arithmetic,
    task_vector,
    ties_merge,
    top_k_mask,
    trim,
    uniform_soup,
    wise_ft,
)


def _state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(5, 4, generator=g).to(dtype), "a.bias": torch.randn(4, generator=g).to(dtype),
            "b.weight": (0.1 * torch.randn(3, 3, generator=g)).to(dtype), "empty": torch.zeros(0, dtype=dtype),
            "steps": torch.tensor([seed], dtype=torch.long), "ids": torch.arange(3)}


def _reference_ties(base, finetuned, density, scale=1.0):
    """The paper's Algorithm 1, written independently with numpy over the flattened float tensors: keep the
    ⌈density·n⌉ largest magnitudes of each whole task vector (stable sort: earlier positions win ties), elect
    γ = sgn(Σ trimmed), average the entries agreeing with γ, add λ times that to the base."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    flat_b = np.concatenate([base[k].double().numpy().ravel() for k in keys])
    taus = []
    for ft in finetuned:
        tau = np.concatenate([ft[k].double().numpy().ravel() for k in keys]) - flat_b
        order = np.argsort(-np.abs(tau), kind="stable")
        kept = np.zeros_like(tau)
        m = math.ceil(density * tau.size)
        kept[order[:m]] = tau[order[:m]]
        taus.append(kept)
    t = np.stack(taus)
    gamma = np.sign(t.sum(0))
    agree = (np.sign(t) == gamma) & (t != 0)
    merged = (t * agree).sum(0) / np.maximum(agree.sum(0), 1)
    out, at = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = flat_b[at:at + n].reshape(tuple(base[k].shape)) + scale * merged[at:at + n].reshape(tuple(base[k].shape))
        at += n
    return out


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
def test_ties_follows_the_paper_global_trim(density):
    base = _state(0)
    fts = [_state(s) for s in (1, 2, 3)]
    got = ties_merge(base, fts, density=density, scale=0.7)
    ref = _reference_ties(base, fts, density, scale=0.7)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k].double().numpy(), v, atol=1e-6, err_msg=k)
    assert torch.equal(got["steps"], base["steps"]) and torch.equal(got["ids"], base["ids"])
    assert got["empty"].shape == (0,)  # an empty float tensor no longer crashes


def test_ties_keeps_exactly_ceil_k_n_entries_with_the_documented_tie_rule():
    vec = {"x": torch.tensor([1.0, -1.0, 0.5, 1.0]), "y": torch.tensor([-1.0, 0.25])}
    kept = trim(vec, 0.5)  # n = 6 → exactly 3 kept: the four |1| tie, the three at the earliest positions win
    assert kept["x"].tolist() == [1.0, -1.0, 0.0, 1.0] and kept["y"].tolist() == [0.0, 0.0]
    assert int(top_k_mask(torch.ones(7), math.ceil(0.2 * 7)).sum()) == 2
    assert top_k_mask(torch.ones(7), 2).tolist() == [True, True] + [False] * 5
    # per-tensor trimming (the named option) keeps ⌈k·n_k⌉ of each tensor instead
    per = trim(vec, 0.5, per_tensor=True)
    assert per["x"].tolist() == [1.0, -1.0, 0.0, 0.0] and per["y"].tolist() == [-1.0, 0.0]


def test_ties_global_and_per_tensor_differ_where_a_tensor_is_small():
    base = {"big": torch.zeros(10), "small": torch.zeros(10)}
    ft = {"big": torch.arange(1, 11).float(), "small": 0.01 * torch.arange(1, 11).float()}
    glob = ties_merge(base, [ft], density=0.2)
    per = ties_merge(base, [ft], density=0.2, per_tensor=True)
    assert int((glob["small"] != 0).sum()) == 0 and int((glob["big"] != 0).sum()) == 4
    assert int((per["small"] != 0).sum()) == 2 and int((per["big"] != 0).sum()) == 2


def test_ties_an_elected_sign_of_zero_gives_zero():
    base = {"w": torch.zeros(3)}
    out = ties_merge(base, [{"w": torch.tensor([1.0, 2.0, 0.0])}, {"w": torch.tensor([-1.0, 1.0, 0.0])}], density=1)
    assert out["w"].tolist() == [0.0, 1.5, 0.0]


def test_float64_is_merged_in_float64_and_bf16_in_float32():
    base = {"w": torch.tensor([1.0 + 1e-12], dtype=torch.float64)}
    ft = {"w": torch.tensor([1.0 + 3e-12], dtype=torch.float64)}
    for got in (wise_ft(base, ft, 0.5)["w"], uniform_soup([base, ft])["w"], task_arithmetic(base, [ft], 0.5)["w"]):
        assert got.dtype == torch.float64 and abs(float(got) - (1.0 + 2e-12)) < 1e-15  # float32 would give 1.0
    b16, f16 = _state(0, torch.bfloat16), _state(1, torch.bfloat16)
    got = wise_ft(b16, f16, 0.3)
    want = torch.lerp(b16["a.weight"].float(), f16["a.weight"].float(), 0.3).to(torch.bfloat16)
    assert got["a.weight"].dtype == torch.bfloat16 and torch.equal(got["a.weight"], want)


def test_wise_ft_at_one_keeps_the_base_non_float_buffers():
    base, ft = _state(0), _state(1)
    out = wise_ft(base, ft, 1.0)
    assert torch.equal(out["a.weight"], ft["a.weight"]) and torch.equal(out["steps"], base["steps"])


def test_dare_is_the_published_drop_and_rescale():
    g = torch.Generator().manual_seed(0)
    vec = {"w": torch.randn(200, 500, generator=g), "empty": torch.zeros(0)}
    out = dare(vec, p=0.5, seed=3)
    kept = out["w"] != 0
    assert abs(float(kept.float().mean()) - 0.5) < 0.01  # each entry dropped with probability p
    assert torch.equal(out["w"][kept], vec["w"][kept] / 0.5)  # survivors rescaled by 1 / (1 − p)
    assert torch.equal(dare(vec, 0.5, seed=3)["w"], out["w"]) and not torch.equal(dare(vec, 0.5, seed=4)["w"], out["w"])
    assert torch.equal(dare(vec, 0.0, seed=1)["w"], vec["w"])
    mean = torch.stack([dare({"w": vec["w"][:4, :50]}, 0.3, seed=s)["w"] for s in range(3000)]).mean(0)
    assert torch.allclose(mean, vec["w"][:4, :50], atol=0.12)  # unbiased: E[DARE(τ)] = τ
    with pytest.raises(MergeError, match="drop rate"):
        dare(vec, 1.0)


def test_model_stock_ratio_is_eq_4_of_the_paper():
    base = {"w": torch.zeros(2), "v": torch.zeros(2), "z": torch.zeros(2), "n": torch.tensor([7])}
    # task vectors at 60° on w (cos 0.5 → t = 2·0.5 / (0.5 + 1) = 2/3), orthogonal on v (t = 0), equal on z (t = 1)
    ft1 = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([1.0, 0.0]), "z": torch.tensor([2.0, 1.0]), "n": torch.tensor([1])}
    ft2 = {"w": torch.tensor([0.5, math.sqrt(3) / 2]), "v": torch.tensor([0.0, 3.0]), "z": torch.tensor([2.0, 1.0]),
           "n": torch.tensor([2])}
    t = model_stock_ratios(base, [ft1, ft2])
    assert t["w"] == pytest.approx(2 / 3) and t["v"] == pytest.approx(0.0) and t["z"] == pytest.approx(1.0)
    merged = model_stock(base, [ft1, ft2])
    assert torch.allclose(merged["w"], 2 / 3 * (ft1["w"] + ft2["w"]) / 2)
    assert torch.allclose(merged["v"], torch.zeros(2)) and torch.allclose(merged["z"], ft1["z"])
    assert torch.equal(merged["n"], base["n"])
    with pytest.raises(MergeError, match="at least two fine-tunes"):
        model_stock(base, [ft1])


def test_residual_block_depths_of_every_adapter_layout():
    openclip = ["model.visual.conv1.weight", *[f"model.visual.transformer.resblocks.{i}.attn.in_proj_weight"
                                               for i in range(4)], "model.visual.proj",
                *[f"model.transformer.resblocks.{i}.mlp.c_fc.weight" for i in range(2)], "model.token_embedding.weight"]
    d = residual_block_depths(openclip, image_keys=[k for k in openclip if k.startswith("model.visual.")])
    assert d["model.visual.transformer.resblocks.3.attn.in_proj_weight"] == (3, 4)
    assert d["model.transformer.resblocks.1.mlp.c_fc.weight"] == (1, 2)
    assert "model.visual.proj" not in d and "model.token_embedding.weight" not in d
    hf = [f"model.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(3)] + \
        ["model.vision_model.pre_layrnorm.weight", "model.text_model.encoder.layers.0.mlp.fc1.weight"]
    d = residual_block_depths(hf, image_keys=hf[:4])
    assert d[hf[2]] == (2, 3) and d[hf[4]] == (0, 1) and hf[3] not in d
    resnet = ["model.conv1.weight", "model.layer1.0.conv1.weight", "model.layer1.1.conv1.weight",
              "model.layer2.0.conv1.weight", "model.fc.weight"]
    d = residual_block_depths(resnet, image_keys=resnet)
    assert [d[k] for k in resnet[1:4]] == [(0, 3), (1, 3), (2, 3)]
    assert residual_block_depths(["model.blocks.5.attn.qkv.weight"], ["model.blocks.5.attn.qkv.weight"]) == {
        "model.blocks.5.attn.qkv.weight": (0, 1)}


def test_lines_is_depth_linear_scaling_of_the_task_vector():
    keys = [*[f"visual.resblocks.{i}.w" for i in range(4)], "visual.proj", "text.resblocks.0.w", "text.resblocks.1.w"]
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(3, generator=g) for k in keys} | {"steps": torch.tensor([0])}
    ft = {k: torch.randn(3, generator=g) for k in keys} | {"steps": torch.tensor([5])}
    depths = residual_block_depths(keys, image_keys=keys[:5])
    alpha = 0.2
    got = lines(base, ft, alpha, depths)
    want_scale = {"visual.resblocks.0.w": 0.2, "visual.resblocks.1.w": 0.2 + 0.8 / 3, "visual.resblocks.2.w": 0.2 + 1.6 / 3,
                  "visual.resblocks.3.w": 1.0, "visual.proj": 0.2, "text.resblocks.0.w": 0.2, "text.resblocks.1.w": 1.0}
    assert lines_scales(keys, depths, alpha) == pytest.approx(want_scale)
    for k, s in want_scale.items():
        assert torch.allclose(got[k], base[k] + s * (ft[k] - base[k]), atol=1e-6), k
    assert torch.equal(got["steps"], base["steps"])
    at_one = lines(base, ft, 1.0, depths)
    assert all(torch.allclose(at_one[k], ft[k], atol=1e-6) for k in keys)


def test_task_vector_selection():
    base, ft = _state(0), _state(1)
    vec = task_vector(base, ft, keys=lambda k: k.startswith("a."))
    assert sorted(vec) == ["a.bias", "a.weight"]
