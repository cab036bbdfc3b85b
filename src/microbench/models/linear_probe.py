"""Linear probes on frozen image features: full data and k-shot, weight decay chosen on val only, several seeds.

The sweep path fits a multinomial logistic regression on L2-normalised features with full-batch L-BFGS (the
CLIP-benchmark recipe) run to convergence (:func:`fit_logistic`: float64 for small problems, stopping on the
gradient, warm-started along the weight-decay path from the strongest decay down; pinned to scipy's L-BFGS-B on
the same objective in ``tests/test_train.py``). :class:`LinearProbeModule` is the same
head as a LightningModule that runs either on a frozen backbone or directly on cached embeddings, for datasets
that do not fit in memory or for GPU training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from microbench.models.backbones.base import Backbone

WEIGHT_DECAYS = tuple(float(x) for x in np.logspace(-6, -1, 11))
SHOTS = ("full", 1, 2, 4, 8, 16)


def probe_metrics(logits: torch.Tensor, y: torch.Tensor, n_classes: int) -> dict[str, float]:
    preds = logits.argmax(1)
    return {
        "acc": float(multiclass_accuracy(preds, y, n_classes, average="micro")),
        "balanced_acc": float(multiclass_accuracy(preds, y, n_classes, average="macro")),
        "macro_f1": float(multiclass_f1_score(preds, y, n_classes, average="macro")),
    }


#: below this many feature values (train rows × dim) a fit runs on one thread: L-BFGS on a small problem is a long
#: chain of tiny matrix products, where spreading each over the cores costs more than it gains (measured on a 2-core
#: machine under load: one sweep 23.2 s with every thread vs 3.75 s with one; benchmarks/bench_train.py)
SMALL_FIT = 4_000_000


@contextlib.contextmanager
def threads_for(n_values: int):
    """``torch`` intra-op threads for a fit of ``n_values`` feature values: 1 for small fits, unchanged otherwise."""
    before = torch.get_num_threads()
    if n_values < SMALL_FIT and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


#: the probe's stopping rule: L-BFGS runs until the largest gradient entry is below ``PROBE_TOLERANCE`` (or the
#: objective stops changing), up to ``PROBE_MAX_ITER`` iterations; small problems are solved in float64
PROBE_TOLERANCE = 1e-7
PROBE_MAX_ITER = 2000


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float,
                 init: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                 max_iter: int = PROBE_MAX_ITER, tolerance: float = PROBE_TOLERANCE) -> nn.Linear:
    """Multinomial logistic regression, L2 penalty ``weight_decay/2·‖W‖²`` (bias unpenalised), full-batch L-BFGS
    run to convergence: repeated L-BFGS steps until the largest gradient entry is ≤ ``tolerance`` or the objective
    no longer changes, at most ``max_iter`` iterations (the head records ``converged`` and ``iterations``). Problems
    below :data:`SMALL_FIT` feature values are solved in float64. ``init``: the weight, or (weight, bias) of a warm
    start (e.g. the previous fit along a weight-decay path)."""
    dtype = torch.float64 if x.numel() < SMALL_FIT else torch.float32
    xs = x.to(dtype)
    w = torch.zeros(n_classes, x.shape[1], dtype=dtype)
    b = torch.zeros(n_classes, dtype=dtype)
    if init is not None:
        w0, b0 = init if isinstance(init, tuple) else (init, None)
        w = w0.detach().to(dtype).clone()
        b = b0.detach().to(dtype).clone() if b0 is not None else b
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=min(100, max_iter), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=tolerance, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    converged, previous = False, None
    while True:
        opt.step(closure)
        iterations = int(opt.state[w]["n_iter"]) if w in opt.state else 0
        loss = float(closure().detach())
        grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
        if grad <= tolerance or (previous is not None and abs(previous - loss) <= 1e-15 * max(1.0, abs(loss))):
            converged = grad <= tolerance or previous is not None
            break
        if iterations >= max_iter:
            break
        previous = loss
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(w.detach().to(head.weight.dtype))
        head.bias.copy_(b.detach().to(head.bias.dtype))
    head.converged, head.iterations, head.gradient = bool(converged), iterations, grad
    return head


def kshot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k examples per class (all if fewer), drawn with ``seed`` from the given (train) labels."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


@dataclass
class ProbeData:
    x_train: torch.Tensor
    y_train: np.ndarray
    x_val: torch.Tensor
    y_val: np.ndarray
    x_test: torch.Tensor
    y_test: np.ndarray
    n_classes: int
    zs_weights: torch.Tensor | None = None  # [C, D] class-prompt text embeddings, for the zero-shot init


def sweep(data: ProbeData, shots="full", seeds=(0, 1, 2), weight_decays=WEIGHT_DECAYS, zs_init: bool = False,
          zs_scale: float = 100.0) -> dict:
    """Probe one dataset: per seed, (k-shot) train subset → weight decay chosen on val → test metrics.

    Returns ``{metric: {mean, stdev, values}}`` plus the chosen weight decays (eva's recorder format).
    """
    with threads_for(int(data.x_train.numel())):
        return _sweep(data, shots, seeds, weight_decays, zs_init, zs_scale)


def _sweep(data: ProbeData, shots, seeds, weight_decays, zs_init: bool, zs_scale: float) -> dict:
    per_seed: dict[str, list[float]] = {"acc": [], "balanced_acc": [], "macro_f1": []}
    chosen = []
    y_val = torch.as_tensor(np.asarray(data.y_val), dtype=torch.long)
    y_test = torch.as_tensor(np.asarray(data.y_test), dtype=torch.long)
    init = data.zs_weights * zs_scale if (zs_init and data.zs_weights is not None) else None
    for seed in seeds:
        idx = np.arange(len(data.y_train)) if shots == "full" else kshot_indices(data.y_train, int(shots), seed)
        x, y = data.x_train[idx], torch.as_tensor(np.asarray(data.y_train)[idx], dtype=torch.long)
        heads, start = {}, init
        for wd in sorted(weight_decays, reverse=True):  # along the path: each fit warm-starts from the last one
            heads[wd] = fit_logistic(x, y, data.n_classes, wd, start)
            start = (heads[wd].weight.detach(), heads[wd].bias.detach())
        best = None
        for wd in weight_decays:  # chosen on val in the given order (the first of equal accuracies)
            head = heads[wd]
            with torch.no_grad():
                val = probe_metrics(head(data.x_val), y_val, data.n_classes)["acc"] if len(y_val) else 0.0
            if best is None or val > best[0] + 1e-12:
                best = (val, wd, head)
        with torch.no_grad():
            test = probe_metrics(best[2](data.x_test), y_test, data.n_classes)
        chosen.append(best[1])
        for k in per_seed:
            per_seed[k].append(test[k])
    out = {k: {"mean": float(np.mean(v)), "stdev": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
           for k, v in per_seed.items()}
    out["weight_decay"] = chosen
    out["n_train"] = int(len(data.y_train) if shots == "full" else len(kshot_indices(data.y_train, int(shots), 0)))
    out["n_val"], out["n_test"] = int(len(data.y_val)), int(len(data.y_test))
    return out


class LinearProbeModule(L.LightningModule):
    """A linear head on a frozen backbone (``batch['pixel_values']``) or on cached features (``batch['features']``)."""

    def __init__(self, dim: int, n_classes: int, backbone: Backbone | None = None, lr: float = 1e-3,
                 weight_decay: float = 1e-4, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "init"])
        self.backbone = backbone
        if backbone is not None:
            backbone.requires_grad_(False)
        self.head = nn.Linear(dim, n_classes)
        if init is not None:
            with torch.no_grad():
                self.head.weight.copy_(init)
                self.head.bias.zero_()

    def features(self, batch: dict) -> torch.Tensor:
        if "features" in batch:
            return F.normalize(batch["features"].float(), dim=-1)
        with torch.no_grad():
            self.backbone.eval()
            return F.normalize(self.backbone.encode_image(batch["pixel_values"]).float(), dim=-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.head(self.features(batch)), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.head(self.features(batch))
        self.log("val/acc", (logits.argmax(1) == batch["label"]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
