"""LightningDataModule over μ-Bench perception: each unique image once per epoch, with the rows it answers.

Scoring never decodes an image twice: the module yields unique images (``image_id``) with their row indices, and
the question table maps rows to questions. Under DDP, evaluation shards images exactly (rank r takes images
r, r+W, r+2W, ...) with no padding duplicates, so metrics equal the single-device ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from microbench import distributed
from microbench.data import splits as splits_mod
from microbench.data.loading import DataSource, MicroBenchDataError, is_hub_id, load_ubench
from microbench.data.questions import QuestionTable, build_question_table
from microbench.data.schema import HUB_REVISION
from microbench.options import NonNegativeInt, PositiveInt, checked

log = logging.getLogger(__name__)


def default_transform(image_size: int = 224) -> Callable:
    """Resize + centre-crop + float tensor in [0, 1]; backbones pass their own transform instead."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
    ])


class UniqueImageDataset(Dataset):
    """Decodes one image per unique ``image_id``; a corrupt image yields an error record instead of raising."""

    def __init__(self, hf_images, rep_rows: np.ndarray, transform: Callable | None):
        self.hf_images = hf_images  # a datasets.Dataset holding only the `image` column
        self.rep_rows = np.asarray(rep_rows, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rep_rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rep_rows[i])
        try:
            img = self.hf_images[row]["image"].convert("RGB")
            pixels = self.transform(img) if self.transform is not None else img
        except Exception as err:  # noqa: BLE001 - a bad image is a counted skip, never a crash
            return {"index": i, "pixel_values": None, "error": f"row {row}: {type(err).__name__}: {err}"}
        return {"index": i, "pixel_values": pixels, "error": None}


class CachedImageDataset(UniqueImageDataset):
    """:class:`UniqueImageDataset` through a :class:`~microbench.data.pixel_cache.PixelCache`: each image decoded
    once per copy and geometry (by any run), read back as uint8; the batch carries the transform's finishing
    steps (to float, normalise), applied where the encoder runs (:func:`pixels_of`: on the GPU, a quarter of the
    bytes cross to it)."""

    def __init__(self, hf_images, rep_rows: np.ndarray, cache) -> None:
        super().__init__(hf_images, rep_rows, cache.split)
        self.cache = cache

    def __getitem__(self, i: int) -> dict:
        row = int(self.rep_rows[i])
        u8 = self.cache.get(row)
        if u8 is None:
            try:
                u8 = self.cache.split.to_uint8(self.hf_images[row]["image"].convert("RGB"))
            except Exception as err:  # noqa: BLE001 - a bad image is a counted skip, never a crash
                return {"index": i, "pixel_values": None, "error": f"row {row}: {type(err).__name__}: {err}"}
            self.cache.put(row, u8)
        return {"index": i, "pixel_values": u8, "error": None, "finish": self.cache.split.finish}


def collate_images(batch: Sequence[dict]) -> dict:
    """Stack decoded images; indices of images that failed to decode travel in ``failed`` with their errors."""
    ok = [b for b in batch if b["pixel_values"] is not None]
    bad = [b for b in batch if b["pixel_values"] is None]
    pixels = torch.stack([b["pixel_values"] for b in ok]) if ok and isinstance(ok[0]["pixel_values"], torch.Tensor) \
        else [b["pixel_values"] for b in ok]
    out = {
        "pixel_values": pixels if ok else None,
        "image_index": torch.tensor([b["index"] for b in ok], dtype=torch.long),
        "failed": torch.tensor([b["index"] for b in bad], dtype=torch.long),
        "errors": [b["error"] for b in bad],
    }
    if ok and ok[0].get("finish") is not None:
        out["finish"] = ok[0]["finish"]
    return out


def pixels_of(batch: dict, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The model input of an image batch on ``device``: uint8 pixels from the pixel cache are moved as uint8 and
    finished (to float, normalised) there; anything else is moved as it is. None when nothing in it decoded."""
    pixels = batch["pixel_values"]
    if pixels is None:
        return None
    if device is not None:
        pixels = pixels.to(device, non_blocking=True)
    finish = batch.get("finish")
    return finish(pixels) if finish is not None and pixels.dtype == torch.uint8 else pixels  # finished once


class ExactDistributedSampler(DistributedSampler):
    """Rank r takes items r, r+W, ...: every item exactly once across ranks, no padding (for evaluation).

    A subclass of DistributedSampler so that Lightning keeps it instead of inserting a padding one.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas if num_replicas is not None else distributed.world_size(),
                         rank=rank if rank is not None else distributed.rank(), shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


@dataclass
class ImageTable:
    """Unique images of one split: representative row and all rows of each image."""

    image_id: np.ndarray
    rep_row: np.ndarray
    rows: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.image_id)


