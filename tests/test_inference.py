"""How the encoders run in evaluation (microbench.models.inference): bf16 autocast within the stated tolerance of
fp32, channels-last and compile changing nothing that matters, the text-embedding cache keyed by the text tower's
weights, the choice recorded in the run record and in the cache keys, and uint8 cached pixels finished where the
encoder runs."""

from __future__ import annotations

import json
import pickle

import lightning as L
import numpy as np
import pytest
import torch

from conftest import build_model
from microbench.data.datamodule import PerceptionDataModule, pixels_of
from microbench.errors import UserError
from microbench.models.inference import BF16_TOLERANCE, TEXT_CACHE, InferenceSettings
from microbench.models.zero_shot import ZeroShotScorer
from microbench.tasks.registry import evaluate


@pytest.fixture(scope="module")
def tiny_dm():
    bb = build_model("tiny")
    dm = PerceptionDataModule("sample", transform=bb.preprocess, split="test")
    dm.setup("test")
    return bb, dm


def _score(bb, dm, settings=None):
    if settings is not None:
        bb.set_inference(settings)
    scorer = ZeroShotScorer(bb, progress=False)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False).test(scorer, datamodule=dm, verbose=False)
    return scorer.predictions, scorer.text_encodings


def _margin(scores) -> np.ndarray:
    return np.array([np.subtract(*sorted(s)[-1:-3:-1]) for s in scores])


def test_bf16_autocast_agrees_with_fp32_within_the_stated_tolerance(tiny_dm):
    bb, dm = tiny_dm
    batch = next(iter(dm.image_loader("test")))
    bb.set_inference(InferenceSettings())
    e32 = bb.embed_images(pixels_of(batch))
    bb.set_inference(InferenceSettings(precision="bf16"))
    e16 = bb.embed_images(pixels_of(batch))
    assert e16.dtype == torch.float32 and bb.describe()["inference"]["dtype"] == "bfloat16"
    assert not torch.equal(e16, e32)  # bf16 did run
    assert (e16 * e32).sum(1).min() >= BF16_TOLERANCE["min_cosine"]
    fp32, _ = _score(bb, dm, InferenceSettings())
    bf16, _ = _score(bb, dm, InferenceSettings(precision="bf16"))
    differ = fp32["pred_idx"].to_numpy() != bf16["pred_idx"].to_numpy()
    assert differ.mean() < 0.05  # on the sample: 6 of 748 items, every one a near tie in fp32
    assert (_margin(fp32["scores"])[differ] < BF16_TOLERANCE["margin"]).all()
    bb.set_inference(InferenceSettings())


def test_channels_last_and_compile_change_no_prediction(tiny_dm, monkeypatch):
    bb, dm = tiny_dm
    ref, _ = _score(bb, dm, InferenceSettings())
    keys = list(bb.state_dict())
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))  # inductor on a
    got, _ = _score(bb, dm, InferenceSettings(channels_last=True, compile=True))  # CPU takes ~60 s: bench_gpu.py
    assert compiled == [bb.image_tower()]  # the image tower, once for the whole evaluation
    assert list(bb.state_dict()) == keys  # merges and the fingerprint see the same weights
    assert (got["pred_idx"].to_numpy() == ref["pred_idx"].to_numpy()).all()
    np.testing.assert_allclose(np.concatenate(got["scores"].to_list()), np.concatenate(ref["scores"].to_list()),
                               atol=1e-5)
    assert bb.describe()["inference"] == {"precision": "fp32", "channels_last": True, "compile": True,
                                          "dtype": "float32"}
    bb.image_tower().to(memory_format=torch.contiguous_format)
    bb.set_inference(InferenceSettings())


