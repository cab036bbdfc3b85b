"""The full-benchmark-shaped synthetic copy (microbench.data.fullsize): the release's row counts and totals, each
dataset's image size, Burgess image reuse, and a copy every loader reads like the real one."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from microbench.data.fullsize import (
    BURGESS_SHARED_ROWS,
    DATASETS,
    RELEASE_ROWS,
    image_size,
    make_fullsize_copy,
    planned_rows,
)


def test_the_plan_adds_up_to_the_release():
    assert sum(d.rows for d in DATASETS) == RELEASE_ROWS == sum(planned_rows().values())
    official = [d for d in DATASETS if d.name not in ("opencell", "sirinukunwattana_et_al_2016")]
    assert sum(d.rows for d in official) == 16_130  # the 23 official datasets' images (ubench-format.md §5)
    assert sum(d.rows for d in DATASETS if d.name and "eulenberg" in d.name and "brightfield" not in d.name) == 1486
    known = {"acevedo_et_al_2020": 1600, "empiar_sbfsem": 154, "colocalization_benchmark": 96, "opencell": 1105,
             "nirschl_unpub_fluorescence": 934, "sirinukunwattana_et_al_2016": 80}
    assert {d.name: d.rows for d in DATASETS if d.name in known} == known
    assert all(d.rows_from == "release" for d in DATASETS if d.name in known)
    assert max(max(d.size) for d in DATASETS) == 2048  # images of up to ~2k pixels


def test_a_small_copy_loads_as_the_release_does(tmp_path):
    from microbench.data.loading import load_ubench
    from microbench.data.questions import build_question_table

    stats = make_fullsize_copy(tmp_path, scale=0.01, image_scale=0.05, rows_per_shard=64)
    ds, _ = load_ubench(str(tmp_path))
    plan = planned_rows(0.01)
    assert len(ds) == stats["rows"] == sum(plan.values()) and stats["shards"] == -(-len(ds) // 64)
    got = Counter(d if d is not None else f"held/{s}" for d, s in zip(ds["dataset"], ds["stain"], strict=True))
    assert dict(got) == plan
    sizes = {}
    for r in ds:
        key = r["dataset"] or f"held/{r['stain']}"
        sizes.setdefault(key, r["image"].size)
    for d in DATASETS:
        assert sizes[d.name or f"held/{d.stain}"] == image_size(d, 0.05)
    burgess = [i for i, d in zip(ds["image_id"], ds["dataset"], strict=True) if d and d.startswith("burgess")]
    assert len(burgess) - len(set(burgess)) == round(BURGESS_SHARED_ROWS * 0.01) // 2 * 2
    table = build_question_table(ds)
    assert len(table.problems) == 0 and table.rows["image_id"].nunique() == stats["images"]
    raw = ds.data.table.column("image")[0].as_py()["bytes"]
    assert Image.open(io.BytesIO(raw)).format == "PNG"


def test_a_folder_holding_a_real_copy_is_refused_untouched(tmp_path):
    import shutil

    from conftest import REPO
    from microbench.data.loading import MicroBenchDataError

    real = tmp_path / "copy"
    shutil.copytree(REPO / "data" / "sample" / "perception", real / "perception")
    before = sorted(p.name for p in (real / "perception" / "0.1.0").iterdir())
    with pytest.raises(MicroBenchDataError, match="already holds shards that this generator did not write"):
        make_fullsize_copy(real, scale=0.001, image_scale=0.05)
    assert sorted(p.name for p in (real / "perception" / "0.1.0").iterdir()) == before
    ours = tmp_path / "ours"  # an earlier synthetic copy is replaced
    make_fullsize_copy(ours, scale=0.001, image_scale=0.05)
    assert make_fullsize_copy(ours, scale=0.001, image_scale=0.05)["rows"] == sum(planned_rows(0.001).values())
