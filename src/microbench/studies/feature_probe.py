"""Feature forgetting beside zero-shot forgetting: did the fine-tune damage the image features, or only their
alignment with the text tower?

Zero-shot accuracy on the supported datasets falls when either the image features lose information or the image and
text towers drift apart. Re-fitting a linear probe on each model's *frozen* image features separates the two (the
feature-distortion view of Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features"): if the probe on
the fine-tune's features is as good as the probe on the base's, the features still hold what the base knew and the
zero-shot loss is lost alignment (recoverable with a new head or text prompts); if the probe drops too, the features
themselves were damaged.

:func:`feature_forgetting` re-fits the full-data probe (:func:`~microbench.models.linear_probe.full_data_probe`:
converged L-BFGS, weight decay chosen on val) of every dataset on the base's, the fine-tune's and the chosen
model's features, on the same rows (a row left out for one model is left out for all), and reports test accuracy
with Δ vs base and a paired, image-clustered bootstrap CI, per dataset and pooled over the target and the
supported datasets; :func:`verdict` reads it beside the zero-shot Δ.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from microbench.metrics.bootstrap import CLUSTERED, ClusterBootstrap
from microbench.models.linear_probe import (
    WEIGHT_DECAYS,
    dataset_probe_data,
    full_data_probe,
    row_to_image_index,
)

log = logging.getLogger(__name__)


def feature_forgetting(backbone, models: Mapping[str, Callable[[], None]], dm, targets: set[str], *,
                       n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0,
                       device: str | torch.device = "cpu", weight_decays: Sequence[float] = WEIGHT_DECAYS) -> dict:
    """Linear probes re-fitted on each model's frozen image features.

    ``models``: ``{name: set_weights}`` in order, the first the reference (the base): each callable loads that
    model's weights into ``backbone``. ``dm``: a perception data module of split ``all`` (every dataset's train, val
    and test rows). Returns ``{"models": [...], "datasets": {name: {...}}, "pooled": {"target"|"supported": {...}},
    "skipped": {...}}``: per model the test accuracy and (but the reference) Δ vs the reference, paired over the same
    test rows and image-clustered."""
    t0 = time.perf_counter()
    names = list(models)
    dm.setup()
    feats = features_of_models(backbone, models, dm, device)
    valid = np.logical_and.reduce([~torch.isnan(f).any(1).numpy() for f in feats.values()])
    row_to_image = row_to_image_index(dm)
    correct: dict[str, list[np.ndarray]] = {n: [] for n in names}
    clusters, group, dataset_of = [], [], []
    datasets: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for ds in sorted(dm.rows["dataset"].astype(str).unique()):
        fits = {}
        for name in names:
            data, info = dataset_probe_data(dm, feats[name], ds, row_to_image, valid)
            if data is None:
                break
            fits[name] = (data, full_data_probe(data, weight_decays))
        if len(fits) < len(names):
            skipped[ds] = info["skipped"]
            continue
        y = np.asarray(next(iter(fits.values()))[0].y_test)
        for name in names:
            correct[name].append((fits[name][1]["test_pred"] == y).astype(float))
        clusters.append(np.char.add(f"{ds}/", info["test_images"].astype(str)))
        group.append(np.full(len(y), "target" if ds in targets else "supported"))
        dataset_of.append(np.full(len(y), ds))
        datasets[ds] = {"target": ds in targets, "n_test": int(len(y)), "rows": info["rows"],
                        "classes": int(info["classes"]), "models": {
                            name: {"weight_decay": fit["weight_decay"], "converged": fit["converged"]}
                            for name, (_, fit) in fits.items()}}
    out = {"models": names, "datasets": datasets, "pooled": {}, "skipped": skipped, "interval": CLUSTERED,
           "probe": "full-data multinomial logistic regression on L2-normalised frozen image features, weight decay "
                    "chosen on val (microbench.models.linear_probe.full_data_probe)"}
    if not datasets:
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out
    values = {n: np.concatenate(c) for n, c in correct.items()}
    ds_all, grp = np.concatenate(dataset_of), np.concatenate(group)
    masks = {**{f"dataset/{d}": ds_all == d for d in datasets},
             **{f"pooled/{g}": grp == g for g in ("target", "supported") if (grp == g).any()}}
    resampler = ClusterBootstrap(np.concatenate(clusters), n_resamples, confidence, seed)
    ref = names[0]
    acc = {n: resampler.estimates(values[n], masks) for n in names}
    delta = {n: resampler.estimates(values[n] - values[ref], masks) for n in names[1:]}
    for key in masks:
        kind, name = key.split("/", 1)
        entry = {}
        for n in names:
            entry[n] = {"acc": acc[n][key].to_dict()}
            if n != ref:
                d = delta[n][key].to_dict()
                entry[n]["delta"] = dict(d, significant=bool(d["low"] > 0 or d["high"] < 0))
        if kind == "dataset":
            datasets[name].update(entry)
        else:
            out["pooled"][name] = dict(entry, n_test=int(masks[key].sum()))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("feature probes: %d datasets x %d models in %.1f s", len(datasets), len(names), out["seconds"])
    return out


@torch.no_grad()
def features_of_models(backbone, models: Mapping[str, Callable[[], None]], dm, device="cpu") -> dict[str, torch.Tensor]:
    """L2-normalised image features of every unique image of ``dm`` (split ``all``) under each model, decoding each
    image once: every batch is encoded by each model in turn (``models[name]()`` loads its weights). Rows of images
    that fail to decode are NaN, as in :func:`~microbench.models.features.compute_image_features`."""
    from microbench.data.datamodule import pixels_of

    backbone.eval().to(device)
    n = len(dm.images("all"))
    out = {name: torch.full((n, backbone.embed_dim), float("nan")) for name in models}
    failed = 0
    for batch in dm.image_loader("all"):
        failed += len(batch["failed"])
        if batch["pixel_values"] is None:
            continue
        pixels = pixels_of(batch, device)
        for name, load in models.items():
            load()
            out[name][batch["image_index"]] = backbone.embed_images(pixels).cpu()
    if failed:
        log.warning("%d image(s) failed to decode; their features are NaN and their rows are left out", failed)
    return out


def verdict(probe_delta: Mapping | None, zero_shot_delta: Mapping | None) -> str:
    """What a model's supported-dataset change means, from its probe Δ and its zero-shot Δ (each with ``low`` and
    ``high`` of a CI): ``features damaged`` (the probe on its features drops), ``alignment lost, features intact``
    (zero-shot drops, the probe does not), ``features improved``, or ``no significant change``."""
    if not probe_delta:
        return "—"
    if probe_delta["high"] < 0:
        return "features damaged"
    if zero_shot_delta and zero_shot_delta["high"] < 0:
        return "alignment lost, features intact"
    if probe_delta["low"] > 0:
        return "features improved"
    return "no significant change"
