"""Localization data: boxes and instance masks from μ-Bench's ``bbox`` / ``polygon`` columns, per unique image.

Only rows that carry annotations take part (Burgess synthetic cells, Held H2B/GalT, Wu et al. mitochondria, GlaS,
OpenCell, and any other row with a non-empty ``bbox`` or ``polygon``). Each unique ``image_id`` becomes one
detection sample whose targets are:

- ``targets="boxes"``: boxes from the ``bbox`` column (what the official GRIT evaluation scores); rows without a
  ``bbox`` fall back to the bounds of their polygons;
- ``targets="masks"``: one instance per polygon (rasterised with pycocotools RLE) with the polygon's bounds as its
  box; images without polygons are left out and counted.

Class names come from ``className`` (a missing name becomes ``object``); label ids are 1..K in the order of
``classes`` when given (so a trained head's class list reproduces its label ids), else in sorted name order (0 is the
background, as in torchvision's detectors). Boxes are ``[x1, y1, x2, y2]`` in absolute pixels of the
stored image; boxes are clipped to the image and degenerate ones (zero width or height) are dropped and counted.
Splits are the perception splits (same seed, same grouping by ``image_id``), so a localization test image is never
a training image of a perception fine-tune with the same split seed. :meth:`LocalizationDataModule.to_coco` exports
the ground truth of a split in COCO format.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from microbench import distributed
from microbench.data import splits as splits_mod
from microbench.data.datamodule import (
    ExactDistributedSampler,
    SplitLoaders,
    as_list,
    load_split_rows,
    prepare_hub_copy,
)
from microbench.data.loading import DataSource, MicroBenchDataError
from microbench.data.schema import HUB_REVISION, parse_bboxes, parse_polygons
from microbench.options import NonNegativeInt, PositiveInt, checked

log = logging.getLogger(__name__)

TARGETS = ("boxes", "masks")
DEFAULT_CLASS = "object"


@dataclass
class LocImage:
    """One unique image with its instances (boxes xyxy in pixels, class names, optional flat polygons)."""

    row: int
    image_id: str
    dataset: str
    split: str
    width: int
    height: int
    classes: list[str]
    boxes: np.ndarray  # float32 [N, 4]
    polygons: list[list[float]] | None = None  # flat [x1, y1, x2, y2, ...] per instance (targets="masks")
    label_name: str = ""

    @property
    def n(self) -> int:
        return len(self.classes)


@dataclass
class LocalizationTable:
    images: list[LocImage]
    class_names: list[str]
    skipped: dict = field(default_factory=dict)

    def label_of(self, name: str) -> int:
        return self.class_names.index(name) + 1

    def frame(self) -> pd.DataFrame:
        """One row per image: row, image_id, dataset, split, size and instance count."""
        return pd.DataFrame([{"row": im.row, "image_id": im.image_id, "dataset": im.dataset, "split": im.split,
                              "width": im.width, "height": im.height, "instances": im.n,
                              "classes": ",".join(sorted(set(im.classes)))} for im in self.images])


def _image_sizes(hf, rows: Sequence[int]) -> list[tuple[int, int]]:
    """(width, height) of the given rows from the image headers only (no pixel decoding)."""
    from datasets import Image as ImageFeature
    from PIL import Image

    raw = hf.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
    sizes = []
    for r in rows:
        value = raw[int(r)]["image"]
        try:
            if value.get("bytes"):
                with Image.open(io.BytesIO(value["bytes"])) as im:
                    sizes.append(im.size)
            else:
                with Image.open(value["path"]) as im:
                    sizes.append(im.size)
        except Exception:  # noqa: BLE001 - counted as an unreadable image by the caller
            sizes.append((0, 0))
    return sizes


def _clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes to the image; returns (boxes, keep mask of non-degenerate boxes)."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4), np.zeros(0, dtype=bool)
    b = boxes.copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & np.isfinite(b).all(1)
    return b, keep


def build_localization_table(hf, rows: pd.DataFrame, targets: str = "boxes",
                             classes: Sequence[str] | None = None) -> LocalizationTable:
    """Instances of every annotated unique image among ``rows`` (columns row_idx, image_id, dataset, split,
    has_bbox, has_polygon). ``classes`` keeps only instances of these class names (others are counted)."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    annotated = rows[rows["has_bbox"] | rows["has_polygon"]] if targets == "boxes" else rows[rows["has_polygon"]]
    skipped: Counter = Counter()
    skipped["rows_without_annotations"] = int(len(rows) - len(annotated))
    first = annotated.drop_duplicates("image_key" if "image_key" in annotated else "image_id", keep="first")
    skipped["duplicate_image_rows"] = int(len(annotated) - len(first))
    if len(first) == 0:
        return LocalizationTable([], [], dict(skipped))
    row_ids = first["row_idx"].to_numpy(dtype=np.int64)
    cols = ["bbox", "polygon"]
    raw = hf.select_columns(cols).select(row_ids.tolist()).to_dict()
    sizes = _image_sizes(hf, row_ids)
    wanted = set(classes) if classes else None
    images: list[LocImage] = []
    for i, rec in enumerate(first.itertuples(index=False)):
        width, height = sizes[i]
        if width == 0:
            skipped["unreadable_images"] += 1
            continue
        polys = parse_polygons(raw["polygon"][i])
        if targets == "boxes" and raw["bbox"][i]:
            inst = [(c or DEFAULT_CLASS, b, None) for c, b in parse_bboxes(raw["bbox"][i])]
        else:
            inst = []
            for c, pts in polys:
                xy = np.asarray(pts, dtype=np.float64)
                inst.append((c or DEFAULT_CLASS, [xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()],
                             xy.reshape(-1).tolist()))
        if wanted is not None:
            skipped["instances_of_other_classes"] += sum(c not in wanted for c, _, _ in inst)
            inst = [t for t in inst if t[0] in wanted]
        boxes = np.asarray([b for _, b, _ in inst], dtype=np.float32).reshape(-1, 4)
        boxes, keep = _clip_boxes(boxes, width, height)
        skipped["degenerate_boxes"] += int((~keep).sum())
        inst = [t for t, k in zip(inst, keep, strict=True) if k]
        if not inst and wanted is not None:
            skipped["images_without_wanted_classes"] += 1
            continue
        images.append(LocImage(
            row=int(rec.row_idx), image_id=str(rec.image_id), dataset=str(rec.dataset), split=str(rec.split),
            width=int(width), height=int(height), classes=[c for c, _, _ in inst], boxes=boxes[keep],
            polygons=[p for _, _, p in inst] if targets == "masks" else None,
            label_name=str(getattr(rec, "label_name", "")),
        ))
    # the label space: ``classes`` in the given order (a trained head's), else every class present, sorted
    names = list(dict.fromkeys(classes)) if classes else sorted({c for im in images for c in im.classes})
    return LocalizationTable(images, names, {k: int(v) for k, v in skipped.items()})


