"""LoRA with peft: adapters on the towers, the first-step gradient check, adapter-only checkpoints that
every command taking a fine-tuned checkpoint merges into full weights."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli


def _tiny(cfg_train):
    from microbench.tasks.trainer import build_model

    return build_model(cfg_train(["experiment=demo"]).model)


def test_lora_adapts_the_attention_modules_and_mlps_of_the_image_tower_and_merges_exactly(cfg_train):
    """The default targets are every nn.MultiheadAttention (not its out_proj) and nn.Linear of the image tower; only
    the adapters train (r·(d_in + d_out) per linear map); merge_and_unload gives the base's key names and the adapted
    model's outputs; the merge rebuilt from base + adapter equals it; another base is refused in one line."""
    from torch import nn

    from microbench.errors import UserError
    from microbench.models import adapters

    bb = _tiny(cfg_train)
    base = {k: v.clone() for k, v in bb.state_dict().items()}
    image = {id(m) for m in bb.image_tower().modules()}
    mods = dict(bb.model.named_modules())
    spec = adapters.add_lora(bb, r=4, alpha=8)
    assert spec["targets"] and all(id(mods[t]) in image for t in spec["targets"])
    assert all(isinstance(mods[t], nn.MultiheadAttention | nn.Linear) and not t.endswith("out_proj")
               for t in spec["targets"])
    assert any(isinstance(mods[t], nn.MultiheadAttention) for t in spec["targets"])
    expected = 0
    for t in spec["targets"]:
        m = mods[t]
        if isinstance(m, nn.MultiheadAttention):  # peft: the packed in-projection (d → 3d) and the out-projection
            expected += 4 * (m.embed_dim + 3 * m.embed_dim) + 4 * (m.embed_dim + m.embed_dim)
        else:
            expected += 4 * (m.in_features + m.out_features)
    trainable = {n: p for n, p in bb.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable) and sum(p.numel() for p in trainable.values()) == expected
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    size = bb.model.visual.image_size
    x = torch.randn(3, 3, *(size if isinstance(size, tuple) else (size, size)), generator=gen)
    merged = adapters.merged_copy(bb)
    assert set(merged.state_dict()) == set(base) and adapters.is_adapted(bb) and not adapters.is_adapted(merged)
    with torch.no_grad():
        assert torch.allclose(bb.encode_image(x), merged.encode_image(x), atol=1e-5)
    changed = [k for k in base if not torch.equal(merged.state_dict()[k], base[k])]
    assert changed and all(k.startswith("model.visual.") for k in changed)
    rebuilt = adapters.merged_state(_tiny(cfg_train), spec, adapters.adapter_state(bb.state_dict()))
    assert all(torch.equal(rebuilt[k], merged.state_dict()[k]) for k in base)
    other = _tiny(cfg_train)
    with torch.no_grad():
        next(iter(other.parameters())).add_(1.0)
    with pytest.raises(UserError, match="its LoRA adapter was trained on base weights"):
        adapters.merged_state(other, spec, adapters.adapter_state(bb.state_dict()))
    both = adapters.add_lora(_tiny(cfg_train), text=True)["targets"]  # the text tower too (open_clip: transformer.*)
    assert any(t.startswith("transformer.resblocks.") for t in both) and set(spec["targets"]) < set(both)


@pytest.mark.parametrize("objective", ["ce", "contrastive"])
def test_an_adapter_that_gets_no_gradient_in_the_first_step_is_one_line(tmp_path, cfg_train, objective):
    """open_clip's MultiheadAttention calls F.linear(out_proj.weight, ...): LoRA on out_proj alone never trains.
    The fit stops in its first step with one line naming those modules (ce: the head trains, the adapters get no
    gradient; contrastive: nothing trainable reaches the loss)."""
    from microbench.errors import UserError
    from microbench.tasks.registry import train

    n = 2 if objective == "ce" else 4  # contrastive also adapts the text tower's two out_proj
    with pytest.raises(UserError, match=rf"module.adapter=lora: {n} adapted module\(s\) got no gradient in the first "
                                        r"step and would not train: \S*resblocks.0.attn.out_proj"):
        train(cfg_train(["experiment=demo", f"module.objective={objective}", "module.adapter=lora",
                         "module.lora.target_modules=[out_proj]", "trainer.max_epochs=1", "forgetting.enabled=false",
                         "eval_in_domain=false", f"checkpoint_dir={tmp_path / 'ck'}",
                         "+trainer.enable_progress_bar=false"]))


