"""Cognition (expert multiple choice) accuracy: overall and per subdomain, modality, domain, scale and dataset,
each with a bootstrap CI (basic, like the official scripts)."""

from __future__ import annotations

from functools import partial

import pandas as pd

from microbench.metrics.bootstrap import bootstrap_accuracy

BREAKDOWNS = ("subdomain", "modality", "domain", "scale", "dataset")


def cognition_metrics(preds: pd.DataFrame, items: pd.DataFrame, boot: dict) -> dict:
    meta = items.set_index("row_idx")
    frame = preds.join(meta[[c for c in BREAKDOWNS if c != "dataset"]], on="row_idx")
    est = partial(bootstrap_accuracy, n_resamples=int(boot["n_resamples"]), confidence=float(boot["confidence"]),
                  seed=int(boot["seed"]))
    out = {"cognition/all": est(frame["correct"].to_numpy()).to_dict()}
    for col in BREAKDOWNS:
        for value, g in frame.groupby(frame[col].fillna("unknown").astype(str)):
            out[f"cognition/{col}/{value}"] = est(g["correct"].to_numpy()).to_dict()
    if "correct_strict" in frame:  # the Random model: the official substring rule above, the strict rule here
        out["cognition_strict/all"] = est(frame["correct_strict"].to_numpy()).to_dict()
        for col in BREAKDOWNS:
            for value, g in frame.groupby(frame[col].fillna("unknown").astype(str)):
                out[f"cognition_strict/{col}/{value}"] = est(g["correct_strict"].to_numpy()).to_dict()
    return out
