"""Evaluate many interpolations of two checkpoints in one pass: every image is decoded once per sweep.

:class:`InterpolationScorer` extends the zero-shot scorer: for each decoded batch it sets the backbone's weights to
θ(α) for every α in turn (in place, with fused ``torch._foreach`` ops) and stores each α's image embeddings; at the
end it encodes the unique texts once per α and scores every item per α. Results equal separate evaluations of each
interpolated model exactly (tested), at the cost of one decode instead of one per α.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch

from microbench import distributed
from microbench.data.datamodule import pixels_of
from microbench.models.backbones.base import Backbone
from microbench.models.zero_shot import ZeroShotScorer
from microbench.studies.merging import StateDict, check_compatible


def alpha_name(alpha: float) -> str:
    return f"alpha={alpha:.2f}"


class WeightInterpolator:
    """Sets a module's weights to θ(α) = θ_start + α·(θ_end − θ_start) in place, with fused ``torch._foreach`` ops:
    WiSE-FT's (1 − α)·θ_base + α·θ_ft with the base and the fine-tune as end points, or any merge method's path
    (:mod:`microbench.studies.methods`).

    ``start`` and ``end`` are state dicts of ``module``; ``keys`` selects the interpolated tensors (e.g. the image
    tower), the others are left as they are. α = 0 and α = 1 are exact copies. Tensors of at least float32 are
    interpolated in their own dtype, in place; bf16/fp16 ones in float32 (end points kept in float32), rounded once.
    ``memo`` (``id -> tensor``) lets several interpolators share their copies of the same tensors (the base).
    """

    def __init__(self, module: torch.nn.Module, start: StateDict, end: StateDict,
                 keys: Callable[[str], bool] | None = None, memo: dict | None = None) -> None:
        check_compatible(start, end, names=["start", "end"])
        names = dict(module.named_parameters())
        names.update(dict(module.named_buffers()))
        sel = keys or (lambda k: True)
        self.memo = {} if memo is None else memo
        self.keys = [k for k, t in start.items() if t.is_floating_point() and sel(k) and k in names]
        self._targets = [names[k] for k in self.keys]
        self._base = [self._cast(start[k], t) for k, t in zip(self.keys, self._targets, strict=True)]
        self._ft = [self._cast(end[k], t) for k, t in zip(self.keys, self._targets, strict=True)]
        self.exact = all(b.dtype == t.dtype for b, t in zip(self._base, self._targets, strict=True))
        self._scratch: list[torch.Tensor] | None = None  # float32 work space of low-precision models

    def _cast(self, value: torch.Tensor, target: torch.Tensor, device=None) -> torch.Tensor:
        dtype = torch.promote_types(target.dtype, torch.float32)
        key = (id(value), dtype, str(device))
        if key not in self.memo:
            self.memo[key] = (value, value.to(dtype=dtype, device=device))  # the source kept alive with its copy
        return self.memo[key][1]

    def to(self, device: torch.device | str) -> WeightInterpolator:
        self._base = [self._cast(b, t, device) for b, t in zip(self._base, self._targets, strict=True)]
        self._ft = [self._cast(f, t, device) for f, t in zip(self._ft, self._targets, strict=True)]
        self._scratch = None
        return self

    @torch.no_grad()
    def set_alpha(self, alpha: float) -> None:
        if alpha == 0 or alpha == 1:
            torch._foreach_copy_(self._targets, self._base if alpha == 0 else self._ft)
            return
        if not self.exact:  # low-precision weights: lerp in float32 (scratch buffers made once), one rounding
            if self._scratch is None:
                self._scratch = [b.clone() for b in self._base]
            torch._foreach_copy_(self._scratch, self._base)
            torch._foreach_lerp_(self._scratch, self._ft, alpha)
            torch._foreach_copy_(self._targets, self._scratch)
            return
        torch._foreach_copy_(self._targets, self._base)
        torch._foreach_lerp_(self._targets, [f.to(t.device) for f, t in zip(self._ft, self._targets, strict=True)],
                             alpha)


class InterpolationScorer(ZeroShotScorer):
    """Zero-shot scoring of many models on lines in weight space, decoding each image once: every α of WiSE-FT's
    θ(α) = (1 − α)·θ_base + α·θ_ft, or every point ``(path, α)`` of several paths (merge methods).

    Args:
        backbone: the model (its current weights are ignored: each point sets them).
        base, finetuned: state dicts of ``backbone`` (same keys/shapes).
        alphas: interpolation weights (0 = base, 1 = fine-tuned) of the WiSE-FT line, when ``paths`` is None.
        keys: predicate selecting the interpolated tensors (e.g. the image tower); others stay at the base.
        paths: ``{name: (θ_start, θ_end)}``; with ``points``, the ``(name, α)`` scored (``predictions_by_point``).
        on_done: ``(predictions_by_alpha, skipped, module)`` on global rank 0.
    """

    def __init__(self, backbone: Backbone, base: StateDict, finetuned: StateDict, alphas: Sequence[float] = (),
                 keys: Callable[[str], bool] | None = None, on_done: Callable | None = None,
                 progress_label: str | None = None, paths: dict[str, tuple[StateDict, StateDict]] | None = None,
                 points: Sequence[tuple[str, float]] | None = None, **kwargs) -> None:
        super().__init__(backbone, **kwargs)  # texts: by text-tower fingerprint (towers=image: encoded once)
        self.progress_label = progress_label  # a bar over images x models (Lightning's own is off inside a fit)
        self._bar = None
        if paths is None:
            paths, points = {"wise_ft": (base, finetuned)}, [("wise_ft", float(a)) for a in alphas]
        memo: dict = {}
        self.paths = {name: WeightInterpolator(backbone, s, e, keys, memo) for name, (s, e) in paths.items()}
        self.weights = next(iter(self.paths.values()))
        self.points = [(str(n), float(a)) for n, a in points]
        self.alphas = [a for n, a in self.points if n == self.points[0][0]] if self.points else []
        self.on_done = on_done
        self.predictions_by_point: dict[tuple[str, float], pd.DataFrame] = {}
        self.predictions_by_alpha: dict[float, pd.DataFrame] = {}

    def set_alpha(self, alpha: float, path: str | None = None) -> None:
        (self.paths[path] if path is not None else self.weights).set_alpha(alpha)

    def set_point(self, point: tuple[str, float]) -> None:
        self.paths[point[0]].set_alpha(point[1])

    def on_test_epoch_start(self) -> None:
        self._start(self.trainer.datamodule)

    def _start(self, dm) -> None:
        self._reset(len(dm.images()))
        self.backbone.eval()
        self.timings = {"_start": time.perf_counter()}
        self._bufs = {p: torch.zeros_like(self._emb) for p in self.points}
        self._decoded = 0
        for w in self.paths.values():
            w.to(self.device)
        self.timings["set_weights"] = 0.0
        if self.progress_label and distributed.rank() == 0:
            from tqdm.auto import tqdm

            n = len(dm.images())
            self._bar = tqdm(total=n * len(self.points), desc=self.progress_label, unit="img×model", leave=False,
                             dynamic_ncols=True)

    @torch.no_grad()
    def sweep(self, dm, device: str | torch.device = "cpu") -> dict[float, pd.DataFrame]:
        """The whole sweep without a Trainer, in the current process group (none: this process alone): this rank
        encodes its shard of the split (``dm.image_loader``: every image on exactly one rank, decoded once for all
        α), the embeddings are gathered and scored, the texts encoded sharded too. Returns the predictions by α
        (the same on every rank); ``self.decoded`` counts the decodes of every rank."""
        if distributed.is_distributed():  # spawned processes may share the weights' memory (torch.multiprocessing
            for t in (*self.backbone.parameters(), *self.backbone.buffers()):  # pickles CPU tensors to shared
                t.data = t.data.clone()  # memory): each rank sets its own θ(α), so each gets its own copy
        self.to(device)
        self._start(dm)
        for i, batch in enumerate(dm.image_loader(dm.split)):
            self.test_step(batch, i)  # test_step moves and finishes the pixels (pixels_of), as under trainer.test
        self._finish(dm)
        return self.predictions_by_alpha

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._decoded += len(batch["image_index"]) + len(batch["failed"])
        if not self._note_failures(batch):
            return
        idx = batch["image_index"].cpu()
        pixels = pixels_of(batch, self.device)
        for point in self.points:  # one decoded batch, every model
            t = time.perf_counter()
            self.set_point(point)
            self.timings["set_weights"] += time.perf_counter() - t
            self._bufs[point][idx] = self.backbone.embed_images(pixels).to("cpu")
        self._seen[idx.numpy()] = True
        if self._bar is not None:
            self._bar.update(len(idx) * len(self.points))

    def on_test_epoch_end(self) -> None:
        self._finish(self.trainer.datamodule)

    def _finish(self, dm) -> None:
        """Gather every rank's embeddings of every α and score them (the text encoding sharded over the ranks)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        t0 = time.perf_counter()
        self.timings["images"] = round(t0 - self.timings.pop("_start", t0), 3)
        zero = distributed.rank() == 0
        skipped = {}
        self.predictions_by_point = {}
        self.decoded_per_rank = [int(n) for n in distributed.gather_objects(self._decoded)]
        self.decoded = sum(self.decoded_per_rank)
        for point in self.points:
            emb, seen = self._bufs[point], self._seen
            if distributed.is_distributed():
                mine = torch.from_numpy(np.flatnonzero(self._seen))
                emb, seen = torch.zeros_like(emb), np.zeros(len(self._seen), dtype=bool)
                for idx, e in distributed.gather_objects((mine, self._bufs[point][mine])):
                    emb[idx] = e
                    seen[idx.numpy()] = True
            self.set_point(point)  # every rank scores: the texts are encoded sharded (encode_texts), then gathered
            preds, skipped = self.score(dm, emb, seen)
            self.predictions_by_point[point] = preds
        first = self.points[0][0] if self.points else None
        self.predictions_by_alpha = {a: p for (n, a), p in self.predictions_by_point.items() if n == first}
        errors = [e for part in distributed.gather_objects(self._errors) for e in part]
        skipped["failed_images"] = errors
        self.skipped = skipped
        self.timings["texts_and_scoring"] = round(time.perf_counter() - t0, 3)
        self.timings["set_weights"] = round(self.timings["set_weights"], 3)
        if self.on_done is not None and zero:
            self.on_done(self.predictions_by_alpha, skipped, self)
        self._bufs = {}


