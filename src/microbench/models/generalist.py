"""A generalist base built on the spot: a backbone first trained contrastively (image ↔ its own caption texts, the
CLIP loss) on the train split of every dataset of a copy, so that a forgetting study has a base that knows the
benchmark. The demo's base (``configs/model/tiny_generalist.yaml``): the tiny random-init model is not a base
anything can be forgotten from.

Built once and cached by everything that changes its weights (the backbone config, the recipe, the copy's
fingerprint, the split specification): ``<cache_dir>/<key>/model.pt`` (atomic), reused by later runs, so a
specialist fine-tuned from it and a later ``src/forgetting.py base=tiny_generalist`` share the same base.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch

from microbench.data.labelled import LabelledDataModule
from microbench.models.backbones.base import Backbone
from microbench.models.backbones.registry import build_backbone
from microbench.models.finetune import FineTuneModule
from microbench.options import PositiveFloat, PositiveInt, checked
from microbench.results.io import cache_key, write_json, write_torch

log = logging.getLogger(__name__)


def _key(backbone: dict, recipe: dict, data: dict) -> str:
    return cache_key({"backbone": backbone, "recipe": recipe, "data": data}, length=16)


def _read_cached(path: Path) -> dict | None:
    """The cached weights, or None when there are none or they cannot be read (rebuilt then, and replaced)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            return state
        problem = f"holds a {type(state).__name__}, not weights"
    except Exception as err:  # noqa: BLE001 - a damaged cache entry of any kind is rebuilt
        problem = f"cannot be read ({type(err).__name__})"
    log.warning("the cached generalist base %s %s: building it again", path, problem)
    return None


@checked("model")
def build_generalist(backbone: dict, data_path: str = "sample", revision: str | None = None, split_seed: int = 0,
                     split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), epochs: PositiveInt = 20,
                     lr: PositiveFloat = 1e-3, weight_decay: float = 0.1, batch_size: PositiveInt = 32, seed: int = 0,
                     cache_dir: str | None = None, accelerator: str = "cpu") -> Backbone:
    """``backbone`` (a ``build_backbone`` config) trained contrastively on the train split of every dataset of
    ``data_path``; from the cache when this exact recipe was built before."""
    bb = build_backbone(**backbone)
    recipe = {"epochs": int(epochs), "lr": float(lr), "weight_decay": float(weight_decay),
              "batch_size": int(batch_size), "seed": int(seed), "objective": "contrastive"}
    dm = LabelledDataModule(path=data_path, revision=revision, split_seed=split_seed,
                            split_fractions=split_fractions, batch_size=int(batch_size), transform=bb.preprocess,
                            train_transform=bb.train_transform, drop_last_train=True, seed=int(seed))
    dm.setup("fit")
    data = {"fingerprint": dm.source.fingerprint, "split": dm.split_spec.to_dict()}
    key = _key({**backbone, "base_fingerprint": bb.fingerprint()}, recipe, data)
    path = Path(cache_dir or Path.home() / ".cache" / "microbench" / "bases") / key / "model.pt"
    cached = _read_cached(path)
    if cached is not None:
        bb.load_state_dict(cached)
        log.info("generalist base %s from the cache (%s)", key, path)
    else:
        log.info("building the generalist base once (cached as %s): %s trained contrastively on the train split of "
                 "every dataset of %s, %d epochs", key, bb.name, dm.source.location, epochs)
        states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:  # the caller's random streams continue as if the base had come from the cache
            L.seed_everything(int(seed), workers=True, verbose=False)
            module = FineTuneModule(bb, objective="contrastive", lr=float(lr), weight_decay=float(weight_decay),
                                    warmup_frac=0.1, head_lr_mult=1.0, seed=int(seed))
            trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=int(epochs), logger=False,
                                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                                num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0)
            trainer.fit(module, datamodule=dm)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])
        state = {k: v.detach().cpu() for k, v in bb.state_dict().items()}
        write_torch(path, state)
        write_json(path.parent / "recipe.json", {"backbone": backbone, "recipe": recipe, "data": data})
    for p in bb.parameters():
        p.requires_grad_(True)
    bb.eval()
    bb.source = {**bb.source, "generalist": {"key": key, **recipe, "data": data_path}}
    bb.fingerprint(refresh=True)
    return bb


build_generalist.family = "contrastive"  # read by microbench.tasks without building
