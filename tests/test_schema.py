"""Schema declaration and trap helpers."""

from __future__ import annotations

import datasets
import pytest

from microbench.data import schema


def test_features_are_the_22_hub_columns_in_order():
    assert list(schema.FEATURES) == list(schema.COLUMNS)
    assert len(schema.COLUMNS) == 22
    f = schema.FEATURES
    assert isinstance(f["image"], datasets.Image)
    assert isinstance(f["label"], datasets.ClassLabel) and f["label"].num_classes == 104
    assert f["label"].names[65] == "chronic_heart_failure" and f["label"].names[7] == "immature granulocyte"
    assert f["microns_per_pixel"].dtype == "float32" and f["synthetic"].dtype == "bool"
    # the two answer_idx dtypes of the real release
    assert f["captions"]["modality_1"]["answer_idx"].dtype == "string"
    assert f["questions"]["modality"]["answer_idx"].dtype == "int64"
    assert set(f["captions"]) == {f"{t}_{v}" for t in schema.QUESTION_TYPES for v in (0, 1)}
    assert list(f["questions"]["stain"]) == ["answer", "answer_idx", "id", "name", "options", "question", "tags"]
    assert "answer" not in f["captions"]["stain_0"]  # captions carry no answer field


def test_sample_uses_the_declared_schema(sample):
    from microbench.data.sample import sample_features

    ds, _ = sample
    assert ds.features == sample_features()
    assert list(ds.column_names) == list(schema.COLUMNS)
    # identical to the Hub schema except the sample-only names in the unverified ClassLabel slots
    assert ds.features["label"].names[:67] == list(schema.LABEL_NAMES[:67])


@pytest.mark.parametrize(("dataset", "stain", "expected"), [
    ("kather_et_al_2016", "H&E", "kather_et_al_2016"),
    (None, "H2B-mCherry", "held_et_al_2010_h2b"),
    (None, "GalT–EGFP", "held_et_al_2010_galt"),  # en dash, as on the Hub
    (None, "GalT-EGFP", "held_et_al_2010_galt"),  # ASCII hyphen from re-exports
    ("", "H2B-mCherry", "held_et_al_2010_h2b"),
    (None, "H&E", "unknown"),
    (None, None, "unknown"),
])
def test_resolve_dataset_name(dataset, stain, expected):
    assert schema.resolve_dataset_name(dataset, stain) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("2", 2), (" 1 ", 1), (3, 3), (1.0, 1), ("x", None), (None, None), (True, None), (1.5, None), ("", None),
])
def test_parse_answer_idx(value, expected):
    assert schema.parse_answer_idx(value) == expected


def test_split_caption_key():
    assert schema.split_caption_key("modality_1") == ("modality", 1)
    assert schema.split_caption_key("classification_0") == ("classification", 0)
    assert schema.split_caption_key("classification") == ("classification", None)


BOX_LIST = [{"className": "cell", "points": {"x1": 1.0, "y1": 2.0, "x2": 5.0, "y2": 9.0}},
            {"className": "nucleus", "points": [2.0, 3.0, 4.0, 6.0]}]
POLY_LIST = [{"className": "cell", "points": [0, 0, 4, 0, 4, 4, 0, 4]},
             {"className": "bad", "points": [1, 2, 3]}]


def test_bbox_and_polygon_both_decodings():
    as_dict = {"className": ["cell", "nucleus"], "points": [BOX_LIST[0]["points"], BOX_LIST[1]["points"]]}
    expected = [("cell", [1.0, 2.0, 5.0, 9.0]), ("nucleus", [2.0, 3.0, 4.0, 6.0])]
    assert schema.parse_bboxes(BOX_LIST) == expected
    assert schema.parse_bboxes(as_dict) == expected
    assert schema.parse_bboxes(None) == []
    poly_dict = {"className": ["cell", "bad"], "points": [POLY_LIST[0]["points"], POLY_LIST[1]["points"]]}
    for value in (POLY_LIST, poly_dict):
        parsed = schema.parse_polygons(value)
        assert parsed == [("cell", [(0.0, 0.0), (4.0, 0.0), (4.0, 4.0), (0.0, 4.0)])]
        assert schema.count_malformed_instances(value, "polygon") == 1
    assert schema.count_malformed_instances(BOX_LIST, "bbox") == 0


def test_bbox_and_polygon_decode_both_ways_through_datasets():
    """`List({...})` decodes to a list of dicts, `Sequence({...})` to a dict of lists; both parse the same."""
    inst = {"className": datasets.Value("string"), "points": datasets.Sequence(datasets.Value("float32"))}
    as_list = datasets.Dataset.from_dict({"polygon": [POLY_LIST[:1]]},
                                         features=datasets.Features({"polygon": datasets.List(inst)}))
    as_seq = datasets.Dataset.from_dict({"polygon": [{"className": ["cell"], "points": [POLY_LIST[0]["points"]]}]},
                                        features=datasets.Features({"polygon": datasets.Sequence(inst)}))
    assert isinstance(as_list[0]["polygon"], list) and isinstance(as_seq[0]["polygon"], dict)
    assert schema.parse_polygons(as_list[0]["polygon"]) == schema.parse_polygons(as_seq[0]["polygon"])
    assert len(schema.parse_polygons(as_seq[0]["polygon"])[0][1]) == 4


def test_official_slices_are_consistent():
    assert schema.HE_DATASETS <= schema.PATHOLOGY_DATASETS <= schema.OFFICIAL_DATASETS
    assert schema.EULENBERG_EXCLUDED <= schema.OFFICIAL_DATASETS
    assert not schema.NON_OFFICIAL_DATASETS & schema.OFFICIAL_DATASETS
    assert len(schema.OFFICIAL_DATASETS) == 23
    assert set(schema.HELD_STAIN_TO_DATASET.values()) <= schema.OFFICIAL_DATASETS
