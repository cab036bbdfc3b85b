"""A feature cache keyed so that stale embeddings are impossible.

Image embeddings are computed once per (backbone name, weights fingerprint, transform, data fingerprint, filters,
split spec) and reused by every probe, seed and sweep. Any change to any part of the key is a different folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from microbench.data.datamodule import PerceptionDataModule, pixels_of
from microbench.models.backbones.base import Backbone
from microbench.results.io import cache_key, write_json, write_torch

log = logging.getLogger(__name__)


def feature_key(backbone: Backbone, dm: PerceptionDataModule, device: str = "cpu") -> tuple[str, dict]:
    parts = {
        "backbone": backbone.name, "fingerprint": backbone.fingerprint(), "transform": repr(dm.transform),
        "data_fingerprint": dm.source.fingerprint, "filters": dm.filters, "exclude": dm.exclude_datasets,
        "split_spec": dm.split_spec.to_dict(),
    }
    dtype = backbone.inference.dtype(device)
    if dtype != torch.float32:  # bf16 features are other features (fp32 keys as they always were)
        parts["dtype"] = str(dtype)
    return cache_key(parts), parts


@torch.no_grad()
def compute_image_features(backbone: Backbone, dm: PerceptionDataModule, device: str = "cpu",
                           progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """L2-normalised embeddings of every unique image of ``dm`` (split ``all``), in ``dm.images('all')`` order;
    rows of images that fail to decode are NaN (and counted in the log)."""
    backbone.eval().to(device)
    images = dm.images("all")
    out = torch.full((len(images), backbone.embed_dim), float("nan"))
    failed = 0
    loader = dm.image_loader("all")
    for batch in tqdm(loader, desc="encode images", unit="batch", disable=not progress, leave=False):
        failed += len(batch["failed"])
        if batch["pixel_values"] is not None:
            out[batch["image_index"]] = backbone.embed_images(pixels_of(batch, device)).cpu()
    if failed:
        log.warning("%d image(s) failed to decode; their features are NaN and they are skipped", failed)
    return out, np.asarray(images.image_id, dtype=object)


class FeatureCache:
    """``root/<key>/features.pt`` (+ ``key.json`` describing the key), written atomically."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def get(self, backbone: Backbone, dm: PerceptionDataModule, device: str = "cpu",
            progress: bool = True) -> tuple[torch.Tensor, np.ndarray, bool]:
        """(features, image_ids, hit): loads the cached entry or computes and stores it."""
        key, parts = feature_key(backbone, dm, device)
        folder = self.root / key
        path = folder / "features.pt"
        if path.exists():
            blob = torch.load(path, weights_only=False)
            log.info("feature cache hit %s (%s)", key, backbone.name)
            return blob["features"], blob["image_ids"], True
        feats, ids = compute_image_features(backbone, dm, device, progress)
        write_torch(path, {"features": feats, "image_ids": ids})
        write_json(folder / "key.json", parts)
        return feats, ids, False
