"""Every supported layout loads to the same rows; every bad input fails with one clear line."""

from __future__ import annotations

import json
import time

import datasets
import numpy as np
import pyarrow as pa
import pytest

from conftest import REPO, build_model, png_bytes, run_cli, write_raw_hub_copy
from microbench.data import schema
from microbench.data.loading import MicroBenchDataError, dataset_fingerprint, load_ubench
from microbench.data.questions import build_question_table


def _same_content(a: datasets.Dataset, b: datasets.Dataset) -> None:
    assert len(a) == len(b)
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    for i in (0, len(a) // 2, len(a) - 1):
        ra, rb = a[i], b[i]
        assert ra["image"].tobytes() == rb["image"].tobytes()
        assert ra["captions"] == rb["captions"] and ra["questions"] == rb["questions"]
        assert ra["dataset"] == rb["dataset"] and ra["label_name"] == rb["label_name"]


def test_sample_loads_in_hub_layout(sample):
    ds, src = sample
    assert src.kind == "sample" and len(ds) == src.num_rows == 328
    assert [p.rsplit("/", 1)[-1] for p in src.files] == ["ubench-test-00000-of-00002.arrow",
                                                         "ubench-test-00001-of-00002.arrow"]
    assert len(src.fingerprint) == 16


def test_save_to_disk_round_trip(sample, tmp_path):
    ds, _ = sample
    ds.save_to_disk(str(tmp_path / "saved"))
    back, src = load_ubench(tmp_path / "saved")
    assert src.kind == "save_to_disk"
    _same_content(ds, back)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    back2, _ = load_ubench(tmp_path / "dict", split="test")
    _same_content(ds, back2)
    with pytest.raises(MicroBenchDataError, match="holds splits \\['test'\\] but not 'train'"):
        load_ubench(tmp_path / "dict", split="train")


def test_parquet_round_trip(sample, tmp_path):
    ds, _ = sample
    out = tmp_path / "default" / "test"
    out.mkdir(parents=True)
    ds.select(range(0, 200)).to_parquet(str(out / "0000.parquet"))
    ds.select(range(200, len(ds))).to_parquet(str(out / "0001.parquet"))
    back, src = load_ubench(tmp_path)
    assert src.kind == "parquet" and len(src.files) == 2
    _same_content(ds, back)
    single, _ = load_ubench(out / "0000.parquet")
    assert len(single) == 200


@pytest.mark.parametrize("layout", ["list_of_structs", "dict_of_lists"])
def test_hub_layout_written_by_pyarrow_alone(sample, sample_rows, tmp_path, layout):
    """A copy this project did not write: plain pyarrow stream shards, no HF metadata, no dataset_info.json."""
    root = write_raw_hub_copy(sample_rows, tmp_path / "hub", n_shards=3, bbox_layout=layout)
    ds, src = load_ubench(root)
    assert src.kind == "hub-layout" and len(src.files) == 3
    assert isinstance(ds.features["image"], datasets.Image)  # struct<bytes,path> recognised as an image
    assert ds[0]["image"].size == (96, 96)
    table = build_question_table(ds)
    ref = build_question_table(sample[0])
    assert len(table.frame) == len(ref.frame) == 5856
    assert table.counts("captions") == ref.counts("captions")
    assert (table.rows["has_bbox"].sum(), table.rows["has_polygon"].sum()) == (114, 102)
    assert (table.frame["gold_idx"].to_numpy() == ref.frame["gold_idx"].to_numpy()).all()


def test_info_cli_on_foreign_hub_layout(sample_rows, tmp_path):
    root = write_raw_hub_copy(sample_rows, tmp_path / "hub", n_shards=2, info=True)
    out = run_cli(["-m", "microbench", "info", str(root), "--json"],
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["rows"] == 328 and rec["unique_image_ids"] == 292
    assert rec["questions"] == {"classification": 328, "domain": 328, "modality": 328, "stain": 312,
                                "subdomain": 328, "submodality": 328}
    assert rec["captions"]["stain_0"] == rec["captions"]["stain_1"] == 312
    assert rec["captions"]["classification_1"] == 328
    assert rec["datasets"]["held_et_al_2010_h2b"] == 24 and rec["datasets"]["held_et_al_2010_galt"] == 18
    assert rec["null_dataset_rows"] == 42
    assert rec["rows_with_bbox"] == 114 and rec["rows_with_polygon"] == 102
    assert rec["invalid"] == []


def test_hub_id_offline_fails_fast_with_options():
    t0 = time.monotonic()
    with pytest.raises(MicroBenchDataError) as err:
        load_ubench("jnirschl/uBench")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "\n" not in msg and "jnirschl/uBench@" + schema.HUB_REVISION in msg
    assert "data.path=sample" in msg and "save_to_disk" in msg and "parquet" in msg


def test_hub_unreachable_fails_in_seconds(monkeypatch):
    """Not offline, but the endpoint never answers: the probe gives up after its timeout, never a hang."""
    import socket

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var)
    silent = socket.socket()  # listens on loopback, never accepts: connect succeeds, no reply ever comes
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        t0 = time.monotonic()
        with pytest.raises(MicroBenchDataError, match="unreachable.*HF_HUB_OFFLINE=1"):
            load_ubench("hf://jnirschl/uBench", hub_timeout_s=1.0)
        assert time.monotonic() - t0 < 5
    finally:
        silent.close()


def test_unknown_path_and_empty_folder(tmp_path):
    with pytest.raises(MicroBenchDataError, match="does not exist"):
        load_ubench(tmp_path / "nope")
    with pytest.raises(MicroBenchDataError, match="no μ-Bench data found"):
        load_ubench(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MicroBenchDataError, match="neither a .parquet nor an .arrow"):
        load_ubench(tmp_path / "x.txt")
    with pytest.raises(MicroBenchDataError, match="no data path"):
        load_ubench("")


def test_missing_shard_is_refused(sample_rows, tmp_path):
    root = write_raw_hub_copy(sample_rows, tmp_path / "hub", n_shards=3)
    (root / "perception/0.1.0/ubench-test-00001-of-00003.arrow").unlink()
    with pytest.raises(MicroBenchDataError, match="found 2 of 3 shards, missing 00001"):
        load_ubench(root)


def test_corrupt_shard_is_refused(tmp_path):
    f = tmp_path / "perception/0.1.0/ubench-test-00000-of-00001.arrow"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"not arrow at all")
    with pytest.raises(MicroBenchDataError, match="not a readable Arrow IPC stream shard"):
        load_ubench(tmp_path)