def unique_images(rows: pd.DataFrame) -> ImageTable:
    """Group rows by image (``image_key`` when present, see :func:`image_content_keys`, else ``image_id``), in order
    of first appearance (vectorized: one factorize and one sort)."""
    if len(rows) == 0:
        return ImageTable(np.array([], dtype=object), np.array([], dtype=np.int64), [])
    row_idx = rows["row_idx"].to_numpy(dtype=np.int64)
    key = "image_key" if "image_key" in rows else "image_id"
    codes, uniques = pd.factorize(rows[key].astype(str).to_numpy(), sort=False)
    order = np.lexsort((row_idx, codes))
    sorted_rows = row_idx[order]
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    groups = np.split(sorted_rows, bounds)
    first = np.array([g[0] for g in groups], dtype=np.int64)
    by_first = np.argsort(first, kind="stable")
    return ImageTable(np.asarray(uniques, dtype=object)[by_first], first[by_first], [groups[i] for i in by_first])


def as_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def image_content_keys(hf, rows: pd.DataFrame) -> tuple[np.ndarray, list[dict]]:
    """One key per row naming the image it is scored on: its ``image_id``, unless rows sharing that id carry
    different image bytes, in which case each distinct image gets ``<image_id>#<sha256 prefix>`` (and the id is
    reported). In the release one id is one image (Burgess images serve three tasks), but nothing guarantees it,
    and a row must never be scored on another row's pixels. Only rows whose id repeats are read (raw bytes, no
    decoding). Returns (keys, conflicts) with conflicts ``[{image_id, rows, distinct_images}]``."""
    import hashlib

    from datasets import Image

    ids = rows["image_id"].astype(str).to_numpy()
    keys = ids.astype(object).copy()
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if not dup.any() or "image" not in hf.column_names:
        return keys, []
    pos = np.flatnonzero(dup)
    raw = hf.select_columns(["image"]).cast_column("image", Image(decode=False))
    values = raw.select(rows["row_idx"].to_numpy()[pos].tolist())["image"]
    digests = []
    for v in values:
        data = (v or {}).get("bytes")
        if data is None and (v or {}).get("path"):
            data = str(v["path"]).encode()
        digests.append(hashlib.sha256(data or b"").hexdigest()[:12])
    frame = pd.DataFrame({"pos": pos, "id": ids[pos], "digest": digests})
    conflicts = []
    for image_id, g in frame.groupby("id", sort=False):
        if g["digest"].nunique() > 1:
            keys[g["pos"].to_numpy()] = [f"{image_id}#{d}" for d in g["digest"]]
            conflicts.append({"image_id": str(image_id),
                              "rows": [int(r) for r in rows["row_idx"].to_numpy()[g["pos"].to_numpy()]],
                              "distinct_images": int(g["digest"].nunique())})
    if conflicts:
        log.warning("%d image_id(s) are shared by rows with different image bytes (e.g. %s, rows %s): each row is "
                    "scored on its own image", len(conflicts), conflicts[0]["image_id"], conflicts[0]["rows"])
    return keys, conflicts


def load_split_rows(path: str, revision: str | None, spec: splits_mod.SplitSpec):
    """Load a copy, build its question table and assign every row its split: (hf, source, table, rows).

    ``rows["image_key"]`` names the image each row is scored on (see :func:`image_content_keys`); conflicts are
    kept in ``table.image_conflicts``."""
    hf, source = load_ubench(path, revision)
    table = build_question_table(hf)
    rows = table.rows.copy()
    rows["split"] = splits_mod.assign_splits(rows, spec)
    rows["image_key"], table.image_conflicts = image_content_keys(hf, rows)
    return hf, source, table, rows


