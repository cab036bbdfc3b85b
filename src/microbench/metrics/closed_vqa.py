"""Closed-VQA accuracy of scored predictions: pooled, per type, key, variant, dataset, slice, and the headline.

Headline ("official") numbers follow the official code (ubench-format.md §6a/§6c) on the Hub's keys:

- **fine** = the ``classification_1`` caption set (the final rebuttal script uses only ``classification_1``),
- **coarse** = the ``_1`` variants of domain, modality, stain, subdomain and submodality (the official scripts match
  ``{<type>, <type>_1}`` exactly, which on Hub keys selects only ``_1``),

pooled (micro) over the 23 official datasets (``opencell`` and GlaS are outside the official tables), and again with
the Eulenberg darkfield/epifluorescence datasets excluded (the Oct-2024 totals). For the contrastive question form
(``source=questions``) there is one variant per type and the headline uses it. Every other number (both variants,
all datasets) is reported beside it, so no choice is hidden.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from microbench.data import schema
from microbench.metrics.bootstrap import (
    CONFIDENCE,
    N_RESAMPLES,
    Estimate,
    bootstrap_accuracy,
    bootstrap_macro,
)

HEADLINE_VARIANT = 1
SLICES = {
    "official": schema.OFFICIAL_DATASETS,
    "official_excl_eulenberg": schema.OFFICIAL_DATASETS - schema.EULENBERG_EXCLUDED,
    "pathology": schema.PATHOLOGY_DATASETS,
    "he": schema.HE_DATASETS,
    "non_official": None,  # everything outside the official set
}


def _grain(qtype: pd.Series) -> np.ndarray:
    return np.where(qtype.astype(str) == "classification", "fine", "coarse")


def headline_mask(preds: pd.DataFrame) -> np.ndarray:
    """Items that count for the headline: variant 1 of each caption type, every contrastive question."""
    variant = preds["variant"].to_numpy()
    return (variant == HEADLINE_VARIANT) | (variant < 0)


def closed_vqa_metrics(preds: pd.DataFrame, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = 0) -> dict[str, dict]:
    """All accuracy metrics of a predictions frame (columns source, dataset, question_type, key, variant,
    correct), each as ``{value, low, high, ci, n}``; names are ``<source>/<slice>/<grain>``."""
    out: dict[str, dict] = {}

    def put(name: str, correct) -> None:
        est = bootstrap_accuracy(np.asarray(correct), n_resamples, confidence, seed)
        if est.n:
            out[name] = est.to_dict()

    for source, p in preds.groupby("source", observed=True):
        p = p.assign(grain=_grain(p["question_type"]))
        dataset = p["dataset"].astype(str)
        head = headline_mask(p)
        for grain in ("coarse", "fine"):
            g = (p["grain"] == grain).to_numpy()
            put(f"{source}/all/{grain}", p.loc[g, "correct"])
            official = dataset.isin(schema.OFFICIAL_DATASETS).to_numpy()
            put(f"{source}/official/{grain}", p.loc[g & head & official, "correct"])
            excl = dataset.isin(SLICES["official_excl_eulenberg"]).to_numpy()
            put(f"{source}/official_excl_eulenberg/{grain}", p.loc[g & head & excl, "correct"])
            for slice_name, members in SLICES.items():
                inside = ~dataset.isin(schema.OFFICIAL_DATASETS).to_numpy() if members is None \
                    else dataset.isin(members).to_numpy()
                put(f"{source}/slice/{slice_name}/{grain}", p.loc[g & inside, "correct"])
            per_ds = [grp["correct"].to_numpy() for _, grp in p[g].groupby(dataset[g], observed=True)]
            macro: Estimate = bootstrap_macro(per_ds, n_resamples, confidence, seed)
            if macro.n:
                out[f"{source}/macro_dataset/{grain}"] = {**macro.to_dict(), "datasets": len(per_ds)}
        put(f"{source}/all/all", p["correct"])
        for qtype, grp in p.groupby("question_type", observed=True):
            put(f"{source}/type/{qtype}", grp["correct"])
        if (p["variant"] >= 0).any():
            for key, grp in p.groupby("key", observed=True):
                put(f"{source}/key/{key}", grp["correct"])
            for variant, grp in p.groupby("variant", observed=True):
                put(f"{source}/variant/{variant}", grp["correct"])
        for (name, grain), grp in p.groupby([dataset, "grain"], observed=True):
            put(f"{source}/dataset/{name}/{grain}", grp["correct"])
    return out


def headline_table(metrics: dict[str, dict], source: str = "captions") -> dict[str, dict]:
    """The Table-1 numbers of one source: official coarse and fine, with and without the Eulenberg exclusion."""
    keys = {
        "coarse": f"{source}/official/coarse", "fine": f"{source}/official/fine",
        "coarse_excl_eulenberg": f"{source}/official_excl_eulenberg/coarse",
        "fine_excl_eulenberg": f"{source}/official_excl_eulenberg/fine",
    }
    return {k: metrics[v] for k, v in keys.items() if v in metrics}