def rasterize(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Instance masks [N, H, W] uint8 from flat pixel polygons, via pycocotools RLE."""
    from pycocotools import mask as mask_utils

    if not polygons:
        return np.zeros((0, height, width), dtype=np.uint8)
    out = np.empty((len(polygons), height, width), dtype=np.uint8)
    for i, poly in enumerate(polygons):
        rles = mask_utils.frPyObjects([list(map(float, poly))], height, width)
        out[i] = mask_utils.decode(mask_utils.merge(rles))
    return out


class LocalizationDataset(Dataset):
    """Decoded image (float [0, 1], C×H×W, original size) + torchvision detection target per unique image."""

    def __init__(self, hf_images, images: list[LocImage], class_names: list[str], masks: bool,
                 augment: bool = False, crop_size: int | None = None):
        self.hf_images, self.images, self.masks, self.augment = hf_images, images, masks, augment
        self.label = {c: i + 1 for i, c in enumerate(class_names)}
        from torchvision.transforms import v2

        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        ops = []
        if crop_size:  # large fields: train on random crops at full resolution (evaluation tiles, see the module)
            ops += [v2.RandomCrop(int(crop_size), pad_if_needed=True), v2.SanitizeBoundingBoxes(min_size=1)]
        if augment:  # microscopy has no canonical orientation: flips are label-preserving
            ops += [v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5)]
        self.flip = v2.Compose(ops) if ops else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        from torchvision import tv_tensors

        im = self.images[i]
        try:
            pil = self.hf_images[im.row]["image"].convert("RGB")
        except Exception as err:  # noqa: BLE001 - a bad image is a counted skip
            return {"index": i, "image": None, "target": None, "error": f"row {im.row}: {type(err).__name__}: {err}"}
        image = self.to_tensor(pil)
        h, w = image.shape[-2:]
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(im.boxes), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.tensor([self.label[c] for c in im.classes], dtype=torch.int64)}
        if self.masks:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(rasterize(im.polygons or [], h, w)))
        if self.flip is not None:
            image, target = self.flip(image, target)
        target = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        target["index"] = torch.tensor(i)
        return {"index": i, "image": image.as_subclass(torch.Tensor), "target": target, "error": None}


def collate_localization(batch: Sequence[dict]) -> dict:
    ok = [b for b in batch if b["image"] is not None]
    return {"images": [b["image"] for b in ok], "targets": [b["target"] for b in ok],
            "index": torch.tensor([b["index"] for b in ok], dtype=torch.long),
            "failed": torch.tensor([b["index"] for b in batch if b["image"] is None], dtype=torch.long),
            "errors": [b["error"] for b in batch if b["image"] is None]}


class LocalizationDataModule(SplitLoaders, L.LightningDataModule):
    """μ-Bench localization (boxes, instance masks) as unique images, with COCO export.

    Args:
        path, revision: any copy :func:`~microbench.data.loading.load_ubench` reads.
        targets: ``boxes`` (detection, from ``bbox``) or ``masks`` (instance segmentation, from ``polygon``).
        classes: keep only these ``className`` values, label ids 1..K in this order (e.g. ``[nucleus,
            H2B-mCherry]``); None keeps all, in sorted order.
        datasets / exclude_datasets: resolved dataset names to keep / drop.
        split: the split served by ``test_dataloader`` (``test`` by default; ``all`` for every annotated image).
        augment: random flips of training images (boxes and masks follow).
        train_crop_size: train on random crops of this many pixels (objects lost by the crop are dropped) instead
            of whole images; use with the head's ``tile_size`` for fields much larger than the tower's input.
    """

    @checked("data", MicroBenchDataError)
    def __init__(self, path: str = "sample", revision: str | None = HUB_REVISION, targets: Literal[TARGETS] = "boxes",
                 classes: Sequence[str] | str | None = None, datasets: Sequence[str] | str | None = None,
                 exclude_datasets: Sequence[str] | str | None = None, split: splits_mod.SplitName = "test",
                 split_seed: int = 0,
                 split_fractions: Sequence[float] = (0.7, 0.1, 0.2), batch_size: PositiveInt = 8,
                 num_workers: NonNegativeInt = 0,
                 pin_memory: bool = False, augment: bool = True, strict_filters: bool = True,
                 train_crop_size: int | None = None) -> None:
        super().__init__()
        self.path, self.revision, self.targets, self.split = path, revision, targets, split
        self.classes = as_list(classes)
        self.filters = {"dataset": as_list(datasets), "classes": self.classes}
        self.exclude_datasets = as_list(exclude_datasets) or []
        self.split_spec = splits_mod.SplitSpec(split_seed, *map(float, split_fractions))
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory = pin_memory
        self.augment, self.strict_filters, self.train_crop_size = augment, strict_filters, train_crop_size
        self.hf = None
        self.source: DataSource | None = None
        self.table: LocalizationTable | None = None

    @property
    def class_names(self) -> list[str]:
        self._require_setup()
        return self.table.class_names

    @property
    def num_classes(self) -> int:
        """Number of foreground classes (torchvision heads take this + 1 for the background)."""
        return len(self.class_names)

    def prepare_data(self) -> None:
        prepare_hub_copy(self)

    def setup(self, stage: str | None = None) -> None:
        if self.hf is not None:
            return
        hf, self.source, _, rows = load_split_rows(self.path, self.revision, self.split_spec)
        annotated = rows[rows["has_bbox"] | rows["has_polygon"]]
        if annotated.empty:
            raise MicroBenchDataError(f"{self.source.location} has no row with a bbox or polygon: localization needs "
                                      "the segmentation/detection sources (Burgess, Held, Wu, GlaS, OpenCell)")
        wanted = self.filters["dataset"]
        if wanted:
            unknown = sorted(set(wanted) - set(annotated["dataset"]))
            if unknown and self.strict_filters:
                raise MicroBenchDataError(f"datasets {unknown} have no annotated rows in {self.source.location}; "
                                          f"annotated datasets: {sorted(set(annotated['dataset']))}")
            rows = rows[rows["dataset"].isin(wanted)]
        if self.exclude_datasets:
            rows = rows[~rows["dataset"].isin(self.exclude_datasets)]
        self.table = build_localization_table(hf, rows, self.targets, self.classes)
        if self.classes:
            present = {c for im in self.table.images for c in im.classes}
            unknown = sorted(set(self.classes) - present)
            if unknown and self.strict_filters:
                raise MicroBenchDataError(f"classes {unknown} have no instances in the kept rows of "
                                          f"{self.source.location}; present: {sorted(present)}")
        if not self.table.images:
            raise MicroBenchDataError(f"no annotated image left in {self.source.location} after the filters "
                                      f"{self.filters} (targets={self.targets}); skipped: {self.table.skipped}")
        self.hf = hf.select_columns(["image"])
        counts = Counter(im.split for im in self.table.images)
        log.info("localization %s (%s): %d images, %d instances, %d classes %s; splits %s; skipped %s",
                 self.source.location, self.targets, len(self.table.images),
                 sum(im.n for im in self.table.images), len(self.table.class_names), self.table.class_names,
                 dict(counts), self.table.skipped)

    def _require_setup(self) -> None:
        if self.table is None:
            raise RuntimeError("call setup() before using the data module")

    def images(self, split: str | None = None) -> list[LocImage]:
        self._require_setup()
        split = split or self.split
        return [im for im in self.table.images if split == splits_mod.ALL or im.split == split]

    def dataset(self, split: str, augment: bool = False, crop_size: int | None = None) -> LocalizationDataset:
        return LocalizationDataset(self.hf, self.images(split), self.class_names, self.targets == "masks", augment,
                                   crop_size)

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split, augment=train and self.augment, crop_size=self.train_crop_size if train else None)
        if len(ds) == 0:
            raise MicroBenchDataError(f"the {split} split has no annotated image ({len(self.table.images)} in all); "
                                      "use more data or change split_fractions")
        sampler = ExactDistributedSampler(ds) if (not train and distributed.world_size() > 1) else None
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          collate_fn=collate_localization, drop_last=False)

    # --- COCO export ------------------------------------------------------------------------------------------
    def to_coco(self, split: str | None = None) -> dict:
        """Ground truth of one split in COCO format (image ids are the positions in :meth:`images`; boxes xywh;
        ``segmentation`` holds the polygon when targets are masks)."""
        return coco_ground_truth(self.images(split), self.class_names)


def coco_ground_truth(images: list[LocImage], class_names: list[str]) -> dict:
    """COCO ground-truth dict of ``images`` (image id = position, category id = label id 1..K)."""
    from pycocotools import mask as mask_utils

    label = {c: i + 1 for i, c in enumerate(class_names)}
    out_images, anns = [], []
    for img_id, im in enumerate(images):
        out_images.append({"id": img_id, "width": im.width, "height": im.height, "file_name": im.image_id,
                           "dataset": im.dataset, "row": im.row})
        for j, (c, b) in enumerate(zip(im.classes, im.boxes.tolist(), strict=True)):
            x1, y1, x2, y2 = b
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": label[c], "iscrowd": 0,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1))}
            if im.polygons is not None:
                ann["segmentation"] = [list(map(float, im.polygons[j]))]
                rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], im.height, im.width))
                ann["area"] = float(mask_utils.area(rle))
            anns.append(ann)
    return {"images": out_images, "annotations": anns,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(class_names)]}
