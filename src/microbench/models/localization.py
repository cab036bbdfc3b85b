"""Detection and instance-segmentation heads over any CLIP-style image tower (torchvision Faster / Mask R-CNN).

The tower's last-block spatial features (ViT patch tokens, or a CNN's last stage) become a simple feature pyramid
in the ViTDet style — one map turned into strides ×¼, ×½, ×1, ×2 by transposed convolutions / max-pooling — fed to
torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`; torchvision's :class:`FasterRCNN` (``head=detection``)
or :class:`MaskRCNN` (``head=segmentation``) does the rest. Images go in at their own size: the detector's
transform resizes them to the tower's input size (longest side) with the tower's own normalisation, and the
pyramid pads the batch to the square input a ViT needs (bottom/right, so coordinates are unchanged). Predictions
come back in the original pixel coordinates.

:class:`LocalizationModule` trains the head (backbone frozen by default, or fine-tuned with a smaller learning
rate), and scores val/test with COCO AP (pycocotools) and the GRIT localization score (see
:mod:`microbench.metrics.localization`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from microbench import distributed
from microbench.errors import UserError
from microbench.models.backbones.base import Backbone, BackboneError
from microbench.options import checked

log = logging.getLogger(__name__)

HEADS = ("detection", "segmentation")
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


class SimpleFeaturePyramid(nn.Module):
    """A backbone's single feature map → multi-scale maps → torchvision FPN (``out_channels`` attribute set, as
    torchvision's detectors require)."""

    def __init__(self, backbone: Backbone, out_channels: int = 128, scales: Sequence[float] = PYRAMID_SCALES,
                 train_backbone: bool = False) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.backbone = backbone
        self.train_backbone = train_backbone
        self.input_size = int(backbone.pixel_config()["size"])
        with torch.no_grad():
            device = next(backbone.parameters()).device
            was_training = backbone.training
            backbone.eval()
            probe = backbone.image_feature_map(torch.zeros(1, 3, self.input_size, self.input_size, device=device))
            backbone.train(was_training)
        channels, side = int(probe.shape[1]), int(probe.shape[-1])
        self.stride = self.input_size / side
        self.scales = tuple(float(s) for s in scales)
        stages, in_channels = [], []
        for s in self.scales:
            if s == 4.0:
                stages.append(nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, 2), nn.GroupNorm(1, channels // 2),
                                            nn.GELU(), nn.ConvTranspose2d(channels // 2, channels // 4, 2, 2)))
                in_channels.append(channels // 4)
            elif s == 2.0:
                stages.append(nn.ConvTranspose2d(channels, channels // 2, 2, 2))
                in_channels.append(channels // 2)
            elif s == 1.0:
                stages.append(nn.Identity())
                in_channels.append(channels)
            elif s == 0.5:
                stages.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                in_channels.append(channels)
            else:
                raise UserError(f"pyramid scales must be among 4, 2, 1, 0.5; got {s}")
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        if not train_backbone:
            backbone.requires_grad_(False)

    @property
    def strides(self) -> list[float]:
        """Stride of every output level (the FPN's extra max-pool level doubles the last one)."""
        base = [self.stride / s for s in self.scales]
        return [*base, base[-1] * 2]

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()  # a frozen tower stays deterministic (no dropout, fixed norm statistics)
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict:
        h, w = x.shape[-2:]
        if h > self.input_size or w > self.input_size:
            raise ValueError(f"batch of {h}×{w} is larger than the tower's {self.input_size}px input")
        x = F.pad(x, (0, self.input_size - w, 0, self.input_size - h))
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            fmap = self.backbone.image_feature_map(x)
        fmap = fmap.float()
        feats = OrderedDict((str(i), stage(fmap)) for i, stage in enumerate(self.stages))
        return self.fpn(feats)


@checked("module")
def build_detector(backbone: Backbone, num_classes: int, head: Literal[HEADS] = "detection", *, out_channels: int = 128,
                   train_backbone: bool = False, max_detections: int = 1000, score_threshold: float = 0.01,
                   anchor_scale: float = 4.0, rpn_proposals: int = 1000, representation_size: int = 1024,
                   roi_samples: int = 256) -> nn.Module:
    """torchvision Faster R-CNN (``detection``) or Mask R-CNN (``segmentation``) over ``backbone``'s features.

    ``num_classes`` counts foreground classes; anchors at each level are ``anchor_scale × stride`` pixels of the
    resized input, with aspect ratios 0.5, 1, 2.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    if num_classes < 1:
        raise UserError("a localization head needs at least one class")
    pyramid = SimpleFeaturePyramid(backbone, out_channels, train_backbone=train_backbone)
    px = backbone.pixel_config()
    sizes = tuple((max(4, int(round(anchor_scale * s))),) for s in pyramid.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    levels = [str(i) for i in range(len(pyramid.scales))]
    kwargs: dict[str, Any] = dict(
        num_classes=None, rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(out_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        min_size=pyramid.input_size, max_size=pyramid.input_size, image_mean=px["mean"], image_std=px["std"],
        size_divisible=max(1, int(pyramid.stride)), box_detections_per_img=int(max_detections),
        box_score_thresh=float(score_threshold), rpn_pre_nms_top_n_test=max(rpn_proposals, max_detections),
        rpn_post_nms_top_n_test=max(rpn_proposals, max_detections), rpn_pre_nms_top_n_train=rpn_proposals,
        rpn_post_nms_top_n_train=rpn_proposals, box_batch_size_per_image=roi_samples,
    )
    if head == "segmentation":
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        return MaskRCNN(pyramid, mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
                        mask_head=MaskRCNNHeads(out_channels, (out_channels,) * 4, 1),
                        mask_predictor=MaskRCNNPredictor(out_channels, out_channels, num_classes + 1), **kwargs)
    return FasterRCNN(pyramid, **kwargs)


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` (fraction) overlap."""
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@torch.no_grad()
def predict_tiled(detector: nn.Module, image: torch.Tensor, tile: int, overlap: float = 0.25, nms_iou: float = 0.5,
                  max_detections: int = 1000, batch_size: int = 8) -> dict:
    """Sliding-window detection of one large image: overlapping tiles at full resolution, boxes shifted back to
    image pixels, duplicates across tiles removed by per-class NMS, the best ``max_detections`` kept; masks of the
    kept detections are pasted into the full image one at a time and returned as COCO RLEs."""
    from torchvision.ops import batched_nms

    from microbench.metrics.localization import encode_masks

    h, w = image.shape[-2:]
    origins = [(x, y) for y in tile_origins(h, tile, overlap) for x in tile_origins(w, tile, overlap)]
    outs = []
    for i in range(0, len(origins), batch_size):
        crops = [image[:, y:y + tile, x:x + tile] for x, y in origins[i:i + batch_size]]
        outs += detector(crops)
    shift = torch.tensor([[x, y, x, y] for (x, y), o in zip(origins, outs, strict=True) for _ in range(len(o["boxes"]))],
                         dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([o["boxes"].float().cpu() for o in outs]) + shift
    scores = torch.cat([o["scores"].float().cpu() for o in outs])
    labels = torch.cat([o["labels"].cpu() for o in outs])
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]  # sorted by score
    rec = {"boxes": boxes[keep].numpy(), "scores": scores[keep].numpy(), "labels": labels[keep].numpy()}
    if outs and "masks" in outs[0]:
        where = [(t, j) for t, o in enumerate(outs) for j in range(len(o["boxes"]))]
        rles = []
        for k in keep.tolist():
            t, j = where[k]
            x, y = origins[t]
            m = outs[t]["masks"][j, 0].float().cpu()
            full = torch.zeros(h, w)
            full[y:y + m.shape[0], x:x + m.shape[1]] = m
            rles += encode_masks(full[None].numpy())
        rec["masks"] = rles
    return rec


class LocalizationModule(L.LightningModule):
    """Train / evaluate a detection or segmentation head on a :class:`LocalizationDataModule`.

    Args:
        backbone: any adapter with spatial features (open_clip, timm, transformers CLIP-family).
        class_names: the datamodule's class names (label ids 1..K).
        head: ``detection`` (boxes) or ``segmentation`` (instance masks + boxes).
        freeze_backbone: train only the pyramid and the head (default); otherwise the tower is fine-tuned with
            ``lr × backbone_lr_mult``.
        max_detections: detections kept per image (COCO's limit is 100; dense microscopy needs more).
        score_threshold: detections below this score are dropped before any metric.
        grit_score_threshold: detections scored by GRIT (which penalises every extra box) must reach this score.
        tile_size: evaluate images larger than this many pixels as overlapping tiles (``tile_overlap``) at full
            resolution, merging with per-class NMS at ``tile_nms_iou`` (dense fields much larger than the input).
        on_scored: ``f(result, module)`` called on global rank 0 after the test epoch, with the metrics and
            per-image predictions (used to write the run record).
    """

    @checked("module")
    def __init__(self, backbone: Backbone, class_names: Sequence[str], head: Literal[HEADS] = "detection",
                 freeze_backbone: bool = True, out_channels: int = 128, lr: float = 1e-3, weight_decay: float = 1e-4,
                 backbone_lr_mult: float = 0.1, warmup_frac: float = 0.1, max_detections: int = 1000,
                 score_threshold: float = 0.01, grit_score_threshold: float = 0.5, anchor_scale: float = 4.0,
                 rpn_proposals: int = 1000, representation_size: int = 1024, roi_samples: int = 256,
                 tile_size: int | None = None, tile_overlap: float = 0.25, tile_nms_iou: float = 0.5,
                 record: dict | None = None, on_scored: Callable | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "on_scored"])
        self.class_names = list(class_names)
        self.detector = build_detector(backbone, len(self.class_names), head, out_channels=out_channels,
                                       train_backbone=not freeze_backbone, max_detections=max_detections,
                                       score_threshold=score_threshold, anchor_scale=anchor_scale,
                                       rpn_proposals=rpn_proposals, representation_size=representation_size,
                                       roi_samples=roi_samples)
        self.on_scored = on_scored
        self.last_predictions: dict | None = None
        self._outputs: dict[str, list] = {"val": [], "test": []}
        self._failed: list[str] = []
        self.last_scores: dict[str, dict] = {}
        self.timings: dict[str, float] = {}

    @property
    def backbone(self) -> Backbone:
        return self.detector.backbone.backbone

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of everything but the backbone (pyramid, RPN, box/mask heads)."""
        return {k: v for k, v in self.detector.state_dict().items() if not k.startswith("backbone.backbone.")}

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        return self.detector(images, targets)

    # --- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if not batch["images"]:
            return None
        targets = [{k: v for k, v in t.items() if k != "index"} for t in batch["targets"]]
        losses = self.detector(batch["images"], targets)
        loss = sum(losses.values())
        bs = len(batch["images"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        tower = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in tower]
        groups = [{"params": head, "lr": hp.lr}]
        tower_params = [p for p in self.backbone.parameters() if p.requires_grad]
        if tower_params:
            groups.append({"params": tower_params, "lr": hp.lr * hp.backbone_lr_mult})
        opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_frac * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(1, warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                   "interval": "step"}}

    # --- evaluation -----------------------------------------------------------------------------------------------
    def predict_images(self, images: list[torch.Tensor]) -> list[dict]:
        """Detections of whole images, tiled when ``tile_size`` is set and an image is larger than a tile: boxes
        (xyxy, original pixels), scores, labels and, for segmentation, masks as COCO RLEs."""
        from microbench.metrics.localization import encode_masks

        hp = self.hparams
        whole = [i for i, im in enumerate(images) if not hp.tile_size or max(im.shape[-2:]) <= hp.tile_size]
        out: list[dict | None] = [None] * len(images)
        if whole:
            for i, o in zip(whole, self.detector([images[i] for i in whole]), strict=True):
                out[i] = {"boxes": o["boxes"].float().cpu().numpy(), "scores": o["scores"].float().cpu().numpy(),
                          "labels": o["labels"].cpu().numpy()}
                if "masks" in o:
                    out[i]["masks"] = encode_masks(o["masks"][:, 0].float().cpu().numpy())
        for i in (i for i in range(len(images)) if out[i] is None):
            out[i] = predict_tiled(self.detector, images[i], int(hp.tile_size), float(hp.tile_overlap),
                                   float(hp.tile_nms_iou), int(hp.max_detections))
        return out

    def _predict(self, batch: dict, stage: str) -> None:
        self._failed += list(batch.get("errors", []))  # images that failed to decode: counted, not scored
        if not batch["images"]:
            return
        for t, rec in zip(batch["targets"], self.predict_images(batch["images"]), strict=True):
            self._outputs[stage].append({"index": int(t["index"]), **rec})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with self._boxes_only():  # validation selects by box AP and GRIT: no masks to predict, encode or score
            self._predict(batch, "val")

    @contextlib.contextmanager
    def _boxes_only(self):
        heads = self.detector.roi_heads
        saved = getattr(heads, "mask_roi_pool", None)
        if saved is None:
            yield
            return
        heads.mask_roi_pool = None  # torchvision's RoIHeads.has_mask() is then False: the mask branch is skipped
        try:
            yield
        finally:
            heads.mask_roi_pool = saved

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._predict(batch, "test")

    def on_test_epoch_start(self) -> None:
        self._outputs["test"], self._failed = [], []
        self._t_test = time.perf_counter()

    def on_validation_epoch_start(self) -> None:
        self._outputs["val"], self._failed = [], []

    def _score(self, stage: str, split: str) -> dict | None:
        gathered = distributed.gather_objects((self._outputs[stage], self._failed))
        self._outputs[stage] = []
        if not self.trainer.is_global_zero:
            return None
        preds = {r["index"]: r for part, _ in gathered for r in part}
        self.last_predictions = preds  # of the last scored split (COCO detections file)
        result = self.score_predictions(preds, self.trainer.datamodule.images(split),
                                        boxes_only=stage == "val")
        result["failed_images"] = [e for _, errs in gathered for e in errs]
        return result

    def score_predictions(self, preds: dict[int, dict], images: Sequence, boxes_only: bool = False) -> dict:
        """COCO (bbox, and segm for segmentation heads unless ``boxes_only``) + GRIT of per-image predictions keyed
        by image position."""
        from microbench.metrics.localization import score_localization

        hp = self.hparams
        return score_localization(images, self.class_names, preds, iou_types=(
            ("bbox", "segm") if hp.head == "segmentation" and not boxes_only else ("bbox",)),
            max_dets=hp.max_detections,
            grit_score_threshold=hp.grit_score_threshold)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._outputs["val"] = []
            return
        result = self._score("val", "val")
        values = torch.zeros(3)
        if result is not None:
            m = result["metrics"]
            values = torch.tensor([m["bbox/AP"], m["bbox/AP50"], m["grit/macro"]])
            self.last_scores["val"] = m
        values = self.trainer.strategy.broadcast(values, src=0)
        for name, v in zip(("val/bbox_AP", "val/bbox_AP50", "val/grit"), values.tolist(), strict=True):
            self.log(name, v, prog_bar=name != "val/bbox_AP50", sync_dist=False, rank_zero_only=False)

    def on_test_epoch_end(self) -> None:
        split = self.trainer.datamodule.split
        result = self._score("test", split)
        if result is None:
            return
        self.timings["test_epoch"] = round(time.perf_counter() - self._t_test, 3)
        self.last_scores["test"] = result["metrics"]
        for k in ("bbox/AP", "bbox/AP50", "grit/macro", "segm/AP"):
            if k in result["metrics"]:
                self.log(f"test/{k}", result["metrics"][k], rank_zero_only=True)
        if self.on_scored is not None:
            self.on_scored(result, self)


def detector_from_checkpoint(path: str | dict, backbone: Backbone | None = None, map_location: str = "cpu",
                             build_backbone: Callable[[dict], Backbone] | None = None):
    """Rebuild a :class:`LocalizationModule` from a checkpoint written by ``src/train.py task=localization`` (a
    path, or the checkpoint already loaded). The backbone is ``backbone``, or ``build_backbone(model_config)`` of
    the model config the checkpoint records (the task layer passes its model builder)."""
    from microbench.checkpoints import checkpoint_kind, read_checkpoint

    hint = "pass checkpoint=<a .ckpt of python src/train.py task=localization (e.g. experiment=detect_nuclei)>"
    ckpt = path if isinstance(path, dict) else read_checkpoint(path, "checkpoint", hint)
    path = "the checkpoint" if isinstance(path, dict) else path
    if not isinstance(ckpt, dict):
        raise BackboneError(f"{path} is not a Lightning checkpoint ({type(ckpt).__name__}): {hint}")
    if checkpoint_kind(ckpt) == "finetune":
        raise BackboneError(f"{path} is a fine-tuning checkpoint, not a localization head: evaluate it with "
                            "python src/eval.py model=... or study it with src/forgetting.py; " + hint)
    hp = ckpt.get("hyper_parameters") or {}
    if "class_names" not in hp:
        raise BackboneError(f"{path} is not a localization checkpoint (no class_names in its hyperparameters)")
    if backbone is None:
        model_cfg = (hp.get("record") or {}).get("model_config")
        if not model_cfg:
            raise BackboneError(f"{path} does not record how to build its backbone; pass model=<preset>")
        if build_backbone is None:
            raise BackboneError(f"{path}: pass the backbone or a builder for its recorded model config")
        backbone = build_backbone(model_cfg)
    module = LocalizationModule(backbone, **{k: v for k, v in hp.items() if k not in ("on_scored",)})
    if not isinstance(ckpt.get("state_dict"), dict):
        raise BackboneError(f"{path} has no state_dict: {hint}")
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise BackboneError(f"{path} does not fit the rebuilt model: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}")
    return module, ckpt

