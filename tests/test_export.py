"""``python -m microbench export``: safetensors + config + a model card with model-index, loadable
by open_clip / transformers and by ``model=openclip model.name=local-dir:DIR``, with the checkpoint's predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli


def _front_matter(path: Path) -> dict:
    import yaml

    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.mark.slow
def test_export_round_trips_a_full_and_a_lora_fine_tune_with_their_model_cards(tmp_path, cfg_train, cfg_eval):
    from conftest import REPO
    from microbench.models.adapters import merged_state
    from microbench.models.backbones import build_backbone
    from microbench.studies.forgetting import load_finetuned_state
    from microbench.tasks.registry import train
    from microbench.tasks.trainer import build_model

    common = ["experiment=demo", "trainer.max_epochs=2", "eval_in_domain=false", "study.alphas=[0,1]",
              "bootstrap.n_resamples=99", "study.result_cache=null", "+trainer.enable_progress_bar=false",
              "callbacks.model_checkpoint=null"]  # one checkpoint, last.ckpt: tested, studied and exported
    size = None
    for name, extra in (("full", []), ("lora", ["module.adapter=lora", "module.lora.r=4"])):
        rec, _ = train(cfg_train([*common, *extra, f"paths.output_dir={tmp_path / name}",
                                  f"checkpoint_dir={tmp_path / name / 'ck'}"]))
        ckpt = rec["last_checkpoint"]
        out = tmp_path / f"export_{name}"
        res = run_cli(["-m", "microbench", "export", ckpt, "--out", str(out)], cwd=REPO,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.startswith(f"exported full weights -> {out}") and "with the run results" in res.stdout
        loaded = build_backbone("open_clip", f"local-dir:{out}")
        base = build_model(cfg_train(["experiment=demo"]).model)
        want, _ = load_finetuned_state(ckpt, base)  # the LoRA one merged into the base
        got = loaded.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        # the same model through the config a user writes
        via_cfg = build_model(cfg_eval(["model=openclip", f"model.name=local-dir:{out}"]).model)
        assert via_cfg.fingerprint() == loaded.fingerprint()
        card = _front_matter(out / "README.md")
        assert card["library_name"] == "open_clip" and card["base_model"]["fingerprint"] == base.fingerprint()
        assert card["microbench"]["data"]["fingerprint"] == rec["data"]["fingerprint"]
        assert card["microbench"]["weights_fingerprint"] == loaded.fingerprint()
        results = card["model-index"][0]["results"]
        acc = next(m for m in results[0]["metrics"] if m["name"] == "held-out test acc")
        assert acc["value"] == pytest.approx(rec["test"]["test/acc"], abs=1e-6)
        study = json.loads((tmp_path / name / "forgetting" / "forgetting.json").read_text())
        delta = next(m for m in results[1]["metrics"] if m["type"] == "delta_vs_base")
        assert delta["value"] == pytest.approx(study["splits"]["test"]["models"]["finetuned"]["target/fine"]["delta"][
            "value"], abs=1e-6)
        weights = (out / "open_clip_model.safetensors").stat().st_size
        size = size or weights
        assert weights == size  # a merged LoRA fine-tune is a full model again
        if name == "lora":
            adapter = tmp_path / "adapter"
            res = run_cli(["-m", "microbench", "export", ckpt, "--out", str(adapter),
                                  "--adapter-only"], cwd=REPO, timeout=300)
            assert res.returncode == 0, res.stderr[-2000:]
            from safetensors.torch import load_file

            tensors = load_file(str(adapter / "adapter_model.safetensors"))
            blob = torch.load(ckpt, map_location="cpu", weights_only=False)
            assert len(tensors) == len(blob["state_dict"]) and all(k.startswith("base_model.model.") and
                                                                   "lora_" in k for k in tensors)
            cfg = json.loads((adapter / "adapter_config.json").read_text())
            assert cfg["r"] == 4 and set(cfg["target_modules"]) == set(blob["microbench"]["adapter"]["targets"])
            assert (adapter / "adapter_model.safetensors").stat().st_size < 0.05 * weights
            # merging the exported adapter into the base gives the exported full weights
            spec = blob["microbench"]["adapter"]
            back = {k.removeprefix("base_model.").replace("lora_A.", "lora_A.default.").replace(
                "lora_B.", "lora_B.default."): v for k, v in tensors.items()}
            merged = merged_state(build_model(cfg_train(["experiment=demo"]).model), spec, back)
            assert all(torch.equal(merged[k], got[k]) for k in got)
        else:
            bad = run_cli(["-m", "microbench", "export", ckpt, "--out", str(tmp_path / "x"),
                                  "--adapter-only"], cwd=REPO, timeout=300)
            assert bad.returncode == 2
            assert bad.stderr.strip().splitlines()[-1].startswith("error: --adapter-only: this checkpoint is a full")


def test_export_of_a_transformers_clip_loads_with_transformers_and_gives_the_same_features(tmp_path):
    from microbench.models.backbones import build_backbone
    from microbench.tasks.export import _export_full
    from test_backbones import _tiny_hf_clip

    bb = build_backbone("hf", str(_tiny_hf_clip(tmp_path / "hf")))
    with torch.no_grad():
        next(iter(bb.model.vision_model.parameters())).add_(0.1)  # "fine-tuned"
    res = _export_full(bb, tmp_path / "out")
    assert res["library"] == "transformers" and "model.safetensors" in res["files"]
    again = build_backbone("hf", str(tmp_path / "out"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(bb.encode_image(x), again.encode_image(x), atol=1e-6)
        tok = bb.tokenize(["a micrograph"])
        assert torch.allclose(bb.encode_text(tok), again.encode_text(again.tokenize(["a micrograph"])), atol=1e-6)
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(tmp_path / "out")).__name__ == "CLIPModel"


@pytest.mark.slow
def test_export_refuses_what_is_not_a_fine_tune_in_one_line(tmp_path):
    from conftest import REPO

    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "plain.ckpt")
    res = run_cli(["-m", "microbench", "export", str(tmp_path / "plain.ckpt"), "--out",
                          str(tmp_path / "o")], cwd=REPO, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "is not a fine-tune's checkpoint" in res.stderr