def _minimal(sample_rows, n=4, **changes):
    rows = [dict(r) for r in sample_rows[:n]]
    for r in rows:
        r.update(changes)
    return rows


def test_missing_column_is_refused(sample, tmp_path):
    ds, _ = sample
    ds.select(range(5)).remove_columns(["captions"]).save_to_disk(str(tmp_path / "a"))
    with pytest.raises(MicroBenchDataError, match="lacks required column\\(s\\) captions"):
        load_ubench(tmp_path / "a")
    # an optional column missing only warns
    ds.select(range(5)).remove_columns(["institution"]).save_to_disk(str(tmp_path / "b"))
    assert len(load_ubench(tmp_path / "b")[0]) == 5


def test_wrong_dtype_is_refused(sample, tmp_path):
    ds, _ = sample
    feats = ds.features.copy()
    feats["microns_per_pixel"] = datasets.Value("string")
    bad = ds.select(range(5)).cast(feats, keep_in_memory=True)  # never write caches next to the sample
    bad.save_to_disk(str(tmp_path / "a"))
    with pytest.raises(MicroBenchDataError, match="column 'microns_per_pixel' has type string, expected floating"):
        load_ubench(tmp_path / "a")


def test_empty_table_is_refused(sample, sample_rows, tmp_path):
    ds, _ = sample
    ds.select([]).save_to_disk(str(tmp_path / "a"))
    with pytest.raises(MicroBenchDataError, match="has no rows"):
        load_ubench(tmp_path / "a")
    write_raw_hub_copy([], tmp_path / "b", n_shards=1)
    with pytest.raises(MicroBenchDataError, match="has no rows"):
        load_ubench(tmp_path / "b")


def test_fingerprint_changes_with_content(sample):
    ds, src = sample
    assert dataset_fingerprint(ds) == src.fingerprint
    assert dataset_fingerprint(ds.select(range(len(ds) - 1))) != src.fingerprint
    flipped = ds.select([1, 0, *range(2, len(ds))])
    assert dataset_fingerprint(flipped) != src.fingerprint


