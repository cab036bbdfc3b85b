"""Expert multiple-choice questions (μ-Bench cognition, MicroVQA, or your own) as one item table.

Three sources, one table (one row per question):

- ``official``: a local copy in the official layout, ``<root>/cognition/<split>/*.json``, each a SuperAnnotate-style
  record with ``metadata.name``, the image file, read where the official ``JsonDataset`` opens it,
  ``<root>/cognition/<split>/<name>`` beside the JSON files (``<root>/cognition/<name>`` is accepted as a fallback), and
  ``custom_metadata.questions = {"cognition_<i>": {"question", "options", "answer"}}`` plus ``custom_metadata``
  modality / submodality / domain / subdomain / scale. (Cognition is not on the Hub.)
- ``table``: a JSONL, CSV or parquet file, or a ``save_to_disk`` folder, one question per row: ``image`` (a path
  relative to the file, or a list of paths; CSV: ``;``-separated), ``question``, ``options`` (a list; CSV: a JSON
  list), ``answer_idx`` (0-based) or ``answer`` (the option text), and optional ``id``, ``modality``,
  ``submodality``, ``domain``, ``subdomain``, ``scale``, ``dataset``.
- ``microvqa``: MicroVQA (``jmhb/microvqa`` on the Hub, split ``train``, or a local copy of it): multi-image
  ``images_list``, ``question``, ``choices``, ``correct_index``, ``task_str``.

Images are read as their original encoded bytes (no re-encoding for API backends; decoded only for local models).
Broken questions (no options, gold not among the options, missing image) stay in the table with ``valid=False`` and
a ``problem``; they are reported and never scored.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset

from microbench import distributed
from microbench.data.datamodule import (
    ExactDistributedSampler,
    ImageTable,
    collate_images,
    default_transform,
    unique_images,
)
from microbench.data.loading import SAMPLE_DIR, DataSource, MicroBenchDataError, is_hub_id
from microbench.options import NonNegativeInt, PositiveInt, checked

log = logging.getLogger(__name__)

FORMATS = ("auto", "official", "table", "microvqa")
MICROVQA_ID = "jmhb/microvqa"
META = ("modality", "submodality", "domain", "subdomain", "scale")
ITEM_COLUMNS = ("row_idx", "qid", "dataset", "image_id", "images", "question", "options", "n_options", "gold_idx",
                "answer", *META, "source", "key", "question_type", "variant", "valid", "problem")


class CognitionItems:
    """The item table plus a way to read each item's image bytes."""

    def __init__(self, frame: pd.DataFrame, read_image: Callable[[object], bytes], source: DataSource) -> None:
        self.frame = frame
        dup = frame["qid"].duplicated(keep=False)
        self.duplicate_ids = {str(q): int(n) for q, n in frame["qid"][dup].value_counts(sort=False).items()}
        self.read_image = read_image
        self.source = source

    def image_bytes(self, row_idx: int) -> list[bytes]:
        return [self.read_image(ref) for ref in self.frame.at[row_idx, "images"]]

    def __len__(self) -> int:
        return len(self.frame)


def _finish(records: list[dict], dataset: str) -> pd.DataFrame:
    frame = pd.DataFrame(records)
    for col in ("qid", "dataset", *META):
        if col not in frame:
            frame[col] = None
    frame["dataset"] = frame["dataset"].fillna(dataset)
    problems = []
    golds = []
    for opts, gold, answer, images, q in zip(frame["options"], frame["gold_idx"], frame["answer"], frame["images"],
                                             frame["question"], strict=True):
        problem = ""
        if not isinstance(q, str) or not q.strip():
            problem = "no question text"
        elif not opts or len(opts) < 2:
            problem = "fewer than two options"
        elif not images:
            problem = "no image"
        if gold is None or (isinstance(gold, float) and np.isnan(gold)):
            if answer in (opts or []):
                gold = opts.index(answer)
            elif not problem:
                problem = f"answer {answer!r} is not one of the options"
        if gold is not None and not problem and not 0 <= int(gold) < len(opts):
            problem = f"answer index {gold} out of range for {len(opts)} options"
        golds.append(int(gold) if gold is not None and not problem else -1)
        problems.append(problem)
    frame["gold_idx"] = np.asarray(golds, dtype=np.int64)
    frame["answer"] = [o[g] if g >= 0 else a for o, g, a in zip(frame["options"], frame["gold_idx"], frame["answer"],
                                                                  strict=True)]
    frame["problem"] = problems
    frame["valid"] = frame["problem"] == ""
    frame["n_options"] = frame["options"].map(lambda o: len(o) if o else 0).astype(np.int64)
    frame["row_idx"] = np.arange(len(frame), dtype=np.int64)
    frame["qid"] = [q if q else f"q{i}" for i, q in enumerate(frame["qid"])]
    frame["image_id"] = [str(imgs[0]) if imgs else f"missing:{i}" for i, imgs in enumerate(frame["images"])]
    dup = frame["qid"].duplicated(keep=False)
    if dup.any():  # scored by row, so nothing is lost; but a join by id downstream would mix them up
        log.warning("%d questions share an id with another question (e.g. %r): each is scored on its own row; "
                    "metrics.json -> data_problems.duplicate_ids lists them", int(dup.sum()), frame["qid"][dup].iloc[0])
    frame["source"], frame["key"], frame["question_type"], frame["variant"] = "questions", "cognition", "cognition", 0
    return frame[list(ITEM_COLUMNS)].reset_index(drop=True)


