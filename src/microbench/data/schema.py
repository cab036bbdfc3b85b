"""The μ-Bench (Micro-Bench) perception schema, its vocabularies and helpers for every known trap.

Everything here mirrors the real Hugging Face release ``jnirschl/uBench`` (config ``default``, split ``test``,
17,315 rows, 22 columns). Facts and their sources: ``shared/reference/ubench-format.md``. Code elsewhere must
read columns through these helpers so that the traps (null ``dataset`` names, string vs int ``answer_idx``, null
question entries, duplicated image ids, two decodings of ``bbox``/``polygon``) are handled in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets

try:  # datasets >= 4 distinguishes List (list of dicts) from Sequence (dict of lists)
    from datasets import List as _List
except ImportError:  # pragma: no cover - datasets < 4
    _List = None

HUB_REPO_ID = "jnirschl/uBench"
#: main of the Hub repo since 2024-12-15 (README-only change on top of the 0.1.0 data of 2024-09-26).
HUB_REVISION = "3f2c5b590bc7a208d5b60f3527ce4c76a331aa2b"
HUB_SPLIT = "test"
HUB_NUM_ROWS = 17_315

NOTA = "none of the above"

#: The 22 Hub columns, in Hub order.
COLUMNS: tuple[str, ...] = (
    "image_id", "image", "label", "label_name", "dataset", "domain", "institution", "license",
    "microns_per_pixel", "modality", "ncbitaxon_id", "ncbitaxon_name", "pmid", "split", "stain", "subdomain",
    "submodality", "synthetic", "captions", "questions", "bbox", "polygon",
)

#: The six question types; every caption key is ``<type>_<variant>``.
QUESTION_TYPES: tuple[str, ...] = ("classification", "domain", "modality", "stain", "subdomain", "submodality")
#: The five "coarse-grained" types (everything but classification).
COARSE_TYPES: tuple[str, ...] = ("domain", "modality", "stain", "subdomain", "submodality")
FINE_TYPES: tuple[str, ...] = ("classification",)
CAPTION_VARIANTS: tuple[int, ...] = (0, 1)
CAPTION_KEYS: tuple[str, ...] = tuple(f"{t}_{v}" for t in QUESTION_TYPES for v in CAPTION_VARIANTS)

# ClassLabel names: indices 0-65 are verified verbatim from the Hub's dataset_info.json history; 66-103 could
# not be retrieved. Index 66 is inferred; the rest are explicit placeholders. Never hard-code an index >= 66:
# read names from the loaded dataset's own features (see `label_names`).
_VERIFIED_LABELS = ["lymphocyte", "neutrophil", "basophil", "monocyte", "eosinophil", "platelet", "erythroblast", "immature_granulocyte", "irregular_contours", "intermediate", "smooth_contours", "elongated_shape", "round_shape", "coarse_texture", "fine_texture", "very_weak", "moderate", "weak", "strong", "leishmania_haptomonad", "hela_metaphase", "tobacco_leaf_chloroplast", "cardiac_muscle", "zebrafish_retina", "metaphase", "g2", "anaphase", "g1", "s", "prophase", "telophase", "golgi_twin", "diffuse", "interphase", "partly_disassembled", "prometaphase", "late_anaphase", "early_anaphase", "apoptosis", "binucleate", "bipolar_spindle", "aster", "midbody", "low-grade-lsil", "negative-nilm", "high-grade-hsil", "carcinoma-scc", "alnus_normal", "corylus_avellana_normal", "corylus_avellana_abnormal", "non_pollen", "debris", "adipose", "stroma", "lympho", "tumor", "complex", "mucosa", "empty", "background", "smooth_muscle", "normal_mucosa", "cancer_stroma", "lymphocytes", "mucus", "chronic_heart_failure"]
# "immature granulocyte" has a space on the Hub; restore it after the whitespace split above.
_VERIFIED_LABELS[7] = "immature granulocyte"
assert len(_VERIFIED_LABELS) == 66
LABEL_NAMES: tuple[str, ...] = (
    *_VERIFIED_LABELS,
    "not_chronic_heart_failure",
    *(f"unverified_class_{i:03d}" for i in range(67, 104)),
)
assert len(LABEL_NAMES) == 104

#: Vocabularies known so far (partly verified; see ubench-format.md §5). Used for fixtures and distractors,
#: never to reject a value found in real data.
MODALITIES = ("light microscopy", "fluorescence microscopy", "electron microscopy")
DOMAINS = ("pathology", "biology", "cytology")
DOMAIN_DISTRACTORS = ("pathology", "radiology", "biology", "cytology", "dermatology")
SUBDOMAINS = (
    "hematopathology", "cardiovascular pathology", "gastrointestinal pathology", "neuropathology",
    "gynecologic cytology", "cell biology", "cell and molecular biology", "botany", "neurobiology",
    "parasitology", "developmental biology", "biophysics", "molecular pathology", "head and neck pathology",
)
SUBMODALITIES = (
    "brightfield microscopy", "darkfield microscopy", "epifluorescence microscopy", "confocal microscopy",
    "total internal reflection fluorescence microscopy", "serial blockface scanning electron microscopy",
    "cryo-electron tomography", "synthetic", "polarized light microscopy",
    "differential interference contrast microscopy",
)
STAINS = (
    "H&E", "IHC(HDab)", "Giemsa", "PAS", "Papanicolaou", "Ziehl-Neelsen", "Basic fuchsin", "Masson Trichrome",
    "Congo Red", "DAPI", "Hoechst", "GFP", "H2B-mCherry", "GalT–EGFP", "synthetic", "None", "uranyl acetate",
    "osmium tetroxide", "lead citrate",
)

# --- Official dataset lists (eVLLM `tasks_metadata`, `eval_posthoc*.py`) -------------------------------------
#: The 23 dataset keys of the official tables (held_et_al_2010_mt is listed officially but absent from the Hub).
OFFICIAL_DATASETS: frozenset[str] = frozenset({
    "acevedo_et_al_2020", "burgess_et_al_2024_contour", "burgess_et_al_2024_eccentricity",
    "burgess_et_al_2024_texture", "empiar_sbfsem", "colocalization_benchmark", "eulenberg_et_al_2017_brightfield",
    "eulenberg_et_al_2017_darkfield", "eulenberg_et_al_2017_epifluorescence", "held_et_al_2010_galt",
    "held_et_al_2010_h2b", "held_et_al_2010_mt", "hussain_et_al_2019", "icpr2020_pollen", "jung_et_al_2022",
    "kather_et_al_2016", "kather_et_al_2018", "kather_et_al_2018_val7k", "nirschl_et_al_2018",
    "nirschl_unpub_fluorescence", "tang_et_al_2019", "wong_et_al_2022", "wu_et_al_2023",
})
#: On the Hub but outside the official table set.
NON_OFFICIAL_DATASETS: frozenset[str] = frozenset({"opencell", "sirinukunwattana_et_al_2016"})
#: `_pathology` slice of eval_posthoc.py.
PATHOLOGY_DATASETS: frozenset[str] = frozenset({
    "hussain_et_al_2019", "acevedo_et_al_2020", "jung_et_al_2022", "kather_et_al_2016", "kather_et_al_2018",
    "kather_et_al_2018_val7k", "nirschl_et_al_2018",
})
#: `HandE` slice: the x-axis of the paper's model-merging figure.
HE_DATASETS: frozenset[str] = frozenset({
    "kather_et_al_2016", "kather_et_al_2018", "kather_et_al_2018_val7k", "nirschl_et_al_2018",
})
#: Dropped from the totals in the Oct-2024 rebuttal scripts.
EULENBERG_EXCLUDED: frozenset[str] = frozenset({
    "eulenberg_et_al_2017_darkfield", "eulenberg_et_al_2017_epifluorescence",
})

#: Held et al. 2010 rows carry a null `dataset`; their stain names them. Note the EN DASH in GalT–EGFP.
HELD_STAIN_TO_DATASET: Mapping[str, str] = {
    "H2B-mCherry": "held_et_al_2010_h2b",
    "GalT–EGFP": "held_et_al_2010_galt",
}
UNKNOWN_DATASET = "unknown"


def resolve_dataset_name(dataset: str | None, stain: str | None) -> str:
    """Return the dataset key of a row, naming Held et al. 2010 rows (null `dataset`) by their stain.

    A null name with an unrecognised stain resolves to ``"unknown"``; callers report it as a problem.
    The ASCII hyphen spelling ``GalT-EGFP`` is accepted too, because copies re-exported through tools that
    normalise dashes exist in the wild.
    """
    if isinstance(dataset, str) and dataset:
        return dataset
    if isinstance(stain, str):
        name = HELD_STAIN_TO_DATASET.get(stain) or HELD_STAIN_TO_DATASET.get(stain.replace("-", "–", 1))
        if name is None and stain.replace("–", "-") == "GalT-EGFP":
            name = "held_et_al_2010_galt"
        if name:
            return name
    return UNKNOWN_DATASET


def split_caption_key(key: str) -> tuple[str, int | None]:
    """``"modality_1"`` → ``("modality", 1)``; a key without a numeric suffix → ``(key, None)``."""
    head, sep, tail = key.rpartition("_")
    if sep and tail.isdigit():
        return head, int(tail)
    return key, None


def parse_answer_idx(value: Any) -> int | None:
    """Gold index from a caption (string on the Hub, e.g. ``"2"``) or question (int) entry; None if unusable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return None