def test_png_helper_roundtrip():
    import numpy as np

    data = png_bytes(np.zeros((4, 4, 3), dtype=np.uint8))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert pa.array([data]).type == pa.binary()


def test_dataset_info_features_are_applied_without_writing(sample_rows, tmp_path):
    """Hub case: pyarrow shards plus a dataset_info.json declaring the features (ClassLabel names, Image)."""
    from microbench.data.sample import sample_features

    root = write_raw_hub_copy(sample_rows, tmp_path / "hub", n_shards=2)
    folder = root / "perception/0.1.0"
    (folder / "dataset_info.json").write_text(json.dumps({"features": sample_features().to_dict()}))
    ds, _ = load_ubench(root)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert schema.label_names(ds)[ds[0]["label"]] == ds[0]["label_name"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "dataset_info.json", "ubench-test-00000-of-00002.arrow", "ubench-test-00001-of-00002.arrow"]
    (folder / "cache-0123.arrow").write_bytes(b"junk")  # a stray datasets cache file is ignored
    assert len(load_ubench(root)[0]) == 328


def test_changing_only_the_pixels_changes_the_fingerprint_and_misses_the_feature_cache(sample_rows, tmp_path):
    """Caches key on the data fingerprint: a copy whose every image changed under the same ids must be a miss
    (the linear probe and the forgetting study used to reuse the old copy's embeddings and results)."""
    import copy

    from microbench.data.datamodule import PerceptionDataModule
    from microbench.models.features import FeatureCache

    rows = [copy.deepcopy(r) for r in sample_rows[:12]]
    a = write_raw_hub_copy(rows, tmp_path / "a", n_shards=1)
    for r in rows:  # same ids, captions and questions; other pixels
        r["image"]["bytes"] = png_bytes(np.full((96, 96, 3), 17, np.uint8))
    b = write_raw_hub_copy(rows, tmp_path / "b", n_shards=1)
    fa, fb = load_ubench(str(a))[1].fingerprint, load_ubench(str(b))[1].fingerprint
    assert fa != fb
    assert load_ubench(str(write_raw_hub_copy(sample_rows[:12], tmp_path / "a2", n_shards=2)))[1].fingerprint == fa
    bb = build_model("tiny")
    cache = FeatureCache(tmp_path / "cache")
    hits = []
    for root in (a, b, a):
        dm = PerceptionDataModule(str(root), transform=bb.preprocess)
        dm.setup()
        hits.append(cache.get(bb, dm, progress=False)[2])
    assert hits == [False, False, True]


def test_a_copy_is_read_once_per_process_until_a_file_of_it_changes(sample_rows, tmp_path, monkeypatch):
    """Each data module of a run sets up its own view of the copy (the fit, the in-domain check, the study's val and
    test splits: five loads of one copy per demo run); the copy is read, checked and hashed once per process and
    served again while every file under it is unchanged (path, size, mtime, inode). A shard rewritten in place is
    another copy: read again, with its new fingerprint. Each caller gets its own DataSource."""
    from microbench.data import loading

    root = write_raw_hub_copy(sample_rows[:40], tmp_path / "copy", n_shards=2)
    reads = []
    real = datasets.Dataset.from_file
    monkeypatch.setattr(datasets.Dataset, "from_file", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    ds1, src1 = load_ubench(root)
    ds2, src2 = load_ubench(root)
    assert len(reads) == 2 and ds2 is ds1 and src2 == src1 and src2 is not src1  # 2 shards, read once
    src2.files.append("x")
    assert load_ubench(root)[1].files == src1.files and len(reads) == 2  # a caller's edit stays its own
    write_raw_hub_copy(sample_rows[40:80], tmp_path / "copy", n_shards=2)  # the same files, other rows
    ds3, src3 = load_ubench(root)
    assert len(reads) == 4 and src3.fingerprint != src1.fingerprint
    assert ds3["image_id"] == [r["image_id"] for r in sample_rows[40:80]]
    from microbench.resources import SAMPLE_DIR

    assert load_ubench("sample")[1].kind == "sample"  # the embedded sample, and its folder named as a path:
    assert load_ubench(SAMPLE_DIR)[1].kind == "hub-layout"  # two loads (another kind of source), not one
    assert len(loading._LOADED) <= loading._LOADED_KEPT
