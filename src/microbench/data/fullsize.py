"""A synthetic copy shaped like the whole μ-Bench release, for benchmarks: 17,315 rows with the release's per-dataset
row counts and image-size mix, generated (never downloaded).

Each row is a row of the committed sample (same dataset, or a dataset of the same kind where the sample has none)
with a fresh ``image_id``, its ``dataset`` renamed, and a procedural PNG at the dataset's image size (smooth
structure plus sensor-like noise; :data:`PNGS_PER_DATASET` distinct ones per dataset, each decoded as any other). Burgess rows
share image ids as the release does (3,650 rows, 3,446 ids in shard 0, all of it Burgess reuse).

:data:`DATASETS` gives, per dataset, its rows and its image size, each with where the figure comes from:
``release`` (ubench-format.md §5: counted on the Hub or stated by OLMO), ``source`` (the source dataset's published
image size) or ``estimate`` (not published: the remainder of the 17,315 rows split by us). The counts add to the
release's 17,315 rows and its totals (16,130 images of the 23 official datasets, 1,486 Eulenberg DF+EF).

``python scripts/make_fullsize_copy.py <folder> [--scale 0.1]`` writes one.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from microbench.data.sample import sample_features, write_dataset_info, write_shard

RELEASE_ROWS = 17_315


@dataclass(frozen=True)
class FullSizeDataset:
    name: str | None  # None: the Held et al. 2010 rows, told apart by their stain
    rows: int
    size: tuple[int, int]  # (width, height) of its images
    template: str | None  # the sample dataset whose rows it copies
    rows_from: str  # release | estimate
    size_from: str  # source | estimate
    stain: str | None = None


DATASETS: tuple[FullSizeDataset, ...] = (
    FullSizeDataset("acevedo_et_al_2020", 1600, (360, 363), "acevedo_et_al_2020", "release", "source"),
    FullSizeDataset("burgess_et_al_2024_contour", 600, (256, 256), "burgess_et_al_2024_contour", "release",
                    "estimate"),
    FullSizeDataset("burgess_et_al_2024_eccentricity", 600, (256, 256), "burgess_et_al_2024_eccentricity",
                    "release", "estimate"),
    FullSizeDataset("burgess_et_al_2024_texture", 600, (256, 256), "burgess_et_al_2024_texture", "release",
                    "estimate"),
    FullSizeDataset("colocalization_benchmark", 96, (512, 512), "nirschl_unpub_fluorescence", "release", "estimate"),
    FullSizeDataset("empiar_sbfsem", 154, (1024, 1024), "empiar_sbfsem", "release", "estimate"),
    FullSizeDataset("eulenberg_et_al_2017_brightfield", 743, (66, 66), "eulenberg_et_al_2017_brightfield",
                    "estimate", "source"),
    FullSizeDataset("eulenberg_et_al_2017_darkfield", 743, (66, 66), "eulenberg_et_al_2017_darkfield", "release",
                    "source"),
    FullSizeDataset("eulenberg_et_al_2017_epifluorescence", 743, (66, 66), "eulenberg_et_al_2017_epifluorescence",
                    "release", "source"),
    FullSizeDataset(None, 800, (1024, 768), None, "estimate", "estimate", stain="GalT–EGFP"),
    FullSizeDataset(None, 900, (1024, 768), None, "estimate", "estimate", stain="H2B-mCherry"),
    FullSizeDataset("hussain_et_al_2019", 400, (2048, 1536), "acevedo_et_al_2020", "estimate", "source"),
    FullSizeDataset("icpr2020_pollen", 800, (84, 84), "eulenberg_et_al_2017_brightfield", "estimate", "source"),
    FullSizeDataset("jung_et_al_2022", 800, (128, 128), "acevedo_et_al_2020", "estimate", "estimate"),
    FullSizeDataset("kather_et_al_2016", 1000, (150, 150), "kather_et_al_2016", "estimate", "source"),
    FullSizeDataset("kather_et_al_2018", 1000, (224, 224), "kather_et_al_2016", "estimate", "source"),
    FullSizeDataset("kather_et_al_2018_val7k", 1000, (224, 224), "kather_et_al_2016", "estimate", "source"),
    FullSizeDataset("nirschl_et_al_2018", 600, (250, 250), "nirschl_et_al_2018", "estimate", "source"),
    FullSizeDataset("nirschl_unpub_fluorescence", 934, (512, 512), "nirschl_unpub_fluorescence", "release",
                    "estimate"),
    FullSizeDataset("opencell", 1105, (600, 600), "opencell", "release", "estimate"),
    FullSizeDataset("sirinukunwattana_et_al_2016", 80, (775, 522), "sirinukunwattana_et_al_2016", "release",
                    "source"),
    FullSizeDataset("tang_et_al_2019", 600, (256, 256), "tang_et_al_2019", "estimate", "source"),
    FullSizeDataset("wong_et_al_2022", 600, (256, 256), "tang_et_al_2019", "estimate", "estimate"),
    FullSizeDataset("wu_et_al_2023", 817, (512, 512), "empiar_sbfsem", "estimate", "estimate"),
)
#: Burgess rows whose image is another Burgess task's (shard 0 of the release: 3,650 rows, 3,446 image ids)
BURGESS_SHARED_ROWS = 204
#: distinct PNGs generated per dataset (each row still has its own image id): PNG encoding, not decoding, is what a
#: generator of 17,315 images would spend its time on
PNGS_PER_DATASET = 24


def _texture(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth structure (a coarse random field, bilinearly upsampled) plus noise: uint8 RGB of ``size``."""
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-3, 4, (h, w, 1), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _templates(sample) -> dict:
    """Sample rows by dataset name, Held rows by stain (images dropped: each row gets its own)."""
    rows = sample.remove_columns(["image"]).to_list()
    out: dict = {}
    for r in rows:
        out.setdefault(r["dataset"] if r["dataset"] is not None else ("held", r["stain"]), []).append(r)
    return out


