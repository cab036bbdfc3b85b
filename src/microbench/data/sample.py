"""Build the embedded μ-Bench sample: Hub schema, Hub layout, learnable images, every trap of the real release.

``python scripts/make_sample.py`` regenerates ``data/sample`` deterministically. The sample keeps the real release's
quirks on purpose: Held et al. 2010 rows with a null ``dataset`` (stains ``H2B-mCherry`` and ``GalT–EGFP`` with an
en dash), null stain questions and captions (``nirschl_unpub_fluorescence``), a null ``pmid``, string caption
``answer_idx`` next to int question ``answer_idx``, Burgess images reused across three tasks under one
``image_id``, ``bbox``/``polygon`` only on localization rows, and datasets outside the official table set.
Class semantics of the two real scikit-image micrographs are assigned by a measurable property (see
``data/sample/README.md``); everything else is procedural with visible classes.
"""

from __future__ import annotations

import json
import random
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from microbench.data import sample_images as gen
from microbench.data import schema

#: Sample-only class names put into the unverified ClassLabel slots 67+ (the real names there are unknown).
SAMPLE_EXTRA_LABELS = ("benign", "malignant", "filamentous", "punctate", "nuclear", "cytoplasmic")
SAMPLE_LABEL_NAMES: tuple[str, ...] = (
    *schema.LABEL_NAMES[:67], *SAMPLE_EXTRA_LABELS, *schema.LABEL_NAMES[67 + len(SAMPLE_EXTRA_LABELS):]
)

CAPTION_TEMPLATES = {
    "domain": ("A micrograph used in the field of {class}.", "A microscopy image from the field of {class}."),
    "modality": ("A micrograph acquired through {class}.", "A microscopy image obtained through {class}."),
    "stain": ("A micrograph stained with {class}.", "A microscopy image prepared with the {class} stain."),
    "subdomain": ("A micrograph used in {class}.", "A microscopy image from the subfield of {class}."),
    "submodality": ("A micrograph acquired with {class}.", "A microscopy image obtained by {class}."),
}
QUESTION_TEXTS = {
    "domain": "What is the most likely field of study this micrograph would be used for?",
    "subdomain": "What is the most likely subfield of study this micrograph would be used for?",
    "modality": "What is the most likely microscopy modality used to acquire this image?",
    "submodality": "What is the most likely microscopy submodality used to acquire this image?",
    "stain": "What is the most likely technique used to stain this micrograph?",
}
DISTRACTORS = {
    "domain": schema.DOMAIN_DISTRACTORS,
    "modality": schema.MODALITIES,
    "stain": schema.STAINS,
    "subdomain": schema.SUBDOMAINS,
    "submodality": schema.SUBMODALITIES,
}


@dataclass
class SampleDataset:
    """One source dataset of the sample and the generator of its images."""

    key: str
    dataset: str | None  # the value of the `dataset` column (None for Held et al. 2010, as on the Hub)
    classes: tuple[str, ...]
    make: Callable  # (class, rng) -> (rgb, instances)
    per_class: int
    domain: str
    subdomain: str
    modality: str
    submodality: str
    stain: str
    institution: str
    license: str
    microns_per_pixel: float
    taxon: tuple[str, str]
    pmid: str | None
    question: str
    template: tuple[str, str]
    synthetic: bool = False
    boxes: bool = False  # write bbox for instances
    polygons: bool = False  # write polygon for instances
    null_stain: bool = False  # the stain question/captions are null, as for nirschl_unpub_fluorescence
    tiles: Callable | None = None  # real-image tiles: rng -> [(rgb, class)]
    extra: dict = field(default_factory=dict)


HUMAN = ("NCBITaxon_9606", "Homo sapiens")
SYNTH = ("NCBITaxon_synthetic", "synthetic")