@pytest.mark.slow
def test_a_lora_fine_tune_is_studied_and_its_checkpoint_works_wherever_a_fine_tune_goes(tmp_path, cfg_train,
                                                                                        cfg_forgetting):
    """The demo with module.adapter=lora: the checkpoint holds the adapter alone (and the base's fingerprint), a
    fraction of a full one; the study after the fit and src/forgetting.py on the checkpoint give the same numbers;
    resuming checks the adapter fits."""
    from microbench.errors import UserError
    from microbench.tasks.registry import forgetting, train

    common = ["experiment=demo", "trainer.max_epochs=3", "eval_in_domain=false", "study.alphas=[0,0.5,1]",
              "bootstrap.n_resamples=99", "study.result_cache=null", "+trainer.enable_progress_bar=false"]
    rec, _ = train(cfg_train([*common, "module.adapter=lora", "module.lora.r=4", f"paths.output_dir={tmp_path / 'l'}",
                              f"checkpoint_dir={tmp_path / 'l' / 'ck'}"]))
    full, _ = train(cfg_train([*common, "forgetting.enabled=false", f"paths.output_dir={tmp_path / 'f'}",
                               f"checkpoint_dir={tmp_path / 'f' / 'ck'}"]))
    blob = torch.load(rec["last_checkpoint"], map_location="cpu", weights_only=False)
    assert blob["microbench"]["adapter"]["r"] == 4 and blob["microbench"]["adapter"]["base_fingerprint"]
    assert blob["state_dict"] and all("lora_" in k for k in blob["state_dict"])
    from pathlib import Path

    assert Path(rec["last_checkpoint"]).stat().st_size < 0.2 * Path(full["last_checkpoint"]).stat().st_size
    assert rec["trainable_parameters"] < 0.02 * full["trainable_parameters"]
    after_fit = json.loads((tmp_path / "l" / "forgetting" / "forgetting.json").read_text())
    _, objects = forgetting(cfg_forgetting(["base=tiny_generalist", f"finetuned={rec['last_checkpoint']}",
                                            "study.alphas=[0,0.5,1]", "study.result_cache=null", f"paths.output_dir={tmp_path / 's'}"]))
    for name in ("finetuned", "alpha=0.50"):
        for key in ("target/fine", "supported/all"):
            assert objects["study"]["splits"]["test"]["models"][name][key]["acc"]["value"] == pytest.approx(
                after_fit["splits"]["test"]["models"][name][key]["acc"]["value"], abs=1e-9), (name, key)
    ft = after_fit["splits"]["test"]["models"]["finetuned"]["supported/all"]["acc"]["value"]
    assert ft != after_fit["splits"]["test"]["models"]["base"]["supported/all"]["acc"]["value"]  # it trained
    with pytest.raises(UserError, match="the checkpoint's adapter differs from this run's"):
        train(cfg_train([*common, "forgetting.enabled=false", "trainer.max_epochs=4", f"ckpt_path={rec['last_checkpoint']}",
                         f"paths.output_dir={tmp_path / 'r'}", f"checkpoint_dir={tmp_path / 'r' / 'ck'}"]))