class LocalizationInterpolationScorer(L.LightningModule):
    """A localization head scored on every θ(α) of its backbone, decoding each image once (like
    :class:`InterpolationScorer`): per batch, the backbone is set to each θ(α) and the head predicts; at the end
    every α is scored with COCO + GRIT. ``results[alpha]`` holds the metrics (global rank 0)."""

    def __init__(self, module, base: StateDict, finetuned: StateDict, alphas: Sequence[float],
                 keys: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.module = module  # a LocalizationModule; its backbone is interpolated in place
        self.weights = WeightInterpolator(module.backbone, base, finetuned, keys)
        self.alphas = [float(a) for a in alphas]
        self.results: dict[float, dict] = {}

    def on_test_epoch_start(self) -> None:
        self.module.eval()
        self.weights.to(self.device)
        self._preds: dict[float, list] = {a: [] for a in self.alphas}
        self._failed: list[str] = []

    @torch.no_grad()
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._failed += list(batch.get("errors", []))
        if not batch["images"]:
            return
        index = [int(t["index"]) for t in batch["targets"]]
        for a in self.alphas:  # one decoded batch, every model
            self.weights.set_alpha(a)
            self._preds[a] += [{"index": i, **rec} for i, rec in
                               zip(index, self.module.predict_images(batch["images"]), strict=True)]

    def on_test_epoch_end(self) -> None:
        gathered = distributed.gather_objects((self._preds, self._failed))
        if not self.trainer.is_global_zero:
            return
        images = self.trainer.datamodule.images(self.trainer.datamodule.split)
        for a in self.alphas:
            preds = {r["index"]: r for part, _ in gathered for r in part[a]}
            self.results[a] = self.module.score_predictions(preds, images)["metrics"]
        self.failed_images = [e for _, errs in gathered for e in errs]


class LocalizationSweeper:
    """``(split, base, finetuned, alphas, keys) -> {alpha name: metrics}``: a localization head scored on every
    θ(α) of its backbone in one pass over the split, each image decoded once (forgetting studies).
    ``make_dm(split)`` builds the :class:`LocalizationDataModule` of a split (once per split)."""

    def __init__(self, module, make_dm: Callable, accelerator: str = "cpu") -> None:
        self.module, self.make_dm, self.accelerator = module, make_dm, accelerator
        self.data_modules: dict = {}

    def __call__(self, split: str, base: StateDict, finetuned: StateDict, alphas, keys=None) -> dict[str, dict]:
        if split not in self.data_modules:
            self.data_modules[split] = self.make_dm(split)
        scorer = LocalizationInterpolationScorer(self.module, base, finetuned, alphas, keys)
        trainer = L.Trainer(accelerator=self.accelerator, devices=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False)  # may run inside a fit
        trainer.test(scorer, datamodule=self.data_modules[split], verbose=False)
        return {alpha_name(a): m for a, m in scorer.results.items()}