def label_names(ds: datasets.Dataset) -> list[str] | None:
    """ClassLabel names of the loaded copy (the source of truth), or None if `label` is a plain int column."""
    feat = ds.features.get("label")
    return list(feat.names) if isinstance(feat, datasets.ClassLabel) else None


# --- Localization columns -------------------------------------------------------------------------------------

def _rows_of(value: Any) -> list[dict]:
    """Normalise a list-of-struct value to a list of dicts, whichever way `datasets` decoded it.

    ``List({...})`` decodes to a list of dicts, ``Sequence({...})`` to a dict of lists, raw Arrow to a list of
    dicts; null gives an empty list.
    """
    if value is None:
        return []
    if isinstance(value, Mapping):
        keys = list(value.keys())
        columns = [list(value[k]) if value[k] is not None else [] for k in keys]
        n = max((len(c) for c in columns), default=0)
        return [{k: (c[i] if i < len(c) else None) for k, c in zip(keys, columns, strict=True)} for i in range(n)]
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [dict(v) for v in value if v is not None]
    raise TypeError(f"expected a list of instances or a dict of lists, got {type(value).__name__}")


def bbox_to_xyxy(points: Any) -> list[float] | None:
    """A bbox ``points`` value — dict ``{x1,y1,x2,y2}`` or a 4-list — as ``[x1, y1, x2, y2]``; None if malformed."""
    if points is None:
        return None
    if isinstance(points, Mapping):
        try:
            return [float(points[k]) for k in ("x1", "y1", "x2", "y2")]
        except (KeyError, TypeError, ValueError):
            return None
    try:
        vals = [float(v) for v in points]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == 4 else None


