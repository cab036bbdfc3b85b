"""Decode once per copy: the decoded-pixel cache gives the transform's tensors bit for bit, is read
instead of decoding on the next run, keys on the copy's content and the geometry, and never serves a damaged slot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_model
from microbench.data.datamodule import PerceptionDataModule, default_transform, pixels_of
from microbench.data.pixel_cache import PixelCache, split_transform


def _pixels(dm, split="test"):
    out = {}
    for b in dm.image_loader(split):
        for i, x in zip(b["image_index"].tolist(), pixels_of(b), strict=True):
            out[i] = x
    return out


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


@pytest.mark.parametrize("which", ["open_clip", "torchvision_v2"])
def test_cached_pixels_are_the_transforms_bit_for_bit_and_read_back_without_decoding(tmp_path, tiny, which,
                                                                                    monkeypatch):
    tf = tiny.preprocess if which == "open_clip" else default_transform(96)
    ref = PerceptionDataModule("sample", transform=tf, split="test")
    ref.setup()
    expected = _pixels(ref)
    cold = PerceptionDataModule("sample", transform=tf, split="test", pixel_cache=str(tmp_path))
    cold.setup()
    got = _pixels(cold)
    assert got.keys() == expected.keys() and all(torch.equal(got[i], expected[i]) for i in expected)
    cache = cold.cached_pixels()
    assert cache.filled() == len(cold.images("test"))
    warm = PerceptionDataModule("sample", transform=tf, split="test", pixel_cache=str(tmp_path))
    warm.setup()

    class NoDecode:  # the warm run must not decode a single image
        def __len__(self):
            return n_rows

        def __getitem__(self, row):
            raise AssertionError(f"decoded row {row}")

    n_rows = len(warm.hf)
    warm.hf = NoDecode()
    again = _pixels(warm)
    assert all(torch.equal(again[i], expected[i]) for i in expected)


def test_the_key_covers_content_and_geometry_and_a_damaged_slot_is_decoded_again(tmp_path, tiny):
    split, why = split_transform(tiny.preprocess)
    assert split is not None and why == "" and split.shape == (3, 64, 64)
    a = PixelCache(tmp_path, "copy-a", 10, split)
    assert PixelCache(tmp_path, "copy-b", 10, split).folder != a.folder  # other pixels, other folder
    other, _ = split_transform(default_transform(64))
    assert PixelCache(tmp_path, "copy-a", 10, other).folder != a.folder  # other geometry, other folder
    assert PixelCache(tmp_path, "copy-a", 10, split).folder == a.folder
    img = torch.randint(0, 256, split.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert a.get(3) is None
    a.put(3, img)
    assert torch.equal(a.get(3), img) and a.filled() == 1
    a.flush()
    raw = np.memmap(a.folder / "pixels.u8", dtype=np.uint8, mode="r+")
    raw[3 * img.numel() + 17] ^= 0xFF  # one byte flipped on disk
    raw.flush()
    fresh = PixelCache(tmp_path, "copy-a", 10, split)
    assert fresh.get(3) is None  # its checksum fails: decoded again, never served
    with pytest.raises(ValueError, match="shape"):
        fresh.put(4, torch.zeros(3, 8, 8, dtype=torch.uint8))


def test_transforms_it_cannot_split_decode_as_before_and_say_why(tmp_path, caplog):
    from torchvision.transforms import v2

    cases = {
        "random": v2.Compose([v2.ToImage(), v2.RandomResizedCrop(32), v2.ToDtype(torch.float32, scale=True)]),
        "size": v2.Compose([v2.ToImage(), v2.Resize(32), v2.ToDtype(torch.float32, scale=True)]),
        "not compose": lambda im: torch.zeros(3, 4, 4),
    }
    for name, tf in cases.items():
        split, why = split_transform(tf)
        assert split is None and why, name
    assert "random" in split_transform(cases["random"])[1] and "depends on the image" in split_transform(
        cases["size"])[1]
    dm = PerceptionDataModule("sample", transform=cases["size"], split="test", pixel_cache=str(tmp_path))
    dm.setup()
    with caplog.at_level("INFO", logger="microbench"):
        n = sum(len(b["image_index"]) for b in dm.image_loader("test"))
    assert n == len(dm.images("test")) and "pixel cache off for this transform" in caplog.text


def test_loader_workers_fill_one_cache_and_features_are_unchanged(tmp_path, tiny):
    """DataLoader workers (other processes) write their slots of the one layout; the features of a warm run are the
    uncached features exactly."""
    from microbench.models.features import compute_image_features

    ref = PerceptionDataModule("sample", transform=tiny.preprocess, split="all", batch_size=16)
    ref.setup()
    expected = compute_image_features(tiny, ref, progress=False)[0]
    dm = PerceptionDataModule("sample", transform=tiny.preprocess, split="all", pixel_cache=str(tmp_path),
                              num_workers=2, batch_size=16)
    dm.setup()
    cold = compute_image_features(tiny, dm, progress=False)[0]
    assert dm.cached_pixels().filled() == len(dm.images("all"))
    warm = PerceptionDataModule("sample", transform=tiny.preprocess, split="all", pixel_cache=str(tmp_path),
                                batch_size=16)
    warm.setup()
    again = compute_image_features(tiny, warm, progress=False)[0]
    assert torch.equal(cold, expected) and torch.equal(again, expected)


def test_an_unusable_cache_folder_is_one_line(tmp_path, tiny):
    from microbench.data.loading import MicroBenchDataError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    dm = PerceptionDataModule("sample", transform=tiny.preprocess, split="test", pixel_cache=str(blocker))
    dm.setup()
    with pytest.raises(MicroBenchDataError, match=r"data.pixel_cache=.*cannot create .*data.pixel_cache=null") as e:
        dm.image_loader("test")
    assert "\n" not in str(e.value)


def test_the_cache_is_on_by_default_and_one_switch_turns_it_off(cfg_eval, cfg_train, monkeypatch):
    monkeypatch.delenv("MICROBENCH_PIXEL_CACHE")
    for cfg in (cfg_eval(), cfg_train()):  # every evaluation, and the fine-tune's evaluations and study
        assert str(cfg.data.pixel_cache).endswith(".cache/pixels")
    assert cfg_eval(["data.pixel_cache=null"]).data.pixel_cache is None
    monkeypatch.setenv("MICROBENCH_PIXEL_CACHE", "/elsewhere/pixels")
    assert cfg_eval().data.pixel_cache == "/elsewhere/pixels"
    monkeypatch.setenv("MICROBENCH_PIXEL_CACHE", "null")
    assert cfg_eval().data.pixel_cache is None


def test_a_sweep_through_the_cache_scores_what_it_scores_without_it(tmp_path, tiny):
    """A weight-space sweep run without a Trainer (the forgetting study's path) finishes each cached batch once:
    the same predictions as decoding every image (its cached batches had been normalised twice)."""
    from microbench.studies.sweep import InterpolationScorer

    base = {k: v.detach().clone() for k, v in tiny.state_dict().items()}
    ft = {k: v * 1.2 if v.is_floating_point() else v.clone() for k, v in base.items()}
    preds = {}
    for cache in (None, str(tmp_path), str(tmp_path)):  # off, cold, warm
        dm = PerceptionDataModule("sample", transform=tiny.preprocess, split="test", pixel_cache=cache)
        dm.setup("test")
        preds.setdefault(cache, []).append(InterpolationScorer(tiny, base, ft, [0.0, 0.5], progress=False).sweep(dm))
    ref = preds[None][0]
    for got in preds[str(tmp_path)]:
        for a in (0.0, 0.5):
            assert got[a]["scores"].tolist() == ref[a]["scores"].tolist()
    x = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    split, _ = split_transform(tiny.preprocess)
    once = pixels_of({"pixel_values": x, "finish": split.finish})
    assert torch.equal(pixels_of({"pixel_values": once, "finish": split.finish}), once)  # never finished twice
