"""Run a forgetting study right after ``trainer.fit``: the base is the backbone as it was when fitting started."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch

from microbench.errors import UserError
from microbench.models.backbones.base import state_fingerprint
from microbench.results.io import read_json
from microbench.studies.forgetting import StudySpec, run_study
from microbench.studies.report import write_report

log = logging.getLogger(__name__)


class ForgettingCallback(L.Callback):
    """Snapshot the backbone at ``on_fit_start`` (the base); at ``on_fit_end`` interpolate it with the fine-tuned
    weights on every rank of the fit (the images sharded over the ranks, scored once on rank 0) and write the
    forgetting report to ``out_dir``.

    Args:
        make_dm: ``split -> PerceptionDataModule`` over the whole benchmark (the backbone's transform).
        spec: the study's settings (:func:`microbench.tasks.study.study_spec` reads them from the config).
        localization: ``split -> metrics`` of a localization head on the current backbone (localization fits).
        target_datasets: the fine-tuning datasets (default: the class space of the fitted data module).
    """

    def __init__(self, make_dm: Callable, out_dir: str | Path, spec: StudySpec | None = None,
                 target_datasets: Sequence[str] | None = None, localization: Callable | None = None,
                 make_base: Callable | None = None, base_state: dict | None = None) -> None:
        self.make_dm, self.out_dir, self.spec = make_dm, Path(out_dir), spec or StudySpec()
        self.initial_base = base_state  # the base when the fit starts from other weights (init_from, a chain)
        self.make_base = make_base  # () -> the base backbone rebuilt from the model config (resumed fits)
        self.base_fingerprint: str | None = None  # saved in every checkpoint of the fit
        self.run_id = uuid.uuid4().hex  # recorded in forgetting.json: read back only as this run's study
        self.target_datasets, self.localization = target_datasets, localization
        self.base_state: dict | None = None
        self.study: dict | None = None

    def result(self, trainer: L.Trainer) -> dict | None:
        """The study of this fit: in memory, or (the fit ran in spawned workers) read back from ``forgetting.json``
        when this run wrote it; None when no study ran (e.g. ``fast_dev_run``)."""
        if self.study is not None or trainer.fast_dev_run:
            return self.study
        path = self.out_dir / "forgetting.json"
        record = read_json(path) if path.is_file() else {}
        return record if record.get("run_id") == self.run_id else None

    def state_dict(self) -> dict:
        return {"base_fingerprint": self.base_fingerprint}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_fingerprint = state_dict.get("base_fingerprint")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path:  # a fresh fit: the base is the backbone as it is now (or the model it started from)
            from microbench.models.adapters import is_adapted, merged_copy

            now = pl_module.backbone  # with LoRA (injected in setup, B = 0): the base's own weights and key names
            now = merged_copy(now) if is_adapted(now) else now
            self.base_state = self.initial_base or {k: v.detach().to("cpu", copy=True)
                                                    for k, v in now.state_dict().items()}
            self.base_fingerprint = state_fingerprint(self.base_state)
            return
        # resumed: the weights are already fine-tuned; the base is the model the checkpoint records, rebuilt
        self.base_state = self._rebuilt_base(trainer.ckpt_path)
        log.info("forgetting study: resumed from %s; base rebuilt from the model config (fingerprint %s, as "
                 "recorded in the checkpoint)", trainer.ckpt_path, self.base_fingerprint)

    def _rebuilt_base(self, ckpt_path: str) -> dict:
        how = ("run the study on its own: python src/forgetting.py base=<the model preset you fine-tuned> "
               f"finetuned={ckpt_path}, or set forgetting.enabled=false")
        if not self.base_fingerprint:
            raise UserError(f"forgetting study on a resumed fit: {ckpt_path} does not record its base weights "
                            f"(written before the study was enabled, or by another version); {how}")
        if self.make_base is None:
            raise UserError(f"forgetting study on a resumed fit: cannot rebuild the base of {ckpt_path}; {how}")
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.make_base().state_dict().items()}
        got = state_fingerprint(state)
        if got != self.base_fingerprint:
            raise UserError(f"forgetting study on a resumed fit: the model config now builds weights {got}, but the "
                            f"fit started from {self.base_fingerprint} ({ckpt_path}); the base cannot be recovered, "
                            f"so no report of zeros is written; {how}")
        return state

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.base_state is None or trainer.fast_dev_run:
            return
        backbone = pl_module.backbone
        from microbench.models.adapters import is_adapted, merged_copy

        if is_adapted(backbone):  # LoRA: the study interpolates full weights, the adapter merged into a copy
            backbone = merged_copy(backbone)
        ft_state = {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()}
        targets = self.target_datasets or pl_module.class_space.datasets
        logger = trainer.logger if trainer.logger else None
        # every rank of the fit takes part: each encodes its shard of the images for every α, rank 0 scores once
        with torch.inference_mode(False):
            study = run_study(backbone, self.base_state, ft_state, make_dm=self.make_dm, out_dir=self.out_dir,
                              target_datasets=targets, spec=self.spec, cache_dir=self.spec.result_cache, device=pl_module.device, finetuned_path="(this run)",
                              localization=self.localization, extra={"run_id": self.run_id})
        if trainer.is_global_zero and study is not None:
            self.study = write_report(study, self.out_dir, logger)
        backbone.to(pl_module.device)
        log.debug("forgetting study written to %s", self.out_dir)  # the run's summary names it, after the test
