"""Fine-tuning a CLIP-style backbone on μ-Bench source datasets (e.g. the pathology slice).

Two objectives:

- ``contrastive`` (FLYP-style): the CLIP loss between images and their own caption texts (the dataset's caption
  templates filled with the class), both towers trainable unless locked; evaluation classifies with the *current*
  text tower's class-prompt embeddings. Under DDP the loss uses features gathered from every rank, with gradients
  for the local part (open_clip's ``ClipLoss``), so the effective batch is global.
- ``ce`` (WiSE-FT-style): cross-entropy over a linear head initialised from the class prompts' text embeddings
  (the zero-shot head), on normalised image features; the text tower is not used after initialisation.

Predictions are always made within the image's own source dataset (other datasets' classes are masked).
AdamW with decoupled weight decay (not on gains/biases), linear warmup + cosine decay per step; gradient clipping,
accumulation and mixed precision come from the Trainer; ``compile=True`` wraps the model with ``torch.compile``.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from microbench.errors import UserError
from microbench.models.backbones.base import Backbone, BackboneError
from microbench.options import checked

log = logging.getLogger(__name__)
OBJECTIVES = ("ce", "contrastive")
#: the contrastive temperature of a backbone without a learnable one: CLIP's initial scale 1/0.07 (Radford et al.
#: 2021), unless the backbone's own ``logit_scale`` says otherwise
FIXED_LOGIT_SCALE = 1 / 0.07


@torch.no_grad()
def class_text_embeddings(backbone: Backbone, prompts: list[list[str]], batch_size: int = 256) -> torch.Tensor:
    """[C, D] normalised mean of each class's normalised prompt embeddings (the zero-shot classifier), each prompt
    encoded by the one text path of evaluation (:meth:`Backbone.embed_texts`), on this rank alone."""
    flat = [p for ps in prompts for p in ps]
    device = next(backbone.parameters()).device
    embs = []
    for i in range(0, len(flat), batch_size):
        tok = backbone.tokenize(flat[i:i + batch_size])
        tok = {k: v.to(device) for k, v in tok.items()} if isinstance(tok, dict) else tok.to(device)
        embs.append(backbone.embed_texts(tok, device))
    embs = torch.cat(embs)
    out, start = [], 0
    for ps in prompts:
        out.append(F.normalize(embs[start:start + len(ps)].mean(0), dim=-1))
        start += len(ps)
    return torch.stack(out)


def freeze_image_blocks(backbone: Backbone, n: int) -> int:
    """Freeze the stem and the first ``n`` transformer/stage blocks of the image tower; returns how many were found."""
    tower = backbone.image_tower()
    blocks = None
    for path in ("transformer.resblocks", "blocks", "encoder.layers", "trunk.blocks", "stages", "layers"):
        obj = tower
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList | nn.Sequential):
            blocks = obj
            break
    if blocks is None:
        raise BackboneError(f"cannot find the blocks of {backbone.name}'s image tower to freeze")
    n = min(n, len(blocks))
    block_params = {id(p) for b in blocks for p in b.parameters()}
    for p in tower.parameters():  # stem: every parameter that is not inside a block
        if id(p) not in block_params:
            p.requires_grad_(False)
    for b in list(blocks)[:n]:
        b.requires_grad_(False)
    return n


class FineTuneModule(L.LightningModule):
    """Fine-tune a backbone on a :class:`~microbench.data.labelled.LabelledDataModule`.

    Args:
        backbone: any :class:`Backbone` (``contrastive`` needs a text tower, ``ce`` only for the head init).
        objective: ``contrastive`` or ``ce``.
        lr, weight_decay, warmup_steps (or warmup_frac of the total steps), betas, eps: AdamW + cosine schedule.
        head_lr_mult: learning-rate multiplier of the ``ce`` head.
        lock_text: freeze the text tower (always for ``ce``).
        freeze_blocks: freeze the image tower's stem and first N blocks.
        label_smoothing: for ``ce``.
        compile: ``torch.compile`` the model.
        record: extra JSON-able facts stored in every checkpoint (model config, data source...).
    """

    @checked("module")
    def __init__(self, backbone: Backbone, objective: Literal[OBJECTIVES] = "ce", lr: float = 1e-5, weight_decay: float = 0.1,
                 warmup_steps: int | None = None, warmup_frac: float = 0.1, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-6, head_lr_mult: float = 10.0, lock_text: bool = False, freeze_blocks: int = 0,
                 label_smoothing: float = 0.0, compile: bool = False, seed: int = 0,
                 record: dict[str, Any] | None = None, adapter: str | None = None,
                 lora: dict[str, Any] | None = None, head_init: Literal["zero_shot", "probe"] = "zero_shot") -> None:
        super().__init__()
        if head_init == "probe" and objective != "ce":
            raise UserError("module.head_init=probe (LP-FT) initialises the cross-entropy head: use it with "
                            "module.objective=ce")
        if adapter not in (None, "lora"):
            raise UserError(f"module.adapter must be null (train the weights themselves) or lora, got {adapter!r}")
        if not backbone.has_text:
            raise backbone.no_text_error()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.objective = objective
        self.head: nn.Linear | None = None
        self.register_buffer("class_mask", torch.zeros(0, 0, dtype=torch.bool), persistent=False)
        self.register_buffer("eval_classifier", torch.zeros(0), persistent=False)
        self.class_space = None
        self.loss_fn = None
        self._eval_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.adapter_spec: dict | None = None
        self.probe_init: dict | None = None
        self._adapters_checked = False
        if adapter:  # a checkpoint holds the adapter alone: the base's weights come from the model config
            self.strict_loading = False

    # --- setup ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.class_space is not None:
            return
        dm = self.trainer.datamodule
        dm.setup(stage)
        self.class_space = space = dm.class_space
        self.class_mask = space.mask().to(self.device)
        n_classes = space.num_classes
        metrics = MetricCollection({
            "acc": MulticlassAccuracy(n_classes, average="micro"),
            "balanced_acc": MulticlassAccuracy(n_classes, average="macro"),
            "macro_f1": MulticlassF1Score(n_classes, average="macro"),
        })
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        if self.objective == "ce":
            self.head = nn.Linear(self.backbone.embed_dim, n_classes, bias=True)
            probe = self.fit_probe_head(dm) if self.hparams.head_init == "probe" else None  # LP-FT (Kumar et
            with torch.no_grad():  # al., 2022): the probe first, then the fine-tune from it
                if probe is not None:
                    self.head.weight.copy_(probe[0])
                    self.head.bias.copy_(probe[1])
                    self.probe_init = probe[2]
                else:
                    zs = class_text_embeddings(self.backbone, space.prompts)
                    self.head.weight.copy_(zs * float(self.backbone.logit_scale))
                    self.head.bias.zero_()
            self.head.to(self.device)
        if self.hparams.lock_text or self.objective == "ce":
            self.backbone.freeze_text_tower()
        if self.objective == "ce":  # the head replaces text tower and logit scale: nothing else may wait for a
            image = {id(p) for p in self.backbone.image_tower().parameters()}  # gradient (DDP would stop)
            for p in self.backbone.parameters():
                if id(p) not in image:
                    p.requires_grad_(False)
        if self.hparams.freeze_blocks:
            freeze_image_blocks(self.backbone, self.hparams.freeze_blocks)
        if self.hparams.adapter == "lora":  # peft LoRA on the towers; every other backbone weight frozen
            from microbench.models.adapters import add_lora

            opts = {k: v for k, v in dict(self.hparams.lora or {}).items() if v is not None}
            # the text tower is adapted when the objective trains it (contrastive, not lock_text), as in full FT
            opts.setdefault("text", self.objective == "contrastive" and not self.hparams.lock_text)
            self.adapter_spec = add_lora(self.backbone, **opts)
            log.info("LoRA (r=%d, alpha=%g) on %d module(s); %d trainable parameters", self.adapter_spec["r"],
                     self.adapter_spec["alpha"], len(self.adapter_spec["targets"]), self.trainable_parameters())
        if self.objective == "contrastive":
            from open_clip.loss import ClipLoss

            self.loss_fn = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False,
                                    rank=self.global_rank, world_size=self.trainer.world_size)
        if self.hparams.compile:
            self.backbone.model = torch.compile(self.backbone.model)

    def fit_probe_head(self, dm) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """LP-FT's first stage: a linear probe on the backbone's L2-normalised features of every train image
        (evaluation transform, the same on every rank), weight decay chosen on val along the probe's path
        (:func:`microbench.models.linear_probe.choose_head`, each fit run to convergence)."""
        from microbench.models.linear_probe import WEIGHT_DECAYS, choose_head

        was = self.backbone.training
        self.backbone.eval()
        feats = {}
        for split in ("train", "val"):
            xs, ys = [], []
            for batch in dm.unsharded_loader(split) if len(dm.labelled(split)["rows"]) else []:
                if batch["pixel_values"] is None:
                    continue
                with torch.no_grad():
                    xs.append(self.image_features(batch["pixel_values"].to(self.device)).cpu())
                ys.append(batch["label"])
            feats[split] = (torch.cat(xs), torch.cat(ys)) if xs else (None, None)
        self.backbone.train(was)
        x, y = feats["train"]
        if x is None:
            raise UserError("module.head_init=probe: no train images to fit the probe on")
        n_classes = self.class_space.num_classes
        xv, yv = feats["val"]
        wd, head, scores = choose_head(x, y, n_classes, xv, yv, WEIGHT_DECAYS)
        info = {"kind": "probe", "weight_decay": wd, "val_acc": scores[wd], "n_train": len(y),
                "n_val": 0 if yv is None else len(yv), "converged": bool(head.converged)}
        log.info("LP-FT: probe head fitted on %d train images (weight decay %.0e chosen on val, val acc %.3f)",
                 len(y), wd, scores[wd])
        return head.weight.detach().clone(), head.bias.detach().clone(), info

    # --- forward ----------------------------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone.encode_image(pixels).float(), dim=-1)

    def logits(self, features: torch.Tensor, dataset_idx: torch.Tensor) -> torch.Tensor:
        if self.objective == "ce":
            out = self.head(features)
        else:
            out = float(self.backbone.logit_scale) * features @ self.eval_classifier.T
        return out.masked_fill(~self.class_mask[dataset_idx], float("-inf"))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if batch["pixel_values"] is None:
            return None
        feats = self.image_features(batch["pixel_values"])
        if self.objective == "ce":
            loss = F.cross_entropy(self.logits(feats, batch["dataset_idx"]), batch["label"],
                                   label_smoothing=self.hparams.label_smoothing)
        else:
            tok = self.backbone.tokenize(batch["text"])
            tok = {k: v.to(self.device) for k, v in tok.items()} if isinstance(tok, dict) else tok.to(self.device)
            text = F.normalize(self.backbone.encode_text(tok).float(), dim=-1)
            loss = self.loss_fn(feats, text, self.contrastive_scale())
        if self.adapter_spec is not None and not loss.requires_grad:  # nothing trainable reaches the loss
            from microbench.models.adapters import adapter_modules

            self._no_gradient(list(adapter_modules(self.backbone)))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _no_gradient(self, silent: list[str]) -> None:
        raise UserError(f"module.adapter=lora: {len(silent)} adapted module(s) got no gradient in the first step and "
                        f"would not train: {', '.join(silent[:4])}{' ...' if len(silent) > 4 else ''} (off the loss's path, "
                        "e.g. the text tower under objective=ce, or used through its weight alone, as open_clip's "
                        "attn.out_proj: target the attention module itself, module.lora.target_modules=null)")

    def on_after_backward(self) -> None:
        if self.adapter_spec is None or self._adapters_checked:
            return
        from microbench.models.adapters import silent_adapters

        self._adapters_checked = True  # the first step: every adapter must receive a gradient
        silent = silent_adapters(self.backbone)
        if silent:
            self._no_gradient(silent)

    def contrastive_scale(self) -> torch.Tensor:
        """exp of the backbone's learnable log scale (trained with the rest, clamped at 100 as CLIP), or, for a
        backbone without one (allowed for plug-ins), a fixed scale: its ``logit_scale`` if it defines one, else
        :data:`FIXED_LOGIT_SCALE` (logged once)."""
        param = self.backbone.logit_scale_parameter()
        if param is not None:
            return param.exp().clamp(max=100)
        fixed = float(self.backbone.logit_scale)
        fixed = FIXED_LOGIT_SCALE if fixed == 1.0 else fixed  # 1.0: the base class's "no scale"
        if not getattr(self, "_fixed_scale_logged", False):
            self._fixed_scale_logged = True
            log.info("%s has no learnable logit scale: contrastive fine-tuning uses a fixed scale of %.2f",
                     self.backbone.name, fixed)
        return torch.tensor(fixed, device=self.device)

    # --- evaluation -------------------------------------------------------------------------------------------
    def _refresh_classifier(self) -> None:
        if self.objective == "contrastive":
            self.eval_classifier = class_text_embeddings(self.backbone, self.class_space.prompts).to(self.device)

    def on_validation_epoch_start(self) -> None:
        self._refresh_classifier()
        self._eval_outputs = []

    def on_test_epoch_start(self) -> None:
        self._refresh_classifier()
        self._eval_outputs = []

    def _eval_step(self, batch: dict, metrics: MetricCollection) -> None:
        if batch["pixel_values"] is None:
            return
        logits = self.logits(self.image_features(batch["pixel_values"]), batch["dataset_idx"])
        preds = logits.argmax(dim=1)
        metrics.update(preds, batch["label"])
        self._eval_outputs.append((preds.cpu(), batch["label"].cpu(), batch["dataset_idx"].cpu()))
        loss = F.cross_entropy(logits, batch["label"])
        stage = "val" if metrics is self.val_metrics else "test"
        self.log(f"{stage}/loss", loss, batch_size=len(preds), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def _eval_epoch_end(self, metrics: MetricCollection, stage: str) -> None:
        self.log_dict(metrics.compute(), prog_bar=stage == "val", sync_dist=True)
        metrics.reset()
        if stage == "test" and self._eval_outputs:  # per-dataset accuracy (gathered under DDP)
            preds, labels, ds_idx = (torch.cat(x) for x in zip(*self._eval_outputs, strict=True))
            if self.trainer.world_size > 1:
                preds, labels, ds_idx = (self.all_gather(x).flatten() if x.numel() else x for x in (preds, labels, ds_idx))
            for d, name in enumerate(self.class_space.datasets):
                sel = ds_idx == d
                if sel.any():
                    self.log(f"test/acc/{name}", (preds[sel] == labels[sel]).float().mean(), rank_zero_only=True)
        self._eval_outputs = []

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")

    # --- reproducibility --------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        """Seed every RNG from (seed, epoch): shuffling, augmentation and caption choice then depend only on the
        epoch, so resuming from a checkpoint at an epoch boundary reproduces an uninterrupted run."""
        s = int(self.hparams.seed) * 100_003 + int(self.current_epoch) + 1
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["microbench"] = {
            "backbone": self.backbone.describe(),
            "class_space": self.class_space.to_dict() if self.class_space else None,
            "objective": self.objective,
            **(self.hparams.record or {}),
        }
        if self.head is not None:
            checkpoint["microbench"]["head_shape"] = list(self.head.weight.shape)
            checkpoint["microbench"]["head_init"] = self.probe_init or {"kind": self.hparams.head_init}
        if self.adapter_spec is not None:  # the adapter (and head) alone; loaders merge it into the base
            checkpoint["microbench"]["adapter"] = self.adapter_spec
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if "lora_" in k or not k.startswith("backbone.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = (checkpoint.get("microbench") or {}).get("adapter")
        if self.adapter_spec is not None or saved:  # the adapter-only state loads non-strictly: check it fits
            mine = {k: (self.adapter_spec or {}).get(k) for k in ("kind", "r", "alpha", "text", "targets")}
            theirs = {k: (saved or {}).get(k) for k in mine}
            if mine != theirs:
                diff = next(k for k in mine if mine[k] != theirs[k])
                raise UserError(f"the checkpoint's adapter differs from this run's ({diff}: {theirs[diff]!r} vs "
                                f"{mine[diff]!r}): resume with the module.adapter / module.lora settings it was "
                                "trained with")
            want = {k for k in self.state_dict() if "lora_" in k}
            if want - set(checkpoint["state_dict"]):
                raise UserError(f"the checkpoint lacks {len(want - set(checkpoint['state_dict']))} adapter tensor(s) "
                                f"of this run (e.g. {sorted(want - set(checkpoint['state_dict']))[0]})")
        space = (checkpoint.get("microbench") or {}).get("class_space")
        if self.objective == "ce" and self.head is None and space:  # build the head before weights load
            n, d = len(space["classes"]), self.backbone.embed_dim
            self.head = nn.Linear(d, n, bias=True)

    # --- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay, head = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("head."):
                head.append(p)
            elif p.ndim < 2 or "logit_scale" in name or name.endswith(".bias") or "norm" in name.lower():
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if head:
            groups.append({"params": head, "weight_decay": hp.weight_decay, "lr": hp.lr * hp.head_lr_mult})
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(hp.warmup_frac * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(1, warmup)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