def _specs() -> list[SampleDataset]:
    h2b = lambda c, r: gen.fluorescent_nuclei(c, r, colour=(1.0, 0.25, 0.3), n_cells=(2, 4), class_name="H2B-mCherry")  # noqa: E731
    hoechst = lambda c, r: gen.fluorescent_nuclei(c, r, colour=(0.3, 0.55, 1.0))  # noqa: E731
    return [
        SampleDataset(
            "acevedo_et_al_2020", "acevedo_et_al_2020", ("lymphocyte", "neutrophil", "eosinophil", "basophil"),
            gen.blood_cell, 8, "pathology", "hematopathology", "light microscopy", "brightfield microscopy", "Giemsa",
            "hosp_barcelona", "CC-BY-4.0", 0.1, HUMAN, "32346559",
            "A Giemsa-stained light micrograph displaying human peripheral blood cells. As a blood cell recognition "
            "system, identify the correct cell type:",
            ("A Giemsa-stained micrograph of a {class}.", "A light micrograph of a peripheral blood {class}.")),
        SampleDataset(
            "kather_et_al_2016", "kather_et_al_2016", ("tumor", "stroma", "adipose", "lympho"), gen.he_tissue, 8,
            "pathology", "gastrointestinal pathology", "light microscopy", "brightfield microscopy", "H&E",
            "univ_heidelberg", "CC-BY-4.0", 0.495, HUMAN, None,
            "An H&E stained light micrograph of human colorectal tissue. What is the most likely tissue type?",
            ("An H&E micrograph of colorectal {class}.", "A light micrograph of colorectal tissue showing {class}.")),
        SampleDataset(
            "nirschl_et_al_2018", "nirschl_et_al_2018", ("chronic_heart_failure", "not_chronic_heart_failure"),
            gen.he_tissue, 8, "pathology", "cardiovascular pathology", "light microscopy", "brightfield microscopy",
            "H&E", "upenn", "CC-BY-4.0", 2.0, HUMAN, None,
            "H&E stained light micrograph of human cardiac tissue. Based on the image, what is the most likely "
            "clinical chronic heart diagnosis?",
            ("An H&E micrograph of {class}.", "A light micrograph of cardiac tissue with {class}.")),
        SampleDataset(
            "tang_et_al_2019", "tang_et_al_2019", ("strong", "weak"), None, 0, "pathology", "neuropathology",
            "light microscopy", "brightfield microscopy", "IHC(HDab)", "ucdavis", "CC-BY-4.0", 0.5, HUMAN, None,
            "An immunohistochemistry light micrograph of human brain tissue. How strong is the DAB staining?",
            ("An IHC micrograph with {class} DAB staining.", "A light micrograph of brain tissue with {class} staining."),
            tiles=gen.ihc_tiles),
        SampleDataset(
            "eulenberg_et_al_2017_brightfield", "eulenberg_et_al_2017_brightfield", ("interphase", "background"),
            None, 0, "biology", "cell biology", "light microscopy", "brightfield microscopy", "None", "helmholtz_munich",
            "CC-BY-4.0", 0.33, HUMAN, None,
            "A quantitative phase light micrograph. Does the field show a cell in interphase or only background?",
            ("A phase micrograph of {class}.", "A light micrograph showing {class}."), tiles=gen.phase_cell_tiles),
        SampleDataset(
            "eulenberg_et_al_2017_epifluorescence", "eulenberg_et_al_2017_epifluorescence",
            ("interphase", "prophase", "metaphase", "anaphase", "telophase"), hoechst, 6, "biology", "cell biology",
            "fluorescence microscopy", "epifluorescence microscopy", "Hoechst", "helmholtz_munich", "CC-BY-4.0", 0.33,
            HUMAN, None,
            "An epifluorescence micrograph of a DNA-stained human cell. What is the most likely cell cycle phase?",
            ("A fluorescence micrograph of a cell in {class}.", "An epifluorescence image of chromatin in {class}.")),
        SampleDataset(
            "eulenberg_et_al_2017_darkfield", "eulenberg_et_al_2017_darkfield", ("interphase", "metaphase", "anaphase"),
            gen.darkfield_cell, 6, "biology", "cell biology", "light microscopy", "darkfield microscopy", "None",
            "helmholtz_munich", "CC-BY-4.0", 0.33, HUMAN, None,
            "A darkfield light micrograph of a human cell. What is the most likely cell cycle phase?",
            ("A darkfield micrograph of a cell in {class}.", "A darkfield light image of a cell in {class}.")),
        SampleDataset(
            "held_et_al_2010_h2b", None, ("interphase", "prometaphase", "metaphase", "anaphase"), h2b, 6, "biology",
            "cell biology", "fluorescence microscopy", "epifluorescence microscopy", "H2B-mCherry", "eth_zurich",
            "CC-BY-4.0", 0.8, HUMAN, None,
            "An epifluorescence micrograph of HeLa cells expressing H2B-mCherry. What is the most likely cell cycle "
            "stage?",
            ("A fluorescence micrograph of chromatin in {class}.", "An H2B-mCherry image of cells in {class}."),
            boxes=True, polygons=True),
        SampleDataset(
            "held_et_al_2010_galt", None, ("interphase", "golgi_twin", "diffuse"), gen.golgi, 6, "biology",
            "cell biology", "fluorescence microscopy", "epifluorescence microscopy", "GalT–EGFP", "eth_zurich",
            "CC-BY-4.0", 0.8, HUMAN, None,
            "An epifluorescence micrograph of HeLa cells expressing GalT-EGFP. What is the most likely Golgi "
            "morphology?",
            ("A fluorescence micrograph of a {class} Golgi.", "A GalT-EGFP image of Golgi with {class} morphology."),
            boxes=True),
        SampleDataset(
            "empiar_sbfsem", "empiar_sbfsem",
            ("cardiac_muscle", "tobacco_leaf_chloroplast", "zebrafish_retina", "hela_metaphase"), gen.em_texture, 6,
            "biology", "cell and molecular biology", "electron microscopy",
            "serial blockface scanning electron microscopy", "osmium tetroxide", "embl_ebi", "CC0-1.0", 0.01,
            ("NCBITaxon_2759", "Eukaryota"), None,
            "A serial block-face scanning electron micrograph. What is the most likely organism or structure?",
            ("An electron micrograph of {class}.", "A serial blockface electron microscopy image of {class}.")),
        SampleDataset(
            "nirschl_unpub_fluorescence", "nirschl_unpub_fluorescence", ("filamentous", "punctate"),
            gen.filaments_or_puncta, 8, "biology", "cell biology", "fluorescence microscopy",
            "total internal reflection fluorescence microscopy", "GFP", "stanford", "CC-BY-4.0", 0.1, HUMAN, None,
            "A TIRF micrograph of a fluorescently tagged structure. What is the most likely structure pattern?",
            ("A TIRF micrograph of a {class} structure.", "A fluorescence image of {class} labelling."),
            null_stain=True),
        SampleDataset(
            "opencell", "opencell", ("nuclear", "cytoplasmic"), gen.opencell_field, 6, "biology", "cell biology",
            "fluorescence microscopy", "confocal microscopy", "GFP", "czbiohub", "CC-BY-4.0", 0.2, HUMAN, None,
            "A confocal fluorescence micrograph of a tagged human protein. Where does the protein localize?",
            ("A fluorescence micrograph of a {class} protein.", "A confocal image of {class} localization."),
            boxes=True, polygons=True),
        SampleDataset(
            "sirinukunwattana_et_al_2016", "sirinukunwattana_et_al_2016", ("benign", "malignant"), gen.glands, 6,
            "pathology", "gastrointestinal pathology", "light microscopy", "brightfield microscopy", "H&E",
            "univ_warwick", "CC-BY-NC-4.0", 0.62, HUMAN, None,
            "An H&E stained light micrograph of colorectal glands. What is the most likely grade?",
            ("An H&E micrograph of {class} colorectal glands.", "A light micrograph of {class} glandular tissue."),
            boxes=True, polygons=True),
    ]


