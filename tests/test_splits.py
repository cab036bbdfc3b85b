"""Seeded, stratified, image-grouped splits."""

from __future__ import annotations

import pandas as pd
import pytest

from microbench.data.splits import SplitSpec, assign_splits


def test_deterministic_and_seeded(sample_table):
    rows = sample_table.rows
    a, b = assign_splits(rows, SplitSpec(seed=0)), assign_splits(rows, SplitSpec(seed=0))
    assert (a == b).all()
    assert (assign_splits(rows, SplitSpec(seed=1)) != a).any()
    # row order does not matter
    shuffled = rows.sample(frac=1.0, random_state=3)
    assert (assign_splits(shuffled, SplitSpec(seed=0)).sort_index() == a.sort_index()).all()


def test_no_image_straddles_two_splits(sample_table):
    rows = sample_table.rows.assign(split=assign_splits(sample_table.rows))
    per_image = rows.groupby("image_id")["split"].nunique()
    assert per_image.max() == 1
    burgess = rows[rows["dataset"].str.startswith("burgess")]
    assert burgess.groupby("image_id").size().eq(3).all()  # the reused images really are shared ...
    assert burgess.groupby("image_id")["split"].nunique().eq(1).all()  # ... and never straddle


def test_stratified_fractions(sample_table):
    rows = sample_table.rows.assign(split=assign_splits(sample_table.rows))
    images = rows.drop_duplicates("image_id")
    frac = images.groupby(["dataset", "label_name"])["split"].apply(lambda s: (s == "train").mean())
    sizes = images.groupby(["dataset", "label_name"]).size()
    # systematic sampling: every stratum's train share is within one image of 70 %
    assert ((frac - 0.7).abs() <= 1.0 / sizes + 1e-9).all()
    overall = images["split"].value_counts(normalize=True)
    assert abs(overall["train"] - 0.7) < 0.05 and abs(overall["test"] - 0.2) < 0.05 and overall["val"] > 0.05


def test_filtering_never_reshuffles(sample_table):
    rows = sample_table.rows
    full = assign_splits(rows)
    only = rows[rows["dataset"] == "kather_et_al_2016"]
    assert (assign_splits(only) == full[only.index]).all()


def test_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitSpec(train=0.8, val=0.3, test=0.2)


def test_rows_without_labels():
    rows = pd.DataFrame({"image_id": [f"i{k}" for k in range(20)], "dataset": "d"})
    s = assign_splits(rows)
    assert set(s) <= {"train", "val", "test"} and (s == "train").sum() == 14
