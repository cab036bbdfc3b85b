"""Seeded, stratified, image-grouped train/val/test splits of a benchmark that ships only ``test``.

Every unique ``image_id`` gets one split, so an image reused by several tasks (Burgess synthetic cells) can never
straddle train and test. Images are stratified by (dataset, label) of their first row, and assigned by systematic
sampling with a per-stratum random offset, which keeps each stratum's fractions exact in expectation even when
strata are small. The assignment of an image depends only on the seed and on the images of its own stratum, not on
which other datasets are loaded, so filtering never reshuffles a split.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from microbench.data.loading import MicroBenchDataError

SPLITS = ("train", "val", "test")
ALL = "all"
#: what ``split`` may name: one split, or ``all`` (the official protocol: every row)
SplitName = Literal[(ALL, *SPLITS)]


@dataclass(frozen=True)
class SplitSpec:
    """How splits were made; recorded in every results file."""

    seed: int = 0
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
    method: str = "stratified(dataset,label)-grouped(image_id)-systematic"

    def __post_init__(self) -> None:
        fr = (self.train, self.val, self.test)
        if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise MicroBenchDataError(f"data.split_fractions must be non-negative and sum to 1, got train={self.train} "
                             f"val={self.val} test={self.test}")

    def to_dict(self) -> dict:
        return asdict(self)


def _stable_u64(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def assign_splits(rows: pd.DataFrame, spec: SplitSpec = SplitSpec()) -> pd.Series:
    """Split name ("train"/"val"/"test") for every row of ``rows`` (columns image_id, dataset, label_name).

    Returns a Series aligned with ``rows.index``.
    """
    label = rows["label_name"] if "label_name" in rows else pd.Series("", index=rows.index)
    frame = pd.DataFrame({"image_id": rows["image_id"].astype(str).to_numpy(),
                          "dataset": rows["dataset"].astype(str).to_numpy(),
                          "label": label.astype(str).fillna("").to_numpy()})
    # one stratum per image: (dataset, label) of its alphabetically first dataset
    per_image = frame.sort_values(["image_id", "dataset"]).drop_duplicates("image_id")
    cuts = np.cumsum([spec.train, spec.val])
    split_of: dict[str, str] = {}
    for (ds_name, lab), group in per_image.groupby(["dataset", "label"], sort=True):
        ids = np.sort(group["image_id"].to_numpy())
        rng = np.random.default_rng(_stable_u64(spec.seed, ds_name, lab))
        order = rng.permutation(len(ids))
        u = (np.arange(len(ids)) + rng.random()) / len(ids)  # systematic positions in [0, 1)
        names = np.where(u < cuts[0], "train", np.where(u < cuts[1], "val", "test"))
        split_of.update(zip(ids[order], names, strict=True))
    return pd.Series(frame["image_id"].map(split_of).to_numpy(), index=rows.index, name="split")