@pytest.mark.parametrize("kind", ["transformers", "timm"])
def test_lora_on_transformers_and_timm_towers_trains_every_adapter_and_merges_exactly(tmp_path, kind):
    """A random-init transformers CLIP (q/k/v/out projections, MLP fc1/fc2 of the vision tower) and a timm ViT
    (qkv, proj, fc1, fc2): every adapter gets a gradient in the first backward pass; the merge is exact; a ResNet
    (no linear layer in its blocks) is one line."""
    from microbench.errors import UserError
    from microbench.models import adapters
    from microbench.models.backbones import build_backbone
    from test_backbones import _tiny_hf_clip

    if kind == "transformers":
        bb = build_backbone("hf", str(_tiny_hf_clip(tmp_path / "hf")))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    else:
        bb = build_backbone("timm", "vit_tiny_patch16_224", pretrained=False)
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    base_keys = set(bb.state_dict())
    spec = adapters.add_lora(bb, r=2)
    assert spec["targets"] and not any("text" in t for t in spec["targets"])
    bb.encode_image(x).float().pow(2).sum().backward()
    assert adapters.silent_adapters(bb) == []
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        merged = adapters.merged_copy(bb)
        assert set(merged.state_dict()) == base_keys
        assert torch.allclose(bb.encode_image(x), merged.encode_image(x), atol=1e-4)
    with pytest.raises(UserError, match="no nn.Linear or nn.MultiheadAttention to adapt in the image tower of"):
        adapters.add_lora(build_backbone("timm", "resnet10t", pretrained=False))


@pytest.mark.slow
def test_one_command_compares_full_lora_and_lp_ft_fine_tuning_from_the_same_base(tmp_path):
    """`-m experiment=compare_recipes recipe=...` fine-tunes each recipe from the same base on the same
    target, studies each, and tabulates target gain vs supported loss with each study's paired CIs, trainable
    parameters and checkpoint sizes; `python -m microbench recipes <sweep>` rebuilds the same table."""
    import os

    from conftest import REPO

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    res = run_cli([str(REPO / "src" / "train.py"), "-m", "experiment=compare_recipes",
                          "recipe=full,lora_r4,lp_ft", "trainer.max_epochs=2", "study.alphas=[0,0.5,1]",
                          "bootstrap.n_resamples=99", "eval_in_domain=false", "study.result_cache=null",
                          f"paths.log_dir={tmp_path}", f"paths.checkpoint_dir={tmp_path / 'ck'}",
                          "+trainer.enable_progress_bar=false"], cwd=REPO, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "compare_recipes" / "multiruns").iterdir()
    assert res.stdout.strip().splitlines()[-1].startswith(f"recipes: {sweep / 'recipes' / 'recipes.md'} (3 recipes")
    table = json.loads((sweep / "recipes" / "recipes.json").read_text())
    rows = {r["recipe"]: r for r in table["recipes"]}
    assert set(rows) == {"full", "lora_r4", "lp_ft"}
    assert rows["lora_r4"]["adapter"] == "lora r=4" and rows["lp_ft"]["head_init"] == "probe"
    assert rows["lora_r4"]["trainable_parameters"] < rows["lp_ft"]["trainable_parameters"] < rows["full"][
        "trainable_parameters"]
    assert rows["lora_r4"]["checkpoint_bytes"] < 0.05 * rows["full"]["checkpoint_bytes"]
    for name, r in rows.items():
        study = json.loads((sweep / name / "forgetting" / "forgetting.json").read_text())
        ft = study["splits"]["test"]["models"]["finetuned"]
        assert r["finetuned"]["target"]["value"] == ft["target/fine"]["delta"]["value"]
        assert r["finetuned"]["supported"]["low"] == ft["supported/all"]["delta"]["low"]
        assert r["chosen_alpha"] == study["selection"]["alpha"]
        probe = study["feature_probe"]["verdicts"]["finetuned"]  # the experiment re-fits probes
        assert r["features"]["value"] == probe["probe_delta"]["value"] and r["features"]["verdict"] == probe["verdict"]
    md = (sweep / "recipes" / "recipes.md").read_text()
    assert "features Δ, probe (α=1) | verdict |" in md
    assert all(f"| {n} |" in md for n in rows) and (sweep / "recipes" / "recipes.png").stat().st_size > 0
    again = run_cli(["-m", "microbench", "recipes", str(sweep), "--out", str(tmp_path / "t")],
                           cwd=REPO, env=env, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "t" / "recipes.json").read_text())["recipes"] == table["recipes"]
    none = run_cli(["-m", "microbench", "recipes", str(tmp_path / "ck")], cwd=REPO,
                          env=env, timeout=120)
    assert none.returncode == 2 and "no fine-tune with a forgetting study under" in none.stderr
