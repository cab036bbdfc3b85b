"""Closed-VQA accuracy of scored predictions: pooled, per type, key, variant, dataset, slice, and the headline.

Every number that carries an official name follows the official code (eVLLM ``eval_posthoc*.py``; ubench-format.md
§6a/§6c) on the Hub's keys: the official scripts match ``{<type>, <type>_1}`` exactly against the caption key, which
on Hub keys selects only the ``_1`` variant, and the final fine-grained script uses only ``classification_1``.

- ``<src>/official/{coarse,fine}``: the Table-1 headline, the ``_1`` variants pooled (micro) over the 23 official
  datasets (``opencell`` and GlaS are outside the official tables); ``<src>/official_excl_eulenberg/...`` the same
  without the Eulenberg darkfield/epifluorescence datasets (the Oct-2024 rebuttal totals).
- ``<src>/official/type/<t>`` and ``<src>/official_excl_eulenberg/type/<t>``: the official per-type coarse numbers.
- ``<src>/slice/<pathology|he|official|official_excl_eulenberg|non_official>/<grain>``: the slice tables
  (the official pathology and H&E tables), ``_1`` variants.
- ``<src>/dataset/<name>/<grain>``: the per-dataset table (fine = ``classification_1``), and
  ``<src>/macro_dataset/<grain>``, the unweighted mean over those datasets (ours, not an official number).

Numbers that pool both variants say so in their name: ``<src>/all/<grain>`` (every item of every dataset),
``<src>/all_variants/type/<t>``, ``<src>/all_variants/slice/<name>/<grain>``,
``<src>/all_variants/dataset/<name>/<grain>``; ``<src>/key/<key>`` and ``<src>/variant/<v>`` break them down. For
the question form (``source=questions``) there is one variant per type and every number uses it.
:func:`headline_coverage` says, with counts, when a headline shrinks or vanishes (no ``_1`` captions, datasets
without them, no official dataset at all).
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
    correct), each as ``{value, low, high, ci, n}``; names as in the module docstring."""
    out: dict[str, dict] = {}

    def put(name: str, correct) -> None:
        est = bootstrap_accuracy(np.asarray(correct), n_resamples, confidence, seed)
        if est.n:
            out[name] = est.to_dict()

    for source, p in preds.groupby("source", observed=True):
        p = p.assign(grain=_grain(p["question_type"]))
        dataset = p["dataset"].astype(str)
        head = headline_mask(p)
        official = dataset.isin(schema.OFFICIAL_DATASETS).to_numpy()
        excl = dataset.isin(SLICES["official_excl_eulenberg"]).to_numpy()
        for grain in ("coarse", "fine"):
            g = (p["grain"] == grain).to_numpy()
            put(f"{source}/all/{grain}", p.loc[g, "correct"])
            put(f"{source}/official/{grain}", p.loc[g & head & official, "correct"])
            put(f"{source}/official_excl_eulenberg/{grain}", p.loc[g & head & excl, "correct"])
            for slice_name, members in SLICES.items():
                inside = ~official if members is None else dataset.isin(members).to_numpy()
                put(f"{source}/slice/{slice_name}/{grain}", p.loc[g & head & inside, "correct"])
                put(f"{source}/all_variants/slice/{slice_name}/{grain}", p.loc[g & inside, "correct"])
            sel = g & head
            per_ds = [grp["correct"].to_numpy() for _, grp in p[sel].groupby(dataset[sel], observed=True)]
            macro: Estimate = bootstrap_macro(per_ds, n_resamples, confidence, seed)
            if macro.n:
                out[f"{source}/macro_dataset/{grain}"] = {**macro.to_dict(), "datasets": len(per_ds)}
        put(f"{source}/all/all", p["correct"])
        qtype = p["question_type"].astype(str).to_numpy()
        for t in sorted(set(qtype)):
            is_t = qtype == t
            put(f"{source}/official/type/{t}", p.loc[is_t & head & official, "correct"])
            put(f"{source}/official_excl_eulenberg/type/{t}", p.loc[is_t & head & excl, "correct"])
            put(f"{source}/all_variants/type/{t}", p.loc[is_t, "correct"])
        if (p["variant"] >= 0).any():
            for key, grp in p.groupby("key", observed=True):
                put(f"{source}/key/{key}", grp["correct"])
            for variant, grp in p.groupby("variant", observed=True):
                put(f"{source}/variant/{variant}", grp["correct"])
        for (name, grain), grp in p[head].groupby([dataset[head], "grain"], observed=True):
            put(f"{source}/dataset/{name}/{grain}", grp["correct"])
        for (name, grain), grp in p.groupby([dataset, "grain"], observed=True):
            put(f"{source}/all_variants/dataset/{name}/{grain}", grp["correct"])
    return out


def headline_coverage(preds: pd.DataFrame) -> dict[str, dict]:
    """Per source and grain: how many items the headline counts, and why it is smaller than it could be.

    Returns ``{source: {grain: {"n": counted, "scored_official": items of official datasets in any variant,
    "missing_datasets": [official datasets with items but none in the headline variant], "note": str | ""}}}``;
    the note is a sentence for the log and ``results.md`` whenever the headline is absent or drops datasets.
    """
    out: dict[str, dict] = {}
    for source, p in preds.groupby("source", observed=True):
        p = p.assign(grain=_grain(p["question_type"]))
        dataset = p["dataset"].astype(str)
        head = headline_mask(p)
        official = dataset.isin(schema.OFFICIAL_DATASETS).to_numpy()
        per: dict[str, dict] = {}
        for grain in ("coarse", "fine"):
            g = (p["grain"] == grain).to_numpy()
            n_all, n_off, n_head = int(g.sum()), int((g & official).sum()), int((g & official & head).sum())
            with_items = set(dataset[g & official])
            in_head = set(dataset[g & official & head])
            missing = sorted(with_items - in_head)
            variant_name = "classification_1" if grain == "fine" else "<type>_1"
            note = ""
            if n_all and not n_off:
                outside = sorted(set(dataset[g]))
                note = (f"headline {grain} n/a: none of the {n_all} {grain} items is from the 23 official datasets "
                        f"(this copy holds {', '.join(outside[:6])}{' ...' if len(outside) > 6 else ''}); "
                        f"see {source}/all/{grain}")
            elif n_off and not n_head:
                note = (f"headline {grain} n/a: the {n_off} {grain} items of the official datasets have no "
                        f"{variant_name} caption variant (the headline uses only that variant, as the official "
                        f"code); see {source}/all_variants/slice/official/{grain}")
            elif missing:
                note = (f"headline {grain} covers {n_head} items: {len(missing)} official dataset(s) with {grain} "
                        f"items have no {variant_name} captions and are not in it ({', '.join(missing[:6])}"
                        f"{' ...' if len(missing) > 6 else ''})")
            per[grain] = {"n": n_head, "scored_official": n_off, "missing_datasets": missing, "note": note}
        out[str(source)] = per
    return out


def headline_table(metrics: dict[str, dict], source: str = "captions") -> dict[str, dict]:
    """The Table-1 numbers of one source: official coarse and fine, with and without the Eulenberg exclusion."""
    keys = {
        "coarse": f"{source}/official/coarse", "fine": f"{source}/official/fine",
        "coarse_excl_eulenberg": f"{source}/official_excl_eulenberg/coarse",
        "fine_excl_eulenberg": f"{source}/official_excl_eulenberg/fine",
    }
    return {k: metrics[v] for k, v in keys.items() if v in metrics}