def empty_split_message(split: str, dm) -> str:
    """One line for a split with nothing in it (``split_fractions`` giving it 0, or filters leaving it empty)."""
    fr = dict(zip(("train", "val", "test"), (dm.split_spec.train, dm.split_spec.val, dm.split_spec.test),
                  strict=True))
    why = f"data.split_fractions gives it {fr[split]:g}" if split in fr and fr[split] == 0 else (
        f"the kept rows (filters {({k: v for k, v in dm.filters.items() if v}) or 'none'}) have no {split} image")
    return (f"the {split} split of {dm.source.location if dm.source else dm.path} is empty ({why}): choose another "
            "data.split or data.split_fractions, or keep more datasets")


def prepare_hub_copy(dm) -> None:
    """Download once per node when reading from the Hub (a no-op for local copies and the sample)."""
    if dm.hf is None and is_hub_id(dm.path):
        load_ubench(dm.path, dm.revision)


class SplitLoaders:
    """Lightning's train/val/test loaders for a data module whose ``_loader(split, train)`` builds one; the test
    loader serves the module's evaluation ``split``."""

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split, train=False)

    def encoded_image(self, row: int) -> list[bytes]:
        """The image of dataset row ``row`` as stored (PNG/JPEG bytes, never decoded): what a generative model is
        sent. Needs ``setup()``."""
        if getattr(self, "_encoded", None) is None:
            from datasets import Image

            self._encoded = self.hf.cast_column("image", Image(decode=False))
        value = self._encoded[int(row)]["image"]
        return [value["bytes"] if value.get("bytes") else Path(value["path"]).read_bytes()]


