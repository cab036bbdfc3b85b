"""Run a forgetting study right after ``trainer.fit``: the base is the backbone as it was when fitting started."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch

from microbench.studies.forgetting import DEFAULT_ALPHAS, run_study

log = logging.getLogger(__name__)


class ForgettingCallback(L.Callback):
    """Snapshot the backbone at ``on_fit_start`` (the base); at ``on_fit_end`` (rank 0) interpolate it with the
    fine-tuned weights and write the forgetting report to ``out_dir``.

    Args:
        make_dm: ``split -> PerceptionDataModule`` over the whole benchmark (the backbone's transform).
        localization: ``split -> metrics`` of a localization head on the current backbone (localization fits).
        target_datasets: the fine-tuning datasets (default: the class space of the fitted data module).
    """

    def __init__(self, make_dm: Callable, out_dir: str | Path, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 towers: str = "both", keep_target_gain: float = 0.8, target_datasets: Sequence[str] | None = None,
                 cache_dir: str | Path | None = None, n_resamples: int = 9999,
                 localization: Callable | None = None) -> None:
        self.make_dm, self.out_dir, self.alphas, self.towers = make_dm, Path(out_dir), alphas, towers
        self.keep_target_gain, self.target_datasets, self.cache_dir = keep_target_gain, target_datasets, cache_dir
        self.n_resamples, self.localization = n_resamples, localization
        self.base_state: dict | None = None
        self.study: dict | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:  # resumed: the weights are already fine-tuned, the base was lost
            log.warning("forgetting study: resumed from %s, so the base weights are the checkpoint's, not the "
                        "pre-trained ones; run src/forgetting.py with the base model instead", trainer.ckpt_path)
        self.base_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.backbone.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.base_state is None or trainer.fast_dev_run:
            return
        backbone = pl_module.backbone
        ft_state = {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()}
        targets = self.target_datasets or pl_module.class_space.datasets
        logger = trainer.logger if trainer.logger else None
        with torch.inference_mode(False):
            self.study = run_study(backbone, self.base_state, ft_state, self.make_dm, self.out_dir, targets,
                                   self.alphas, self.towers, self.keep_target_gain, self.cache_dir,
                                   accelerator="cpu" if pl_module.device.type == "cpu" else "gpu",
                                   n_resamples=self.n_resamples, finetuned_path="(this run)", logger=logger,
                                   localization=self.localization)
        backbone.to(pl_module.device)
        log.info("forgetting report: %s", self.out_dir / "forgetting.md")
