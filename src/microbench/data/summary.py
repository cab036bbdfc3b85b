"""What is in a copy of μ-Bench: counts per question type, caption key and dataset, localization rows, problems."""

from __future__ import annotations

from typing import Any

import datasets

from microbench.data import schema
from microbench.data.loading import DataSource
from microbench.data.questions import QuestionTable, build_question_table


def count_image_failures(ds: datasets.Dataset, limit: int | None = None) -> list[dict]:
    """Decode every image (or the first ``limit``) and list the rows that fail; slow on the full release."""
    images = ds.select_columns(["image"])
    n = len(ds) if limit is None else min(limit, len(ds))
    bad = []
    for i in range(n):
        try:
            images[i]["image"].convert("RGB")
        except Exception as err:  # noqa: BLE001
            bad.append({"row_idx": i, "source": "row", "key": "image", "problem": f"{type(err).__name__}: {err}"})
    return bad


def summarize(ds: datasets.Dataset, source: DataSource, table: QuestionTable | None = None,
              check_images: bool = False) -> dict[str, Any]:
    """The ``microbench info`` record: JSON-serialisable, stable keys."""
    table = table or build_question_table(ds)
    rows = table.rows
    problems = table.problems
    invalid = [
        {k: (None if v is None else (int(v) if k == "row_idx" else str(v))) for k, v in rec.items()}
        for rec in problems[["row_idx", "image_id", "dataset", "source", "key", "problem"]].to_dict("records")
    ]
    image_failures = count_image_failures(ds) if check_images else []
    invalid += image_failures
    dup = rows["image_id"].duplicated(keep=False)
    names = schema.label_names(ds)
    return {
        "source": source.to_dict(),
        "rows": int(len(ds)),
        "columns": list(ds.column_names),
        "unique_image_ids": int(rows["image_id"].nunique()),
        "rows_with_duplicated_image_id": int(dup.sum()),
        "questions": table.counts("questions"),
        "captions": table.counts("captions"),
        "absent": {f"{s}.{k}": int(v) for (s, k), v in sorted(table.absent.items()) if v},
        "items": int(len(table.frame)),
        "datasets": {str(k): int(v) for k, v in rows["dataset"].value_counts().sort_index().items()},
        "null_dataset_rows": int(ds.data.column("dataset").null_count) if "dataset" in ds.column_names else 0,
        "domains": _counts(rows, "domain"),
        "modalities": _counts(rows, "modality"),
        "rows_with_bbox": int(rows["has_bbox"].sum()) if "has_bbox" in rows else 0,
        "rows_with_polygon": int(rows["has_polygon"].sum()) if "has_polygon" in rows else 0,
        "label_classes": len(names) if names is not None else None,
        "official_datasets_present": sorted(set(rows["dataset"]) & schema.OFFICIAL_DATASETS),
        "non_official_datasets_present": sorted(set(rows["dataset"]) - schema.OFFICIAL_DATASETS),
        "invalid": invalid,
        "image_failures": len(image_failures) if check_images else None,
    }


def _counts(rows, col: str) -> dict[str, int]:
    if col not in rows:
        return {}
    return {str(k): int(v) for k, v in rows[col].value_counts(dropna=False).sort_index().items()}