def _options(value: object, where: str) -> list[str]:
    """A question's options as a list of strings; a string (``"A;B"``) or another scalar is refused, never split
    into characters."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []  # reported as "fewer than two options"
    if isinstance(value, str | bytes | int | float | dict):
        raise MicroBenchDataError(f"{where}: options must be a list of option texts, got {type(value).__name__} "
                                  f"{str(value)[:60]!r}; write them as a JSON list, e.g. [\"A\", \"B\"]")
    return [str(o) for o in value]


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line; a line that is not one (a truncated file) is an error naming the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise MicroBenchDataError(f"{path} line {n} is not valid JSON ({err.msg} at column {err.colno}; a "
                                          "truncated file?): fix or remove that line") from err
            if not isinstance(rec, dict):
                raise MicroBenchDataError(f"{path} line {n} is a JSON {type(rec).__name__}, not an object with "
                                          "image, question, options and answer_idx")
            records.append(rec)
    return pd.DataFrame(records)


def _answer_idx(value: object, where: str) -> int | None:
    """A 0-based gold index (an int, or a string of digits), None when absent; anything else is refused."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, bool) or not (isinstance(value, int | np.integer) or (isinstance(value, float)
                                                                             and value.is_integer())
                                       or (isinstance(value, str) and value.strip().isdigit())):
        raise MicroBenchDataError(f"{where}: answer_idx must be a 0-based option index, got {value!r}; give the "
                                  "option text as answer= instead")
    return int(value)


def _read_file(ref: object) -> bytes:
    return Path(str(ref)).read_bytes()


def read_official(root: str | Path, splits: Sequence[str] | None = None) -> CognitionItems:
    """``<root>/cognition/<split>/*.json`` (or ``root`` being the ``cognition`` folder itself)."""
    root = Path(root)
    folder = root / "cognition" if (root / "cognition").is_dir() else root
    split_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.json"))) if folder.is_dir() \
        else []
    if splits:
        split_dirs = [d for d in split_dirs if d.name in set(splits)]
    if not split_dirs:
        raise MicroBenchDataError(f"{folder} has no <split>/*.json folders: expected the official cognition layout "
                                  "cognition/<split>/<name>.json with each image beside its JSON file")
    records = []
    for d in split_dirs:
        for f in sorted(d.glob("*.json")):
            try:
                rec = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise MicroBenchDataError(f"{f} is not valid JSON: {err}") from err
            meta = rec.get("metadata") or {}
            custom = rec.get("custom_metadata") or {}
            name = meta.get("name")
            image = None
            if name:  # the official location first (beside the JSON), then the older flat layout
                image = next((c for c in (d / name, folder / name) if c.is_file()), d / name)
            questions = custom.get("questions") or {}
            for key in sorted(questions, key=lambda k: (len(k), k)):
                q = questions[key] or {}
                if not isinstance(q, dict):
                    raise MicroBenchDataError(f"{f}: questions.{key} must be an object with question, options and "
                                              f"answer, got {type(q).__name__}")
                opts = _options(q.get("options"), f"{f} questions.{key}")
                records.append({
                    "qid": f"{f.stem}/{key}", "dataset": "ubench_cognition", "question": q.get("question"),
                    "options": opts, "gold_idx": None, "answer": q.get("answer"),
                    "images": [str(image)] if image is not None and image.is_file() else [],
                    **{m: custom.get(m) for m in META}, "split": d.name,
                })
    return CognitionItems(_finish(records, "ubench_cognition"), _read_file,
                          DataSource("cognition-official", str(folder), num_rows=len(records), fingerprint=_fingerprint(records)))


def _as_paths(value: object, base: Path) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        value = [v for v in value.split(";") if v.strip()]
    out = []
    for v in value:
        p = Path(str(v).strip())
        p = p if p.is_absolute() else base / p
        out.append(str(p))
    return out