def polygon_to_xy(points: Any) -> list[tuple[float, float]] | None:
    """A polygon ``points`` value (flat ``[x1, y1, x2, y2, ...]`` in pixels) as (x, y) pairs; None if malformed."""
    if points is None:
        return None
    try:
        flat = [float(v) for v in points]
    except (TypeError, ValueError):
        return None
    if len(flat) < 6 or len(flat) % 2:
        return None
    return list(zip(flat[0::2], flat[1::2], strict=True))


def parse_bboxes(value: Any) -> list[tuple[str | None, list[float]]]:
    """``bbox`` column value → ``[(className, [x1, y1, x2, y2]), ...]``; malformed items are dropped (count them
    with :func:`count_malformed_instances`)."""
    out = []
    for item in _rows_of(value):
        box = bbox_to_xyxy(item.get("points"))
        if box is not None:
            out.append((item.get("className"), box))
    return out


def parse_polygons(value: Any) -> list[tuple[str | None, list[tuple[float, float]]]]:
    """``polygon`` column value → ``[(className, [(x, y), ...]), ...]``; malformed items are dropped."""
    out = []
    for item in _rows_of(value):
        poly = polygon_to_xy(item.get("points"))
        if poly is not None:
            out.append((item.get("className"), poly))
    return out


def count_malformed_instances(value: Any, kind: str) -> int:
    """How many instances of a ``bbox`` (kind="bbox") or ``polygon`` value cannot be parsed."""
    parse = bbox_to_xyxy if kind == "bbox" else polygon_to_xy
    return sum(parse(item.get("points")) is None for item in _rows_of(value))