BURGESS_TASKS = {
    "burgess_et_al_2024_contour": ("irregular_contours", "intermediate", "smooth_contours"),
    "burgess_et_al_2024_eccentricity": ("elongated_shape", "intermediate", "round_shape"),
    "burgess_et_al_2024_texture": ("coarse_texture", "intermediate", "fine_texture"),
}


# --- row assembly -------------------------------------------------------------------------------------------

def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _text(label: str) -> str:
    return label.replace("_", " ")


def _entries(rng: random.Random, qtype: str, gold: str, pool: list[str], question: str,
             templates: tuple[str, str], n_candidates: int) -> tuple[dict, dict, dict]:
    """(question entry, caption _0, caption _1) for one type; caption _0 shares the question's option order."""
    others = [p for p in dict.fromkeys(pool) if p != gold]
    rng.shuffle(others)
    cands = [gold, *others[: n_candidates - 1]]
    rng.shuffle(cands)
    qid = _uuid(rng)
    q = {"answer": gold, "answer_idx": cands.index(gold), "id": qid, "name": qtype,
         "options": [*cands, schema.NOTA], "question": question, "tags": None}
    caps = []
    for v, tmpl in enumerate(templates):
        order = list(cands) if v == 0 else rng.sample(cands, len(cands))
        caps.append({"id": qid, "name": qtype, "question": tmpl,
                     "answer_idx": str(order.index(gold)),  # a string, as on the Hub
                     "options": [tmpl.replace("{class}", c) for c in order] + [schema.NOTA], "tags": None})
    return q, caps[0], caps[1]


