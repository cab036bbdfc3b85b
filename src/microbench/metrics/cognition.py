"""Cognition (expert multiple choice) accuracy: overall and per subdomain, modality, domain, scale and dataset,
each with a bootstrap CI (basic, like the official scripts) and, beside it, the image-clustered percentile interval
(``clustered``: questions on one image resampled together; several questions can share an image)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from microbench.metrics.bootstrap import attach_clustered, bootstrap_accuracy

BREAKDOWNS = ("subdomain", "modality", "domain", "scale", "dataset")


def cognition_metrics(preds: pd.DataFrame, items: pd.DataFrame, boot: dict) -> dict:
    """Every cognition metric of ``preds`` (``row_idx``, ``correct``, optionally ``correct_strict``) joined with the
    item table's breakdown columns and ``image_id`` (the cluster of the clustered interval)."""
    meta = items.set_index("row_idx")
    extra = [c for c in (*BREAKDOWNS, "image_id") if c != "dataset" and c in meta and c not in preds]
    frame = preds.join(meta[extra], on="row_idx")
    n_res, conf, seed = int(boot["n_resamples"]), float(boot["confidence"]), int(boot["seed"])
    clusters = (frame["image_id"].astype(str) if "image_id" in frame else frame["row_idx"].astype(str)).to_numpy()
    out: dict[str, dict] = {}
    for prefix, column in (("cognition", "correct"), ("cognition_strict", "correct_strict")):
        if column not in frame:  # correct_strict: the Random model's strict rule beside the official one
            continue
        correct = frame[column].to_numpy().astype(float)
        masks = {f"{prefix}/all": np.ones(len(frame), dtype=bool)}
        for col in BREAKDOWNS:
            values = frame[col].fillna("unknown").astype(str).to_numpy()
            masks.update({f"{prefix}/{col}/{v}": values == v for v in sorted(set(values))})
        for name, mask in masks.items():
            out[name] = bootstrap_accuracy(correct[mask], n_res, conf, seed).to_dict()
        attach_clustered(out, correct, masks, clusters, n_res, conf, seed)
    return out
