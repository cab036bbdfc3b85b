"""Specialties: the corner of μ-Bench a specialist is fine-tuned on, named by μ-Bench's own metadata.

A specialty is a metadata axis and a value (``domain=pathology``, ``modality=fluorescence microscopy``,
``submodality=...``, ``subdomain=...``, ``stain=...``, ``institution=...``) or an explicit list of source datasets.
It resolves, on the copy in use, to the source datasets whose rows mostly carry that value (a dataset belongs to the
group when at least half of its rows do; datasets are homogeneous on these axes in the release, and one that is not
is named in ``split_datasets``). The fine-tune then trains on those datasets, and its forgetting study takes them as
its target and every other dataset of the copy as supported.

Presets: ``configs/specialty/`` (the groups the paper discusses: pathology, H&E, fluorescence, electron and light
microscopy, cell biology, ...); ``specialty=custom specialty.axis=<axis> specialty.value=<value>`` for any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from microbench.errors import UserError

#: the metadata axes a specialty can be named by
AXES = ("domain", "subdomain", "modality", "submodality", "stain", "institution")


@dataclass
class Specialty:
    """A named group of source datasets of one copy."""

    name: str
    axis: str | None
    value: str | None
    datasets: list[str]
    split_datasets: dict[str, float] = field(default_factory=dict)  # dataset -> share of its rows in the group

    def to_dict(self) -> dict:
        return {"name": self.name, "axis": self.axis, "value": self.value, "datasets": self.datasets,
                "split_datasets": self.split_datasets}


def metadata_rows(path, revision=None) -> pd.DataFrame:
    """One row per data row of the copy: the resolved dataset name and every axis (no image decoded)."""
    from microbench.data.loading import load_ubench
    from microbench.data.schema import resolve_dataset_name

    ds, _ = load_ubench(path, **({"revision": revision} if revision else {}))
    cols = [c for c in ("dataset", *AXES) if c in ds.column_names]
    frame = ds.select_columns(cols).to_pandas()
    frame["dataset"] = [resolve_dataset_name(d, s) for d, s in zip(frame["dataset"],
                                                                  frame.get("stain", [None] * len(frame)), strict=True)]
    return frame


def resolve_specialty(rows: pd.DataFrame, name: str, axis: str | None = None, value: str | None = None,
                      datasets: list[str] | None = None) -> Specialty:
    """The datasets of a specialty on the copy whose metadata ``rows`` are given, or one line saying what is wrong
    (an unknown axis, a value the copy does not have, with the values it has, an empty group)."""
    have = sorted(set(rows["dataset"].astype(str)))
    if datasets:
        missing = sorted(set(datasets) - set(have))
        if missing:
            raise UserError(f"specialty {name}: dataset(s) {', '.join(missing)} are not on this copy (it has "
                            f"{', '.join(have[:12])}{' ...' if len(have) > 12 else ''})")
        return Specialty(name, None, None, sorted(datasets))
    if axis not in AXES:
        raise UserError(f"specialty {name}: axis {axis!r} is not a μ-Bench metadata axis; use one of "
                        f"{', '.join(AXES)} (e.g. specialty=custom specialty.axis=modality "
                        "'specialty.value=fluorescence microscopy') or specialty.datasets=[...]")
    if axis not in rows:
        raise UserError(f"specialty {name}: this copy has no {axis!r} column")
    values = rows[axis].astype("string").fillna("(none)")
    counts = values.value_counts()
    if value not in counts.index:
        listed = ", ".join(f"{v!r} ({n} rows)" for v, n in counts.items())
        raise UserError(f"specialty {name}: no row of this copy has {axis}={value!r}; its {axis} values: {listed}")
    share = (values == value).groupby(rows["dataset"].astype(str)).mean()
    members = sorted(share.index[share >= 0.5])
    split = {d: round(float(s), 3) for d, s in share.items() if 0 < s < 1}
    if not members:
        raise UserError(f"specialty {name}: {axis}={value!r} is a minority of every dataset's rows on this copy "
                        f"({', '.join(f'{d} {100 * s:.0f} %' for d, s in split.items())}); no dataset to train on")
    return Specialty(name, axis, value, members, split)