class PerceptionDataModule(SplitLoaders, L.LightningDataModule):
    """μ-Bench perception as unique images with their rows and questions.

    Args:
        path: any copy :func:`~microbench.data.loading.load_ubench` reads (``sample``, Hub id, folder, files).
        revision: Hub revision (pinned by default).
        split: the split served by ``test_dataloader``/``predict_dataloader``: ``all`` (the official protocol
            scores the whole release), ``train``, ``val`` or ``test``. ``train``/``val`` loaders always serve
            those splits.
        split_seed, split_fractions: the split specification (train, val, test fractions).
        datasets, domains, modalities, subdomains: keep only rows matching these (resolved dataset names).
        exclude_datasets: drop these datasets (e.g. the Eulenberg darkfield/epifluorescence exclusion).
        strict_filters: a filter value absent from the copy is an error (catches typos); set False for preset
            slices such as the official pathology list on a partial copy (absent names are then logged).
        transform: image transform (a backbone's preprocess); default resize-crop to ``image_size``.
        pixel_cache: a folder for decoded images at the transform's geometry (:mod:`microbench.data.pixel_cache`),
            used by every evaluation loader (scoring, features, studies); None: decode every time.
    """

    @checked("data", MicroBenchDataError)
    def __init__(
        self,
        path: str = "sample",
        revision: str | None = HUB_REVISION,
        split: splits_mod.SplitName = "all",
        split_seed: int = 0,
        split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
        datasets: Sequence[str] | str | None = None,
        exclude_datasets: Sequence[str] | str | None = None,
        domains: Sequence[str] | str | None = None,
        modalities: Sequence[str] | str | None = None,
        subdomains: Sequence[str] | str | None = None,
        batch_size: PositiveInt = 32,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool = False,
        image_size: int = 224,
        strict_filters: bool = True,
        transform: Callable | None = None,
        train_transform: Callable | None = None,
        pixel_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.pixel_cache = str(pixel_cache) if pixel_cache else None
        self._pixel_caches: dict = {}
        self.path, self.revision, self.split = path, revision, split
        self.split_spec = splits_mod.SplitSpec(split_seed, *map(float, split_fractions))
        self.filters = {"dataset": as_list(datasets), "domain": as_list(domains),
                        "modality": as_list(modalities), "subdomain": as_list(subdomains)}
        self.exclude_datasets = as_list(exclude_datasets) or []
        self.strict_filters = strict_filters
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory = pin_memory
        self.transform = transform or default_transform(image_size)
        self.train_transform = train_transform or self.transform
        self.hf = None
        self.source: DataSource | None = None
        self.question_table: QuestionTable | None = None
        self.rows: pd.DataFrame | None = None
        self._images: dict[str, ImageTable] = {}

    # --- setup ------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        prepare_hub_copy(self)

    def setup(self, stage: str | None = None) -> None:
        if self.hf is not None:
            return
        hf, self.source, self.question_table, rows = load_split_rows(self.path, self.revision, self.split_spec)
        keep = np.ones(len(rows), dtype=bool)
        for col, wanted in self.filters.items():
            if wanted is None:
                continue
            present = set(rows[col].dropna().astype(str)) if col in rows else set()
            unknown = sorted(set(wanted) - present)
            if unknown and not self.strict_filters:
                log.warning("%s filter: %s not in %s; using the rest", col, unknown, self.source.location)
            elif unknown:
                raise MicroBenchDataError(
                    f"{col} filter names {unknown} not found in {self.source.location}; available: {sorted(present)}"
                )
            keep &= rows[col].isin(wanted).to_numpy()
        if self.exclude_datasets:
            keep &= ~rows["dataset"].isin(self.exclude_datasets).to_numpy()
        if not keep.any():
            raise MicroBenchDataError(f"the filters {self.filters} leave no rows in {self.source.location}")
        self.rows = rows[keep].reset_index(drop=True)
        self.hf = hf.select_columns(["image"])
        for name in (*splits_mod.SPLITS, splits_mod.ALL):
            sel = self.rows if name == splits_mod.ALL else self.rows[self.rows["split"] == name]
            self._images[name] = unique_images(sel)
        log.info("μ-Bench %s: %d rows, %d unique images (%s split: %d)", self.source.location, len(self.rows),
                 len(self._images["all"]), self.split, len(self._images[self.split]))

    # --- accessors --------------------------------------------------------------------------------------------
    def images(self, split: str | None = None) -> ImageTable:
        self._require_setup()
        return self._images[split or self.split]

    def questions(self, split: str | None = None) -> pd.DataFrame:
        """Question-table items of the kept rows of one split (default: the evaluation split)."""
        self._require_setup()
        split = split or self.split
        frame = self.question_table.frame
        if split == splits_mod.ALL and len(self.rows) == len(self.question_table.rows):
            return frame  # nothing filtered: no copy (the table is O(items), large on the full release)
        rows = self.rows if split == splits_mod.ALL else self.rows[self.rows["split"] == split]
        return frame[frame["row_idx"].isin(rows["row_idx"])]

    def _require_setup(self) -> None:
        if self.hf is None:
            raise RuntimeError("call setup() before using the data module")

    # --- loaders ----------------------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        self._require_setup()
        table = self._images[split]
        if len(table) == 0:
            raise MicroBenchDataError(empty_split_message(split, self))
        cache = None if train else self.cached_pixels()
        ds = (CachedImageDataset(self.hf, table.rep_row, cache) if cache is not None else
              UniqueImageDataset(self.hf, table.rep_row, self.train_transform if train else self.transform))
        sampler = ExactDistributedSampler(ds) if (not train and distributed.world_size() > 1) else None
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=train and sampler is None, sampler=sampler,
            num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=collate_images,
            persistent_workers=False, drop_last=False,
        )

    def cached_pixels(self):
        """The :class:`~microbench.data.pixel_cache.PixelCache` of this copy at the evaluation transform's geometry
        (made once; its size and fill said once), or None: no ``pixel_cache`` folder, or a transform it cannot split
        (said once)."""
        if not self.pixel_cache:
            return None
        key = id(self.transform)
        if key not in self._pixel_caches:
            from microbench.data.pixel_cache import PixelCache, describe_size, split_transform

            split, why = split_transform(self.transform)
            if split is None:
                log.info("pixel cache off for this transform: %s (images are decoded every time)", why)
                self._pixel_caches[key] = None
            else:
                cache = PixelCache(self.pixel_cache, self.source.fingerprint, len(self.hf), split)
                log.info("pixel cache %s: up to %s (%d rows × %s uint8), %d images there "
                         "(data.pixel_cache=null turns it off)", cache.folder, describe_size(cache.estimate_bytes),
                         cache.n_rows, "×".join(map(str, cache.shape)), cache.filled())
                self._pixel_caches[key] = cache
        return self._pixel_caches[key]

    def image_loader(self, split: str) -> DataLoader:
        """Every unique image of ``split`` once, with the evaluation transform (features, studies)."""
        return self._loader(split, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.split, train=False)