def test_text_embeddings_are_cached_by_the_text_towers_weights(tiny_dm):
    bb, dm = tiny_dm
    bb.set_inference(InferenceSettings())
    state = {k: v.clone() for k, v in bb.state_dict().items()}
    first, n = _score(bb, dm)
    assert n == 1 and TEXT_CACHE.misses > 0 and TEXT_CACHE.hits == 0
    again, n = _score(bb, dm)
    assert n == 0 and again["scores"].tolist() == first["scores"].tolist()
    image_keys = set(bb.image_tower_keys())
    with torch.no_grad():  # an image-only change (towers=image fine-tune / merge): the prompts are not re-encoded
        for k, t in bb.state_dict(keep_vars=True).items():
            if k in image_keys and t.is_floating_point():
                t.mul_(1.1)
    _, n = _score(bb, dm)
    assert n == 0
    with torch.no_grad():  # the text tower moves: encoded again, equal to a scorer without any cache
        for k, t in bb.state_dict(keep_vars=True).items():
            if k not in image_keys and t.is_floating_point():
                t.mul_(0.9)
    moved, n = _score(bb, dm)
    assert n == 1
    TEXT_CACHE.clear()
    fresh, _ = _score(bb, dm)
    assert moved["scores"].tolist() == fresh["scores"].tolist()
    _, n = _score(bb, dm, InferenceSettings(precision="bf16"))  # another dtype is another key
    assert n == 1
    bb.set_inference(InferenceSettings())
    bb.load_state_dict(state)


def test_the_choice_is_recorded_and_keys_the_caches(tmp_path, cfg_eval, tiny_dm):
    record, _ = evaluate(cfg_eval(["inference.precision=bf16",
                                   "data.datasets=[kather_et_al_2016]"]))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["model"]["inference"] == {"precision": "bf16", "channels_last": False, "compile": False,
                                           "dtype": "bfloat16"}
    assert record.model["inference"]["dtype"] == "bfloat16"
    from microbench.models.features import feature_key
    from microbench.studies.forgetting import ResultCache

    bb, dm = tiny_dm
    cache = ResultCache(tmp_path)
    fp = bb.fingerprint()
    assert cache.key(fp, dm, ["captions"], torch.bfloat16) != cache.key(fp, dm, ["captions"])
    plain = feature_key(bb, dm)[0]
    bb.set_inference(InferenceSettings(precision="bf16"))
    assert feature_key(bb, dm)[0] != plain
    bb.set_inference(InferenceSettings())
    assert feature_key(bb, dm)[0] == plain


def test_an_unknown_precision_is_one_line_with_the_choices():
    with pytest.raises(UserError, match=r"^inference.precision must be one of fp32, bf16, auto, got 'fp8'$"):
        InferenceSettings(precision="fp8")
    assert InferenceSettings(precision="auto").dtype("cpu") == torch.float32  # auto: bf16 on a bf16 GPU only
    assert InferenceSettings(precision="bf16").dtype("cpu") == torch.bfloat16


def test_cached_pixels_cross_as_uint8_and_are_finished_where_encoded(tmp_path, tiny_dm):
    bb, ref = tiny_dm
    dm = PerceptionDataModule("sample", transform=bb.preprocess, split="test", pixel_cache=str(tmp_path),
                              num_workers=1)
    dm.setup("test")
    expected = {i: x for b in ref.image_loader("test") for i, x in zip(b["image_index"].tolist(), pixels_of(b),
                                                                        strict=True)}
    for _ in range(2):  # cold (decoded in a worker), then warm (read back)
        for b in dm.image_loader("test"):
            assert b["pixel_values"].dtype == torch.uint8  # a quarter of float32's bytes to the device
            got = pixels_of(b, "cpu")
            assert got.dtype == torch.float32
            assert all(torch.equal(x, expected[i]) for i, x in zip(b["image_index"].tolist(), got, strict=True))
    finish = pickle.loads(pickle.dumps(next(iter(dm.image_loader("test")))["finish"]))
    assert torch.equal(finish(torch.full((3, 2, 2), 255, dtype=torch.uint8)),
                       bb.preprocess.transforms[-1](torch.ones(3, 2, 2)))


def test_a_bad_precision_is_refused_before_any_model_is_built(cfg_eval, monkeypatch):
    from microbench.tasks import trainer

    monkeypatch.setattr(trainer, "instantiate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    cfg = cfg_eval(["inference.precision=fp8"])
    with pytest.raises(UserError, match="inference.precision must be one of fp32, bf16, auto, got 'fp8'"):
        trainer.build_model(cfg.model, cfg.inference)
