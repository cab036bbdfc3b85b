"""The embedded sample: deterministic, covers every trap and official slice, and its classes are learnable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import run_cli
from microbench.data import schema
from microbench.data.datamodule import PerceptionDataModule
from microbench.data.loading import SAMPLE_DIR as SAMPLE

ROOT = Path(__file__).resolve().parents[1]


def _regenerate(out: Path, disable_simd: bool) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("NPY_DISABLE_CPU_FEATURES", None)
    if disable_simd:  # every dispatch target NumPy was built with: baseline kernels only
        from numpy._core._multiarray_umath import __cpu_dispatch__

        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(__cpu_dispatch__)
    res = run_cli([str(ROOT / "scripts" / "make_sample.py"), "--out", str(out)], env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("disable_simd", [False, True], ids=["default-dispatch", "simd-off"])
def test_regeneration_is_byte_identical_to_the_committed_sample(tmp_path, disable_simd):
    """The only test that compares regenerated data with data/sample: every file, byte for byte, with NumPy's
    default SIMD kernels and with all of them switched off (the kernels whose last bits differ between CPUs)."""
    _regenerate(tmp_path / "s", disable_simd)
    committed = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*") if p.is_file()
                       and p.name != "README.md")
    made = sorted(p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert made == committed
    differ = [f for f in committed if (SAMPLE / f).read_bytes() != (tmp_path / "s" / f).read_bytes()]
    assert not differ, f"scripts/make_sample.py no longer reproduces data/sample byte for byte: {differ}"


def test_sample_covers_traps_and_slices(sample, sample_table):
    ds, _ = sample
    rows = sample_table.rows
    names = set(rows["dataset"])
    assert len(names) >= 6 and list(ds.column_names) == list(schema.COLUMNS)
    assert names & schema.PATHOLOGY_DATASETS and names & schema.HE_DATASETS
    assert schema.EULENBERG_EXCLUDED <= names
    assert {"held_et_al_2010_h2b", "held_et_al_2010_galt"} <= names
    assert ds.data.column("dataset").null_count == 42  # Held rows keep a null name, as on the Hub
    assert "GalT–EGFP" in set(rows["stain"])  # en dash
    assert names & schema.NON_OFFICIAL_DATASETS == schema.NON_OFFICIAL_DATASETS
    assert rows["has_bbox"].sum() > 0 and rows["has_polygon"].sum() > 0
    assert rows["image_id"].duplicated().sum() == 36
    assert ds.data.column("pmid").null_count > 0
    assert sample_table.absent[("questions", "stain")] == 16
    assert set(sample_table.frame.loc[sample_table.frame.source == "captions", "key"]) == set(schema.CAPTION_KEYS)
    # captions carry string answer_idx, questions int, exactly as on the Hub
    raw = ds.data.column("captions").type
    assert str(raw.field("modality_0").type.field("answer_idx").type) == "string"
    assert str(ds.data.column("questions").type.field("modality").type.field("answer_idx").type) == "int64"
    # localization instances parse, with boxes inside the image
    boxes = [v for v in ds.select_columns(["bbox"])["bbox"] if v is not None]
    assert len(boxes) == 114
    for value in boxes:
        for _, (x1, y1, x2, y2) in schema.parse_bboxes(value):
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96


def _features(img) -> np.ndarray:
    a = np.asarray(img.convert("RGB").resize((32, 32)), dtype=float) / 255
    g = a.mean(2)
    gm = ndi.gaussian_gradient_magnitude(g, 1.0)
    hist = np.concatenate([np.histogram(a[..., c], bins=8, range=(0, 1))[0] / 1024 for c in range(3)])
    return np.concatenate([a[::4, ::4].ravel(), hist, np.histogram(gm, bins=8, range=(0, 0.5))[0] / 1024])


def test_classes_are_visually_learnable():
    """A nearest-centroid classifier on raw pixel statistics, trained on train+val, beats chance on test."""
    dm = PerceptionDataModule("sample")
    dm.setup()
    rows = dm.rows
    feats = np.stack([_features(dm.hf[int(r)]["image"]) for r in rows["row_idx"]])
    acc, chance = {}, {}
    for name, g in rows.groupby("dataset"):
        tr, te = g[g["split"] != "test"], g[g["split"] == "test"]
        mu, sd = feats[tr.index].mean(0), feats[tr.index].std(0) + 1e-6
        labels = sorted(set(tr["label_name"]))
        cent = np.stack([((feats[tr.index][(tr["label_name"] == lab).to_numpy()] - mu) / sd).mean(0) for lab in labels])
        z = (feats[te.index] - mu) / sd
        pred = np.array(labels)[np.argmin(((z[:, None] - cent[None]) ** 2).sum(-1), axis=1)]
        acc[name], chance[name] = float((pred == te["label_name"].to_numpy()).mean()), 1 / len(labels)
    assert np.mean(list(acc.values())) > np.mean(list(chance.values())) + 0.25, acc
    for name in ("acevedo_et_al_2020", "kather_et_al_2016", "nirschl_et_al_2018", "empiar_sbfsem"):
        assert acc[name] >= 0.8, (name, acc[name])
