"""Backbone adapters: open_clip (names, local-dir, checkpoint files, random init), transformers, timm."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from PIL import Image

from conftest import REPO, build_model
from microbench.models.backbones import BackboneError, build_backbone


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


def test_tiny_is_reproducible_and_fingerprinted(tiny):
    again = build_backbone("open_clip", "microbench-tiny", pretrained=None, seed=0)
    other = build_backbone("open_clip", "microbench-tiny", pretrained=None, seed=1)
    assert tiny.fingerprint() == again.fingerprint() != other.fingerprint()
    assert tiny.embed_dim == 64 and tiny.has_text
    d = tiny.describe()
    assert d["parameters"] > 1e6 and d["library"] == "open_clip" and d["fingerprint"] == tiny.fingerprint()
    x = tiny.preprocess(Image.new("RGB", (96, 80), (200, 10, 10)))
    assert x.shape == (3, 64, 64)
    with torch.no_grad():
        assert tiny.encode_image(x[None]).shape == (1, 64)
        assert tiny.encode_text(tiny.tokenize(["a micrograph", "b"])).shape == (2, 64)
    assert float(tiny.logit_scale) == pytest.approx(1 / 0.07, rel=1e-4)


def test_local_dir_and_checkpoint_file_reload_the_same_weights(tiny, tmp_path):
    folder = tiny.save_local_dir(tmp_path / "tiny")
    assert (folder / "open_clip_config.json").exists() and (folder / "open_clip_model.safetensors").exists()
    local = build_backbone("open_clip", f"local-dir:{folder}")
    sd_a, sd_b = tiny.model.state_dict(), local.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    torch.save(tiny.model.state_dict(), tmp_path / "epoch_1.pt")
    ckpt = build_backbone("open_clip", "microbench-tiny", pretrained=str(tmp_path / "epoch_1.pt"), seed=5)
    assert ckpt.fingerprint() == tiny.fingerprint()  # the checkpoint, not the seed, decides the weights


def test_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(BackboneError, match="unknown open_clip model 'ViT-Nope'.*preset"):
        build_backbone("open_clip", "ViT-Nope")
    with pytest.raises(BackboneError, match="no pretrained tag 'not-a-tag'"):
        build_backbone("open_clip", "microbench-tiny", pretrained="not-a-tag")
    with pytest.raises(BackboneError, match="needs an open_clip_config.json"):
        build_backbone("open_clip", f"local-dir:{tmp_path}")
    with pytest.raises(BackboneError, match="unknown backbone kind"):
        build_backbone("keras", "x")
    # the Hub is not reachable in tests: a hub preset fails fast with one line
    with pytest.raises(BackboneError, match="cannot build open_clip model 'hf-hub:wisdomik/QuiltNet-B-32'"):
        build_model("quiltnet")


def test_model_presets_use_the_papers_ids():
    from omegaconf import OmegaConf

    def preset(name):
        cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"))
        assert cfg.pop("_target_") == "microbench.models.backbones.build_backbone"
        return cfg

    assert preset("openclip") == {"kind": "open_clip", "name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
                                  "precision": "fp32"}
    assert preset("biomedclip")["name"] == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert preset("clip")["name"] == "openai/clip-vit-base-patch32" and preset("plip")["name"] == "vinid/plip"
    assert preset("quiltnet")["name"] == "hf-hub:wisdomik/QuiltNet-B-32"
    assert {k: preset("align")[k] for k in ("kind", "name", "padding")} == {
        "kind": "hf", "name": "kakaobrain/align-base", "padding": "max_length"}


def test_timm_image_tower_is_image_only():
    from microbench.models.zero_shot import ZeroShotScorer

    tower = build_backbone("timm", "resnet10t", pretrained=False)
    assert not tower.has_text and tower.embed_dim == 512
    x = tower.preprocess(Image.new("RGB", (64, 64)))
    assert tower.encode_image(x[None]).shape == (1, 512)
    with pytest.raises(BackboneError, match="image tower without a text encoder: zero-shot scoring needs"):
        tower.tokenize(["x"])
    with pytest.raises(BackboneError, match="without a text encoder"):
        ZeroShotScorer(tower)


def _tiny_hf_clip(folder):
    """A random-init transformers CLIPModel with a real CLIP BPE tokenizer built from open_clip's vocabulary."""
    import open_clip.tokenizer as oct
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = oct.SimpleTokenizer()
    (folder / "vocab.json").write_text(json.dumps(tok.encoder))
    with gzip.open(oct.default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<start_of_text>", "eos_token": "<end_of_text>", "pad_token": "<end_of_text>",
               "unk_token": "<end_of_text>"}  # open_clip's spelling of CLIP's special tokens
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), **special)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_transformers_clip_adapter(tmp_path):
    folder = _tiny_hf_clip(tmp_path / "hfclip")
    bb = build_backbone("hf", str(folder))
    assert bb.kind == "hf" and bb.embed_dim == 16 and bb.source["architecture"] == "CLIPModel"
    x = bb.preprocess(Image.new("RGB", (50, 40), (10, 200, 10)))
    assert x.shape == (3, 32, 32)
    tokens = bb.tokenize(["a micrograph of a cell.", "none of the above"])
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert tokens["input_ids"][0, 0] == 49406 and tokens["input_ids"].max() == 49407  # same ids as open_clip
    with torch.no_grad():
        assert bb.encode_image(x[None]).shape == (1, 16) and bb.encode_text(tokens).shape == (2, 16)
        # the adapter gives exactly what the model's own API gives
        ref = bb.model(pixel_values=x[None], **tokens).logits_per_image
        img = torch.nn.functional.normalize(bb.encode_image(x[None]), dim=-1)
        txt = torch.nn.functional.normalize(bb.encode_text(tokens), dim=-1)
        assert torch.allclose(bb.logit_scale * img @ txt.T, ref, atol=1e-5)
    with pytest.raises(BackboneError, match="cannot load transformers model"):
        build_backbone("hf", str(tmp_path / "missing"))


def test_trimmed_text_encoding_equals_full_context(tiny):
    """Running the causal text tower only up to the longest text of the batch gives the full-context features."""
    from microbench.models.backbones.open_clip_backbone import _trimmable

    texts = ["A micrograph acquired through light microscopy.", "none of the above", "x " * 30]
    tokens = tiny.tokenize(texts)
    assert _trimmable(tiny.model) and int((tokens != 0).sum(1).max()) < 77
    with torch.no_grad():
        full = tiny.model.encode_text(tokens)
        trimmed = tiny.encode_text(tokens)
    assert torch.allclose(full, trimmed, atol=1e-5)
    tiny.trim_text_padding = False
    try:
        with torch.no_grad():
            assert torch.equal(tiny.encode_text(tokens), full)
    finally:
        tiny.trim_text_padding = True


def test_fingerprint_follows_weight_updates(tiny):
    before = tiny.fingerprint()
    p = next(tiny.parameters())
    with torch.no_grad():
        p.mul_(2.0)
    changed = tiny.fingerprint()
    with torch.no_grad():
        p.div_(2.0)  # exact in floating point
    assert changed != before and tiny.fingerprint() == before