def _png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG, compressed by CPython's ``zlib`` (classic zlib: the same bytes on every CPU).

    Pillow's PNG writer uses its bundled zlib-ng, whose compressor is chosen by CPU features at run time, so its bytes
    are not guaranteed to match between machines. Each scanline uses the ``Sub`` filter (exact uint8 arithmetic).
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    sub = rgb.astype(np.int16)
    sub[:, 1:] -= rgb[:, :-1]
    rows = np.concatenate([np.ones((h, 1), np.uint8), (sub % 256).astype(np.uint8).reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def _instances(instances, boxes: bool, polygons: bool) -> tuple[list | None, list | None]:
    if not instances:
        return None, None
    bbox = [{"className": n, "points": {"x1": min(x for x, _ in p), "y1": min(y for _, y in p),
                                        "x2": max(x for x, _ in p), "y2": max(y for _, y in p)}}
            for n, p in instances] if boxes else None
    poly = [{"className": n, "points": [v for xy in p for v in xy]} for n, p in instances] if polygons else None
    return bbox, poly


def _row(spec: SampleDataset, label: str, image_id: str, png: bytes, instances, rng: random.Random) -> dict:
    meta = {"domain": spec.domain, "modality": spec.modality, "stain": spec.stain, "subdomain": spec.subdomain,
            "submodality": spec.submodality}
    captions: dict[str, dict | None] = {}
    questions: dict[str, dict | None] = {}
    class_texts = [_text(c) for c in spec.classes]
    q, c0, c1 = _entries(rng, "classification", _text(label), class_texts, spec.question, spec.template,
                         min(len(class_texts), 5))
    questions["classification"], captions["classification_0"], captions["classification_1"] = q, c0, c1
    for t in schema.COARSE_TYPES:
        if t == "stain" and spec.null_stain:
            questions[t] = captions[f"{t}_0"] = captions[f"{t}_1"] = None
            continue
        n_cand = 3 if t == "modality" else 5
        q, c0, c1 = _entries(rng, t, meta[t], list(DISTRACTORS[t]), QUESTION_TEXTS[t], CAPTION_TEMPLATES[t], n_cand)
        questions[t], captions[f"{t}_0"], captions[f"{t}_1"] = q, c0, c1
    bbox, polygon = _instances(instances, spec.boxes, spec.polygons)
    return {
        "image_id": image_id,
        "image": {"bytes": png, "path": f"{image_id}.png"},
        "label": SAMPLE_LABEL_NAMES.index(label),
        "label_name": label,
        "dataset": spec.dataset,
        "domain": spec.domain,
        "institution": spec.institution,
        "license": spec.license,
        "microns_per_pixel": spec.microns_per_pixel,
        "modality": spec.modality,
        "ncbitaxon_id": spec.taxon[0],
        "ncbitaxon_name": spec.taxon[1],
        "pmid": spec.pmid,
        "split": "test",
        "stain": spec.stain,
        "subdomain": spec.subdomain,
        "submodality": spec.submodality,
        "synthetic": spec.synthetic,
        "captions": {k: captions.get(k) for k in schema.CAPTION_KEYS},
        "questions": {k: questions.get(k) for k in schema.QUESTION_TYPES},
        "bbox": bbox,
        "polygon": polygon,
    }


def build_sample_rows(seed: int = 0) -> list[dict]:
    """All rows of the sample, sorted by dataset name like the Hub (Held rows, with null names, last)."""
    rows: list[dict] = []
    for spec in _specs():
        rng = random.Random(f"{seed}:{spec.key}")
        nrng = np.random.default_rng(rng.getrandbits(64))
        items = spec.tiles(nrng) if spec.tiles else [
            spec.make(c, nrng) + (c,) for c in spec.classes for _ in range(spec.per_class)]
        for item in items:
            rgb, label, instances = (item[0], item[1], []) if spec.tiles else (item[0], item[2], item[1])
            rows.append(_row(spec, label, _uuid(rng), _png(rgb), instances, rng))
    # Burgess: one synthetic image serves three tasks under one image_id, as on the Hub
    rng = random.Random(f"{seed}:burgess")
    nrng = np.random.default_rng(rng.getrandbits(64))
    levels = [BURGESS_TASKS[k] for k in BURGESS_TASKS]
    for i in range(18):
        combo = (levels[0][i % 3], levels[1][(i // 3) % 3], levels[2][(i + i // 3) % 3])
        rgb, instances = gen.synthetic_cell(*combo, nrng)
        image_id, png = _uuid(rng), _png(rgb)
        for (task, _), label in zip(BURGESS_TASKS.items(), combo, strict=True):
            spec = SampleDataset(
                task, task, BURGESS_TASKS[task], gen.synthetic_cell, 0, "biology", "cell biology",
                "fluorescence microscopy", "synthetic", "synthetic", "stanford", "CC-BY-4.0", 1.0, SYNTH, None,
                f"A synthetic fluorescence image of a cell. What best describes its {task.rsplit('_', 1)[1]}?",
                ("A synthetic micrograph of a cell with {class}.", "A synthetic image of a cell showing {class}."),
                synthetic=True, boxes=True, polygons=True)
            rows.append(_row(spec, label, image_id, png, instances, rng))
    rows.sort(key=lambda r: (r["dataset"] is None, r["dataset"] or "", r["stain"]))
    return rows


def sample_features() -> datasets.Features:
    return schema.build_features(SAMPLE_LABEL_NAMES)


def write_hub_layout(rows: list[dict], out_dir: Path, features: datasets.Features, n_shards: int = 2,
                     builder_name: str = "ubench", version: str = "0.1.0") -> list[Path]:
    """Write rows as ``<out>/perception/<version>/ubench-test-0000k-of-0000N.arrow`` (Arrow IPC *stream* format,
    like an HF builder cache) plus ``dataset_info.json``; the schema metadata carries the HF features."""
    folder = Path(out_dir) / "perception" / version
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.arrow"):
        old.unlink()
    table = datasets.Dataset.from_list(rows, features=features).data.table
    bounds = np.linspace(0, len(rows), n_shards + 1).round().astype(int)
    paths = [write_shard(folder, k, n_shards, table.slice(bounds[k], bounds[k + 1] - bounds[k]), builder_name)
             for k in range(n_shards)]
    write_dataset_info(folder, features, len(rows), "Embedded microbench sample in the uBench 0.1.0 schema (see "
                       "data/sample/README.md).", builder_name, version)
    return paths


def write_shard(folder: Path, k: int, n_shards: int, table: pa.Table, builder_name: str = "ubench") -> Path:
    """Shard ``k`` of ``n_shards`` of a Hub-layout copy (Arrow IPC stream, as an HF builder cache writes it)."""
    path = Path(folder) / f"{builder_name}-test-{k:05d}-of-{n_shards:05d}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    return path


def write_dataset_info(folder: Path, features: datasets.Features, n_rows: int, description: str,
                       builder_name: str = "ubench", version: str = "0.1.0") -> None:
    info = {
        "description": description + "\n",
        "citation": "", "homepage": "", "license": "CC-BY-SA-4.0",
        "features": features.to_dict(),
        "builder_name": builder_name, "config_name": "default", "version": {"version_str": version},
        "splits": {"test": {"name": "test", "num_examples": n_rows, "dataset_name": builder_name}},
    }
    (Path(folder) / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")


def make_sample(out_dir: Path, seed: int = 0, n_shards: int = 2) -> list[Path]:
    """Regenerate the embedded sample deterministically."""
    return write_hub_layout(build_sample_rows(seed), out_dir, sample_features(), n_shards=n_shards)
