"""PerceptionDataModule: unique images once per epoch, filters, bad images, exact DDP sharding."""

from __future__ import annotations

import copy
import json

import datasets
import lightning as L
import numpy as np
import pytest
import torch

from microbench.data.datamodule import ExactDistributedSampler, PerceptionDataModule, unique_images
from microbench.data.loading import MicroBenchDataError
from microbench.data.sample import sample_features


def _collect(loader):
    seen, failed, errors = [], [], []
    for batch in loader:
        seen += batch["image_index"].tolist()
        failed += batch["failed"].tolist()
        errors += batch["errors"]
        if batch["pixel_values"] is not None:
            assert batch["pixel_values"].shape[1:] == (3, 64, 64)
            assert batch["pixel_values"].dtype == torch.float32
    return seen, failed, errors


def test_each_unique_image_once_with_its_rows(sample):
    dm = PerceptionDataModule("sample", batch_size=16, image_size=64)
    dm.setup("test")
    imgs = dm.images()
    assert len(imgs) == 292 and len(set(imgs.image_id)) == 292
    assert sum(len(r) for r in imgs.rows) == 328  # every row belongs to exactly one image
    assert sorted(np.concatenate(imgs.rows).tolist()) == list(range(328))
    shared = [r for r in imgs.rows if len(r) > 1]
    assert len(shared) == 18 and all(len(r) == 3 for r in shared)  # the Burgess images
    seen, failed, _ = _collect(dm.test_dataloader())
    assert sorted(seen) == list(range(292)) and failed == []
    ds = sample[0]
    for i in (0, 100, 291):  # image i really is the image of all its rows
        ids = {ds[int(r)]["image_id"] for r in imgs.rows[i]}
        assert ids == {imgs.image_id[i]}


def test_splits_and_filters(sample):
    dm = PerceptionDataModule("sample", split="test", datasets=["kather_et_al_2016", "held_et_al_2010_galt"],
                              image_size=32)
    dm.setup()
    assert set(dm.rows["dataset"]) == {"kather_et_al_2016", "held_et_al_2010_galt"}
    ids = {s: set(dm.images(s).image_id) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"]) and not (ids["val"] & ids["test"])
    assert len(dm.images("all")) == 50 == sum(map(len, ids.values()))
    q = dm.questions()
    assert set(q["row_idx"]) == set(dm.rows.loc[dm.rows["split"] == "test", "row_idx"])
    assert len(dm.questions("all")) == 50 * 18

    dm2 = PerceptionDataModule("sample", domains="pathology", exclude_datasets=["sirinukunwattana_et_al_2016"])
    dm2.setup()
    assert set(dm2.rows["domain"]) == {"pathology"} and "sirinukunwattana_et_al_2016" not in set(dm2.rows["dataset"])
    with pytest.raises(MicroBenchDataError, match="dataset filter names \\['nope'\\] not found"):
        PerceptionDataModule("sample", datasets=["nope"]).setup()
    with pytest.raises(ValueError, match="split must be one of"):
        PerceptionDataModule("sample", split="validation")


def test_corrupt_png_is_a_counted_skip(sample_rows, tmp_path):
    rows = [copy.deepcopy(r) for r in sample_rows[:10]]
    rows[3]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n-truncated-garbage", "path": "bad.png"}
    datasets.Dataset.from_list(rows, features=sample_features()).save_to_disk(str(tmp_path / "c"))
    dm = PerceptionDataModule(str(tmp_path / "c"), batch_size=4, image_size=64)
    dm.setup()
    seen, failed, errors = _collect(dm.test_dataloader())
    assert failed == [3] and sorted(seen) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert len(errors) == 1 and errors[0].startswith("row 3: ")


def test_workers_decode_the_same(sample):
    dm0 = PerceptionDataModule("sample", batch_size=32, image_size=32, datasets=["acevedo_et_al_2020"])
    dm2 = PerceptionDataModule("sample", batch_size=32, image_size=32, datasets=["acevedo_et_al_2020"],
                               num_workers=2)
    dm0.setup()
    dm2.setup()
    a = torch.cat([b["pixel_values"] for b in dm0.test_dataloader()])
    b = torch.cat([b["pixel_values"] for b in dm2.test_dataloader()])
    assert torch.equal(a, b) and a.shape[0] == 32


def test_exact_sampler_without_padding():
    data = list(range(7))
    parts = [list(ExactDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ExactDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]


def test_unique_images_order_and_grouping():
    import pandas as pd

    rows = pd.DataFrame({"row_idx": [0, 1, 2, 3, 4], "image_id": ["b", "a", "b", "c", "a"]})
    t = unique_images(rows)
    assert list(t.image_id) == ["b", "a", "c"] and list(t.rep_row) == [0, 1, 3]
    assert [list(r) for r in t.rows] == [[0, 2], [1, 4], [3]]


class _Recorder(L.LightningModule):
    """Records which images each rank sees during `trainer.test`."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.seen: list[int] = []
        self.layer = torch.nn.Linear(1, 1)

    def test_step(self, batch, batch_idx):
        self.seen += batch["image_index"].tolist()

    def on_test_epoch_end(self):
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)


@pytest.mark.slow
def test_ddp_spawn_sees_every_image_exactly_once(tmp_path):
    """2 CPU processes; an odd number of images, so any padding would show up as a duplicate."""
    dm = PerceptionDataModule("sample", split="test", batch_size=4, image_size=32)
    dm.setup()
    n = len(dm.images())
    assert n % 2 == 1, n
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.test(_Recorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(n))  # each image exactly once, no padding duplicate
    assert (len(ranks[0]), len(ranks[1])) == ((n + 1) // 2, n // 2)