def planned_rows(scale: float = 1.0) -> dict[str, int]:
    """Rows per dataset at ``scale`` (at least one each); the keys are names, Held rows as ``held/<stain>``."""
    return {d.name or f"held/{d.stain}": max(1, round(d.rows * scale)) for d in DATASETS}


def image_size(d: FullSizeDataset, image_scale: float = 1.0) -> tuple[int, int]:
    return max(8, round(d.size[0] * image_scale)), max(8, round(d.size[1] * image_scale))


def build_rows(scale: float = 1.0, seed: int = 0, image_scale: float = 1.0):
    """Yield the rows of the copy, sorted by dataset like the release (Held rows last); ``image_scale`` shrinks
    every image (tests)."""
    from microbench.data.loading import load_ubench

    sample, _ = load_ubench("sample")
    templates = _templates(sample)
    rng = np.random.default_rng(seed)
    burgess_images: list[tuple[str, bytes]] = []
    counts = planned_rows(scale)
    shared = round(BURGESS_SHARED_ROWS * scale)
    for d in sorted(DATASETS, key=lambda d: (d.name is None, d.name or "", d.stain or "")):
        pool = templates[d.template if d.name is not None else ("held", d.stain)]
        n = counts[d.name or f"held/{d.stain}"]
        reuse = d.name is not None and d.name.startswith("burgess") and d.name != "burgess_et_al_2024_contour"
        pngs = [_png(_texture(image_size(d, image_scale), rng)) for _ in range(min(n, PNGS_PER_DATASET))]
        for i in range(n):
            row = dict(pool[i % len(pool)])
            if reuse and i < shared // 2 and burgess_images:
                image_id, png = burgess_images[(i * 7) % len(burgess_images)]
            else:
                image_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
                png = pngs[i % len(pngs)]
                if d.name == "burgess_et_al_2024_contour":
                    burgess_images.append((image_id, png))
            row.update(image_id=image_id, image={"bytes": png, "path": f"{image_id}.png"})
            if d.name is not None:
                row["dataset"] = d.name
            yield row


SYNTHETIC_DESCRIPTION = "Synthetic full-size μ-Bench copy"


def _check_replaceable(folder: Path) -> None:
    """A folder holding shards is replaced only when this generator wrote it: never a real copy's shards."""
    from microbench.data.loading import MicroBenchDataError

    if not any(folder.glob("*.arrow")):
        return
    info = folder / "dataset_info.json"
    try:
        ours = json.loads(info.read_text()).get("description", "").startswith(SYNTHETIC_DESCRIPTION)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise MicroBenchDataError(f"{folder} already holds shards that this generator did not write (a real copy?): "
                                  "pass an empty or new folder")


def make_fullsize_copy(out_dir: str | Path, scale: float = 1.0, seed: int = 0, rows_per_shard: int = 1000,
                       version: str = "0.1.0", image_scale: float = 1.0) -> dict:
    """Write the copy in the Hub layout (Arrow stream shards + ``dataset_info.json``), one shard in memory at a
    time; returns ``{"rows", "images", "png_bytes", "pixels", "shards", "folder"}``."""
    features = sample_features()
    folder = Path(out_dir) / "perception" / version
    _check_replaceable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.arrow"):  # an earlier synthetic copy (checked above), replaced
        old.unlink()
    total = sum(planned_rows(scale).values())
    n_shards = -(-total // rows_per_shard)
    stats = {"rows": 0, "images": 0, "png_bytes": 0, "pixels": 0}
    seen: set[str] = set()
    chunk: list[dict] = []
    shard = 0

    def flush() -> None:
        nonlocal shard, chunk
        write_shard(folder, shard, n_shards, datasets.Dataset.from_list(chunk, features=features).data.table)
        shard, chunk = shard + 1, []

    for row in build_rows(scale, seed, image_scale):
        stats["rows"] += 1
        if row["image_id"] not in seen:
            seen.add(row["image_id"])
            stats["images"] += 1
            stats["png_bytes"] += len(row["image"]["bytes"])
            w, h = Image.open(io.BytesIO(row["image"]["bytes"])).size
            stats["pixels"] += w * h
        chunk.append(row)
        if len(chunk) == rows_per_shard:
            flush()
    if chunk:
        flush()
    write_dataset_info(folder, features, stats["rows"],
                       f"{SYNTHETIC_DESCRIPTION} (microbench.data.fullsize, scale {scale}).", version=version)
    return {**stats, "shards": shard, "folder": str(Path(out_dir))}