def read_table(path: str | Path) -> CognitionItems:
    """One question per row from JSONL / CSV / parquet / a ``save_to_disk`` folder (see the module docstring)."""
    path = Path(path)
    base = path.parent if path.is_file() else path
    if path.is_dir():
        import datasets

        frame = datasets.load_from_disk(str(path)).to_pandas()
    elif path.suffix == ".jsonl":
        frame = _read_jsonl(path)
    elif path.suffix == ".json":
        try:
            frame = pd.read_json(path)
        except ValueError as err:
            raise MicroBenchDataError(f"{path} is not valid JSON ({err}): fix it, or write one question per line "
                                      "(.jsonl)") from err
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
        if "options" in frame:
            parsed = []
            for n, v in enumerate(frame["options"], 1):  # a row whose options are not a JSON list: named
                try:
                    parsed.append(json.loads(v) if isinstance(v, str) else v)
                except json.JSONDecodeError as err:
                    raise MicroBenchDataError(f"{path} row {n}: options {v[:60]!r} is not a JSON list "
                                              "(e.g. [\"A\", \"B\"])") from err
            frame["options"] = parsed
    elif path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise MicroBenchDataError(f"cannot read questions from {path}: use .jsonl, .csv, .parquet or a save_to_disk "
                                  "folder")
    missing = {"image", "question", "options"} - set(frame.columns)
    if missing or not ({"answer_idx", "answer"} & set(frame.columns)):
        raise MicroBenchDataError(f"{path} lacks columns {sorted(missing) or ['answer_idx or answer']}: each row needs "
                                  "image, question, options and answer_idx (0-based) or answer")
    records = []
    for i, r in enumerate(frame.to_dict("records")):
        gold = _answer_idx(r.get("answer_idx"), f"{path} row {i + 1}")
        records.append({"qid": str(r.get("id") or f"q{i}"), "dataset": r.get("dataset") or path.stem,
                        "question": r.get("question"), "options": _options(r.get("options"), f"{path} row {i + 1}"),
                        "gold_idx": gold, "answer": r.get("answer"), "images": _as_paths(r.get("image"), base),
                        **{m: r.get(m) for m in META}})
    missing_files = sum(not Path(p).is_file() for rec in records for p in rec["images"])
    if missing_files:
        for rec in records:
            if any(not Path(p).is_file() for p in rec["images"]):
                rec["images"] = []  # reported as "no image"
        log.warning("%s: %d image files not found; their questions are reported as invalid", path, missing_files)
    return CognitionItems(_finish(records, path.stem), _read_file,
                          DataSource("cognition-table", str(path), num_rows=len(records), fingerprint=_fingerprint(records)))


