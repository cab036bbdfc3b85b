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
    attach_clustered,
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


def metric_masks(p: pd.DataFrame, source: str) -> dict[str, np.ndarray]:
    """Every metric of one source's predictions as a boolean mask over its rows, names as in the module docstring
    and in the order ``metrics.json`` lists them (``<source>/macro_dataset/<grain>``: the items the macro mean is
    taken over, by dataset). Masks may be empty; the pairing of the leaderboard and rescoring use them too."""
    grains = _grain(p["question_type"])
    dataset = p["dataset"].astype(str)
    ds = dataset.to_numpy()
    head = np.asarray(headline_mask(p))
    official = dataset.isin(schema.OFFICIAL_DATASETS).to_numpy()
    excl = dataset.isin(SLICES["official_excl_eulenberg"]).to_numpy()
    masks: dict[str, np.ndarray] = {}
    for grain in ("coarse", "fine"):
        g = grains == grain
        masks[f"{source}/all/{grain}"] = g
        masks[f"{source}/official/{grain}"] = g & head & official
        masks[f"{source}/official_excl_eulenberg/{grain}"] = g & head & excl
        for slice_name, members in SLICES.items():
            inside = ~official if members is None else dataset.isin(members).to_numpy()
            masks[f"{source}/slice/{slice_name}/{grain}"] = g & head & inside
            masks[f"{source}/all_variants/slice/{slice_name}/{grain}"] = g & inside
        masks[f"{source}/macro_dataset/{grain}"] = g & head
    masks[f"{source}/all/all"] = np.ones(len(p), dtype=bool)
    qtype = p["question_type"].astype(str).to_numpy()
    for t in sorted(set(qtype)):
        is_t = qtype == t
        masks[f"{source}/official/type/{t}"] = is_t & head & official
        masks[f"{source}/official_excl_eulenberg/type/{t}"] = is_t & head & excl
        masks[f"{source}/all_variants/type/{t}"] = is_t
    variants = p["variant"].to_numpy()
    if (variants >= 0).any():
        keys = p["key"].astype(str).to_numpy()
        for key in sorted(set(keys)):
            masks[f"{source}/key/{key}"] = keys == key
        for variant in sorted(set(variants.tolist())):
            masks[f"{source}/variant/{variant}"] = variants == variant
    for name in sorted(set(ds[head])):
        for grain in ("coarse", "fine"):
            masks[f"{source}/dataset/{name}/{grain}"] = head & (ds == name) & (grains == grain)
    for name in sorted(set(ds)):
        for grain in ("coarse", "fine"):
            masks[f"{source}/all_variants/dataset/{name}/{grain}"] = (ds == name) & (grains == grain)
    return masks


def is_macro(name: str) -> bool:
    """The macro mean over datasets (not a mean over items: no item mask, no clustered interval)."""
    return "/macro_dataset/" in name


def closed_vqa_metrics(preds: pd.DataFrame, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = 0, clustered: bool = True) -> dict[str, dict]:
    """All accuracy metrics of a predictions frame (columns source, dataset, question_type, key, variant,
    correct), each as ``{value, low, high, ci, n}`` with the official interval (scipy's basic bootstrap of the items,
    as the paper); names as in the module docstring. With ``clustered`` (and an ``image_id`` column) each also gets
    ``clustered``: ``{low, high, ci, interval}``, the image-clustered percentile interval
    (:class:`~microbench.metrics.bootstrap.ClusterBootstrap`: images resampled with all their questions, bounds in
    [0, 1]) — the uncertainty to read when items on one image are not independent."""
    out: dict[str, dict] = {}
    for source, p in preds.groupby("source", observed=True):
        correct = p["correct"].to_numpy()
        ds = p["dataset"].astype(str).to_numpy()
        scored: dict[str, np.ndarray] = {}
        for name, mask in metric_masks(p, str(source)).items():
            if is_macro(name):
                sel = ds[mask]
                per_ds = [correct[mask][sel == d] for d in sorted(set(sel))]
                macro: Estimate = bootstrap_macro(per_ds, n_resamples, confidence, seed)
                if macro.n:
                    out[name] = {**macro.to_dict(), "datasets": len(per_ds)}
                continue
            est = bootstrap_accuracy(correct[mask], n_resamples, confidence, seed)
            if est.n:
                out[name] = est.to_dict()
                scored[name] = mask
        if clustered and "image_id" in p.columns and scored:
            attach_clustered(out, correct, scored, p["image_id"].astype(str).to_numpy(), n_resamples, confidence,
                             seed)
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
