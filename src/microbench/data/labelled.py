"""Row-level labelled data for probes and fine-tuning: one class space over the kept source datasets.

Classes are (dataset, label_name) pairs: a class belongs to exactly one source dataset, and predictions are made
within the image's own dataset (logits of other datasets' classes are masked), exactly like the per-dataset closed
VQA. Each class carries its prompts: the gold options of the row's ``classification_*`` caption sets, i.e. the
dataset's own caption templates filled with the class name, used for zero-shot heads and contrastive fine-tuning.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from microbench import distributed
from microbench.data.datamodule import ExactDistributedSampler, PerceptionDataModule, empty_split_message
from microbench.data.loading import MicroBenchDataError
from microbench.data.splits import SPLITS


@dataclass
class ClassSpace:
    """The classes of the kept datasets, with their prompts and a per-dataset mask."""

    classes: list[tuple[str, str]]  # (dataset, label_name)
    prompts: list[list[str]]  # per class: caption texts naming it
    datasets: list[str]
    class_dataset: np.ndarray = field(repr=False)  # class index -> dataset index

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def mask(self) -> torch.Tensor:
        """[n_datasets, n_classes] boolean: which classes each dataset may predict."""
        m = torch.zeros(len(self.datasets), self.num_classes, dtype=torch.bool)
        m[torch.from_numpy(self.class_dataset), torch.arange(self.num_classes)] = True
        return m

    def to_dict(self) -> dict:
        return {"classes": [list(c) for c in self.classes], "prompts": self.prompts, "datasets": self.datasets}


def build_class_space(rows: pd.DataFrame, questions: pd.DataFrame) -> tuple[ClassSpace, np.ndarray, list[list[str]]]:
    """Class space of ``rows`` plus, per row, its class index and its caption texts (gold classification options)."""
    labels = rows["label_name"].astype(str).to_numpy()
    names = rows["dataset"].astype(str).to_numpy()
    pairs = sorted(set(zip(names, labels, strict=True)))
    index = {p: i for i, p in enumerate(pairs)}
    datasets = sorted({d for d, _ in pairs})
    ds_index = {d: i for i, d in enumerate(datasets)}
    class_of_row = np.array([index[(d, lab)] for d, lab in zip(names, labels, strict=True)], dtype=np.int64)

    caps = questions[(questions["source"] == "captions") & (questions["question_type"] == "classification")
                     & questions["valid"]]
    gold_text = {}
    for r, opts, g in zip(caps["row_idx"], caps["options"], caps["gold_idx"], strict=True):
        gold_text.setdefault(int(r), []).append(str(opts[int(g)]))
    row_texts, prompts = [], [[] for _ in pairs]
    for r, c, lab in zip(rows["row_idx"], class_of_row, labels, strict=True):
        texts = gold_text.get(int(r)) or [f"a micrograph of {lab.replace('_', ' ')}."]
        row_texts.append(texts)
        for t in texts:
            if t not in prompts[c]:
                prompts[c].append(t)
    space = ClassSpace(pairs, prompts, datasets, np.array([ds_index[d] for d, _ in pairs], dtype=np.int64))
    return space, class_of_row, row_texts


class LabelledRowDataset(Dataset):
    """One item per labelled row: image, class, dataset and one of its caption texts (random variant).

    Augmentation and the caption choice are seeded by (seed, epoch, index) in a forked RNG, so an epoch's items
    are the same whether or not the run was resumed, and in whichever worker they are made.
    """

    def __init__(self, hf_images, rows: np.ndarray, classes: np.ndarray, dataset_ids: np.ndarray,
                 texts: list[list[str]], transform: Callable, seed: int = 0):
        self.hf_images, self.rows, self.classes, self.dataset_ids = hf_images, rows, classes, dataset_ids
        self.texts, self.transform, self.seed = texts, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        item_seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(i)) % 2**62
        try:
            image = self.hf_images[row]["image"].convert("RGB")
            with torch.random.fork_rng(devices=[]):  # the CPU generator alone, restored after the item
                torch.default_generator.manual_seed(item_seed)  # not torch.manual_seed: that also seeds every
                pixels = self.transform(image)  # accelerator's generators outside the fork, formatting a stack each
        except Exception as err:  # noqa: BLE001 - counted skip
            return {"pixel_values": None, "index": i, "error": f"row {row}: {type(err).__name__}: {err}"}
        texts = self.texts[i]
        return {"pixel_values": pixels, "index": i, "error": None, "label": int(self.classes[i]),
                "dataset_idx": int(self.dataset_ids[i]), "row_idx": row,
                "text": texts[random.Random(item_seed).randrange(len(texts))] if len(texts) > 1 else texts[0]}


class EpochSampler(Sampler):
    """A random permutation that depends only on (seed, epoch); Lightning calls ``set_epoch`` every epoch."""

    def __init__(self, dataset: LabelledRowDataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(len(self.dataset), generator=g).tolist())


def collate_labelled(batch: list[dict]) -> dict:
    ok = [b for b in batch if b["pixel_values"] is not None]
    out = {
        "pixel_values": torch.stack([b["pixel_values"] for b in ok]) if ok else None,
        "label": torch.tensor([b["label"] for b in ok], dtype=torch.long),
        "dataset_idx": torch.tensor([b["dataset_idx"] for b in ok], dtype=torch.long),
        "row_idx": torch.tensor([b["row_idx"] for b in ok], dtype=torch.long),
        "index": torch.tensor([b["index"] for b in ok], dtype=torch.long),
        "text": [b["text"] for b in ok],
        "errors": [b["error"] for b in batch if b["pixel_values"] is None],
    }
    return out


class LabelledDataModule(PerceptionDataModule):
    """:class:`PerceptionDataModule` serving labelled rows (train/val/test splits) for probes and fine-tuning.

    ``drop_last_train`` keeps contrastive batches full; evaluation loaders shard rows exactly under DDP.
    """

    def __init__(self, *args, drop_last_train: bool = False, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_last_train = drop_last_train
        self.seed = seed
        self.class_space: ClassSpace | None = None
        self._labelled: dict[str, dict] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.class_space is not None:
            return
        super().setup(stage)
        space, class_of_row, texts = build_class_space(self.rows, self.question_table.frame)
        self.class_space = space
        ds_ids = space.class_dataset[class_of_row]
        for split in SPLITS:
            sel = np.flatnonzero((self.rows["split"] == split).to_numpy())
            self._labelled[split] = {"rows": self.rows["row_idx"].to_numpy()[sel], "classes": class_of_row[sel],
                                     "dataset_ids": ds_ids[sel], "texts": [texts[i] for i in sel]}

    def labelled(self, split: str) -> dict:
        """Rows, class indices, dataset indices and caption texts of one split."""
        self._require_setup()
        return self._labelled[split]

    def _labelled_loader(self, split: str, train: bool) -> DataLoader:
        d = self.labelled(split)
        if len(d["rows"]) == 0:
            raise MicroBenchDataError(empty_split_message(split, self))
        ds = LabelledRowDataset(self.hf, d["rows"], d["classes"], d["dataset_ids"], d["texts"],
                                self.train_transform if train else self.transform, seed=self.seed)
        if train:
            sampler = EpochSampler(ds, seed=self.seed)
        else:
            sampler = ExactDistributedSampler(ds) if distributed.world_size() > 1 else None
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=collate_labelled,
                          drop_last=train and self.drop_last_train and len(ds) >= self.batch_size)

    def unsharded_loader(self, split: str) -> DataLoader:
        """Every row of ``split`` in order, the evaluation transform, on every rank (e.g. the features an LP-FT
        probe is fitted on: each rank fits the same probe)."""
        d = self.labelled(split)
        ds = LabelledRowDataset(self.hf, d["rows"], d["classes"], d["dataset_ids"], d["texts"], self.transform,
                                seed=self.seed)
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_labelled)

    def train_dataloader(self) -> DataLoader:
        return self._labelled_loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._labelled_loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._labelled_loader("test", train=False)