def read_microvqa(path: str = MICROVQA_ID, revision: str | None = None, split: str = "train") -> CognitionItems:
    """MicroVQA from the Hub (``jmhb/microvqa``) or a local copy (``save_to_disk`` folder or parquet files)."""
    import datasets

    try:
        if is_hub_id(path) and not Path(path).exists():
            ds = datasets.load_dataset(path, revision=revision, split=split)
        elif Path(path).is_dir() and (Path(path) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(path)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - offline, missing, wrong layout: one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MicroBenchDataError(f"cannot load MicroVQA from {path!r}: {reason} (offline? pass a local copy: "
                                  "cognition.path=<save_to_disk folder>)") from err
    need = {"images_list", "question", "choices", "correct_index"}
    if need - set(ds.column_names):
        raise MicroBenchDataError(f"{path} is not MicroVQA: missing columns {sorted(need - set(ds.column_names))}")
    from datasets import Image
    from datasets import Sequence as HFSequence

    raw = ds.cast_column("images_list", HFSequence(Image(decode=False)))
    cols = raw.select_columns([c for c in ("key_question", "question", "choices", "correct_index", "task_str",
                                           "images_source") if c in raw.column_names]).to_dict()
    n_images = [len(v or []) for v in raw.select_columns(["images_list"]).to_dict()["images_list"]]
    records = []
    for i in range(len(raw)):
        records.append({"qid": f"microvqa/{cols.get('key_question', list(range(len(raw))))[i]}",
                        "dataset": "microvqa", "question": cols["question"][i],
                        "options": [str(c) for c in cols["choices"][i]], "gold_idx": int(cols["correct_index"][i]),
                        "answer": None, "images": [(i, k) for k in range(n_images[i])],
                        "subdomain": (cols.get("task_str") or [None] * len(raw))[i]})

    def read(ref) -> bytes:
        row, k = ref
        item = raw[int(row)]["images_list"][k]
        return item["bytes"] if item.get("bytes") else Path(item["path"]).read_bytes()

    return CognitionItems(_finish(records, "microvqa"), read,
                          DataSource("microvqa", str(path), revision, num_rows=len(records), fingerprint=str(ds._fingerprint)))


def _fingerprint(records: list[dict]) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for r in records:
        h.update(json.dumps([r.get("qid"), r.get("question"), r.get("options"), r.get("gold_idx"), r.get("answer"),
                             [str(p) for p in r.get("images", [])]], default=str).encode())
    return h.hexdigest()


@checked("cognition", MicroBenchDataError)
def load_cognition(path: str, format: Literal[FORMATS] = "auto", revision: str | None = None,
                   split: str | None = None) -> CognitionItems:
    """Dispatch on ``format`` (``auto``: MicroVQA for its Hub id, the official layout for folders holding
    ``cognition/`` or split folders of JSON, a table otherwise)."""
    if path == "sample":
        path = str(SAMPLE_DIR / "cognition")
    p = Path(path)
    if format == "auto":
        if path == MICROVQA_ID or (p.is_dir() and (p / "dataset_info.json").exists() and "microvqa" in p.name.lower()):
            format = "microvqa"
        elif p.is_dir() and ((p / "cognition").is_dir() or any(p.glob("*/*.json"))):
            format = "official"
        elif p.exists():
            format = "table"
        else:
            raise MicroBenchDataError(f"cognition data {path!r} not found: pass a folder in the official layout, a "
                                      f"JSONL/CSV/parquet file, 'sample', or {MICROVQA_ID}")
    if format == "microvqa":
        return read_microvqa(path, revision, split or "train")
    if format == "official":
        return read_official(p, [split] if split else None)
    return read_table(p)


class _ImageBytesDataset(Dataset):
    """The first image of each unique image key, decoded and transformed (contrastive scoring uses one image)."""

    def __init__(self, items: CognitionItems, rep_rows: np.ndarray, transform: Callable) -> None:
        self.items, self.rep_rows, self.transform = items, rep_rows, transform

    def __len__(self) -> int:
        return len(self.rep_rows)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        row = int(self.rep_rows[i])
        ref = self.items.frame.at[row, "images"][0]
        try:
            img = Image.open(io.BytesIO(self.items.read_image(ref))).convert("RGB")
            return {"index": i, "pixel_values": self.transform(img), "error": None}
        except Exception as err:  # noqa: BLE001 - a bad image is a counted skip
            why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
            return {"index": i, "pixel_values": None,
                    "error": f"{self.items.frame.at[row, 'qid']} ({ref}): {type(err).__name__}: {why}"}


class CognitionDataModule(L.LightningDataModule):
    """Expert multiple-choice questions with the interface of the perception module (``images()``, ``questions()``,
    ``rows``, ``test_dataloader``), so the zero-shot scorer scores them unchanged (``question + " " + option``).

    Args:
        path: ``sample`` (the embedded example), a folder in the official layout, a JSONL/CSV/parquet file or a
            ``save_to_disk`` folder, or ``jmhb/microvqa``.
        format: ``auto`` | ``official`` | ``table`` | ``microvqa``.
        split: official layout: one split folder (default: all); MicroVQA: the Hub split (``train``).
    """

    @checked("data", MicroBenchDataError)
    def __init__(self, path: str = "sample", format: str = "auto", revision: str | None = None,
                 split: str | None = None, batch_size: PositiveInt = 32, num_workers: NonNegativeInt = 0,
                 image_size: int = 224,
                 transform: Callable | None = None) -> None:
        super().__init__()
        self.path, self.format, self.revision, self.split_name = path, format, revision, split
        self.batch_size, self.num_workers = batch_size, num_workers
        self.transform = transform or default_transform(image_size)
        self.items: CognitionItems | None = None
        self.rows: pd.DataFrame | None = None
        self._images: ImageTable | None = None
        self.split, self.filters, self.exclude_datasets = "all", {}, []

    @property
    def source(self) -> DataSource:
        return self.items.source

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        self.items = load_cognition(self.path, self.format, self.revision, self.split_name)
        frame = self.items.frame
        if not len(frame):
            raise MicroBenchDataError(f"no questions in {self.path}")
        if not frame["valid"].any():
            problems = frame["problem"].value_counts()
            raise MicroBenchDataError(
                f"none of the {len(frame)} questions in {self.source.location} can be scored ("
                + ", ".join(f"{n} × {p}" for p, n in problems.head(3).items())
                + "): each needs a question, at least two options, an answer among them and a readable image")
        self.rows = frame[["row_idx", "image_id", "dataset"]]
        self._images = unique_images(self.rows[frame["valid"]])
        log.info("cognition %s: %d questions (%d invalid), %d unique first images", self.source.location,
                 len(frame), int((~frame["valid"]).sum()), len(self._images))

    def images(self, split: str | None = None) -> ImageTable:
        return self._images

    def questions(self, split: str | None = None) -> pd.DataFrame:
        return self.items.frame

    def test_dataloader(self) -> DataLoader:
        ds = _ImageBytesDataset(self.items, self._images.rep_row, self.transform)
        sampler = ExactDistributedSampler(ds) if distributed.world_size() > 1 else None
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_images)