# --- Features ---------------------------------------------------------------------------------------------

def _list_of(feature: Any) -> Any:
    """A list feature that decodes to a Python list (``List`` on datasets>=4, a plain ``[...]`` otherwise)."""
    return _List(feature) if _List is not None else [feature]


def _entry_features(answer_idx_dtype: str, with_answer: bool) -> dict:
    fields: dict[str, Any] = {}
    if with_answer:
        fields["answer"] = datasets.Value("string")
    fields.update({
        "id": datasets.Value("string"),
        "name": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer_idx": datasets.Value(answer_idx_dtype),
        "options": _list_of(datasets.Value("string")),
        "tags": _list_of(datasets.Value("string")),
    })
    if with_answer:  # the questions entries are alphabetical in the only full sample seen
        order = ("answer", "answer_idx", "id", "name", "options", "question", "tags")
        fields = {k: fields[k] for k in order}
    return fields


def build_features(label_names_: Sequence[str] = LABEL_NAMES) -> datasets.Features:
    """The 22 Hub columns as :class:`datasets.Features`, in Hub order and dtypes.

    Nested layouts of ``bbox``/``polygon`` were never seen verbatim on the Hub (ubench-format.md §2.3, [I]); the
    declared form here is a list of ``{className, points}`` structs. Readers accept every decoding.
    """
    caption = _entry_features("string", with_answer=False)
    question = _entry_features("int64", with_answer=True)
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(label_names_)),
        "label_name": datasets.Value("string"),
        "dataset": datasets.Value("string"),
        "domain": datasets.Value("string"),
        "institution": datasets.Value("string"),
        "license": datasets.Value("string"),
        "microns_per_pixel": datasets.Value("float32"),
        "modality": datasets.Value("string"),
        "ncbitaxon_id": datasets.Value("string"),
        "ncbitaxon_name": datasets.Value("string"),
        "pmid": datasets.Value("string"),
        "split": datasets.Value("string"),
        "stain": datasets.Value("string"),
        "subdomain": datasets.Value("string"),
        "submodality": datasets.Value("string"),
        "synthetic": datasets.Value("bool"),
        "captions": {k: dict(caption) for k in CAPTION_KEYS},
        "questions": {k: dict(question) for k in QUESTION_TYPES},
        "bbox": _list_of({
            "className": datasets.Value("string"),
            "points": {k: datasets.Value("float32") for k in ("x1", "y1", "x2", "y2")},
        }),
        "polygon": _list_of({
            "className": datasets.Value("string"),
            "points": _list_of(datasets.Value("float32")),
        }),
    })


FEATURES: datasets.Features = build_features()

#: Arrow type families that each flat column must have; a wrong one is refused with a one-line error.
FLAT_COLUMN_KINDS: Mapping[str, str] = {
    "image_id": "string", "label": "integer", "label_name": "string", "dataset": "string", "domain": "string",
    "institution": "string", "license": "string", "microns_per_pixel": "floating", "modality": "string",
    "ncbitaxon_id": "string", "ncbitaxon_name": "string", "pmid": "string", "split": "string", "stain": "string",
    "subdomain": "string", "submodality": "string", "synthetic": "boolean",
}
#: Columns without which nothing can be scored.
REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "image", "dataset", "stain", "captions", "questions")
