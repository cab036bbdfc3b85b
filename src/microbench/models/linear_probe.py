"""Linear probes on frozen image features: full data and k-shot, weight decay chosen on val only, several seeds.

The sweep path fits a multinomial logistic regression on L2-normalised features with full-batch L-BFGS (the
CLIP-benchmark recipe) run to convergence (:func:`fit_logistic`: float64 for small problems, stopping on the
gradient, warm-started along the weight-decay path from the strongest decay down; pinned to scipy's L-BFGS-B on
the same objective in ``tests/test_train.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

WEIGHT_DECAYS = tuple(float(x) for x in np.logspace(-6, -1, 11))


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


#: a fit with at most this many parameters (classes × (dim + 1)) and ``n·P²`` below :data:`NEWTON_MAX_WORK` is
#: solved by Newton's method on the exact Hessian: a handful of steps where L-BFGS needs thousands at a small weight
#: decay (separable data, an ill-conditioned optimum), each L-BFGS step paying Python's overhead (measured on the
#: sample, 12 × 64 features: the 11-decay path 2.7 s with L-BFGS, benchmarks/bench_train.py for the figures)
NEWTON_MAX_PARAMS = 2048
NEWTON_MAX_WORK = 4e9
NEWTON_MAX_ITER = 200  # Newton steps (it needs a handful; L-BFGS keeps PROBE_MAX_ITER)


def _objective(xs, y, w, b, weight_decay):
    return F.cross_entropy(xs @ w.T + b, y) + 0.5 * weight_decay * w.pow(2).sum()


def _newton(xs: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, weight_decay: float,
            max_iter: int, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, int, float, bool]:
    """Damped Newton on mean cross entropy + wd/2·‖W‖² (bias free): the exact Hessian ``(1/n)·Σᵢ (diag pᵢ −
    pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + wd`` (x̃ = [x, 1]) built with two products, Armijo backtracking from the full step; stops when
    the largest gradient entry is ≤ ``tolerance`` or the objective no longer decreases."""
    n, d = xs.shape
    c = w.shape[0]
    xt = torch.cat([xs, torch.ones(n, 1, dtype=xs.dtype, device=xs.device)], 1)  # [n, d + 1]
    onehot = F.one_hot(y, c).to(xs.dtype)
    theta = torch.cat([w, b[:, None]], 1)  # [C, d + 1]: each class's weights and bias
    penalty = torch.full_like(theta, weight_decay)
    penalty[:, -1] = 0.0

    def loss_of(t):
        return float(F.cross_entropy(xt @ t.T, y)) + 0.5 * weight_decay * float(t[:, :-1].pow(2).sum())

    loss, it, grad, converged = loss_of(theta), 0, float("inf"), False
    eye = torch.eye(c * (d + 1), dtype=xs.dtype, device=xs.device)
    while it < max_iter:
        p = torch.softmax(xt @ theta.T, 1)
        g = (p - onehot).T @ xt / n + penalty * theta
        grad = float(g.abs().max())
        if grad <= tolerance:
            converged = True
            break
        z = (p[:, :, None] * xt[:, None, :]).reshape(n, -1)  # pᵢ ⊗ x̃ᵢ
        hess = -(z.T @ z)
        for k in range(c):  # + the block diagonal Σᵢ p_ik x̃ᵢx̃ᵢᵀ
            sl = slice(k * (d + 1), (k + 1) * (d + 1))
            hess[sl, sl] += (xt * p[:, k:k + 1]).T @ xt
        hess = hess / n + torch.diag(penalty.reshape(-1))
        # the biases' common shift changes nothing (a zero eigenvalue): a tiny ridge keeps the solve defined
        jitter = 1e-12 * float(hess.diagonal().abs().max())
        step = torch.linalg.solve(hess + jitter * eye, g.reshape(-1)).reshape(c, d + 1)
        slope = float((g * step).sum())
        t, new = 1.0, None
        while t > 1e-10:
            cand = theta - t * step
            new = loss_of(cand)
            if new <= loss - 1e-4 * t * slope:
                break
            t *= 0.5
        it += 1
        if new is None or new >= loss and t <= 1e-10:  # no decrease left: at the optimum to float precision
            converged = grad <= 1e3 * tolerance
            break
        theta, loss = cand, new
    return theta[:, :-1].contiguous(), theta[:, -1].contiguous(), it, grad, converged


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float,
                 init: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                 max_iter: int = PROBE_MAX_ITER, tolerance: float = PROBE_TOLERANCE, solver: str = "auto"
                 ) -> nn.Linear:
    """Multinomial logistic regression, L2 penalty ``weight_decay/2·‖W‖²`` (bias unpenalised), run to convergence:
    until the largest gradient entry is ≤ ``tolerance`` or the objective no longer changes, at most ``max_iter``
    iterations (the head records ``converged``, ``iterations`` and ``solver``). ``solver``: ``newton`` (exact
    Hessian; the ``auto`` choice for problems of at most :data:`NEWTON_MAX_PARAMS` parameters), ``lbfgs``
    (full-batch L-BFGS, strong-Wolfe line search: large problems). Newton, and L-BFGS on problems below
    :data:`SMALL_FIT` feature values, run in float64. ``init``: the weight, or (weight, bias) of a warm start
    (e.g. the previous fit along a weight-decay path)."""
    n_params = n_classes * (x.shape[1] + 1)
    if solver == "auto":
        solver = "newton" if n_params <= NEWTON_MAX_PARAMS and len(x) * n_params ** 2 <= NEWTON_MAX_WORK else "lbfgs"
    if solver not in ("newton", "lbfgs"):
        raise ValueError(f"solver must be 'auto', 'newton' or 'lbfgs', got {solver!r}")
    # Newton always in float64 (its stopping test needs the precision; its problems are small)
    dtype = torch.float64 if x.numel() < SMALL_FIT or solver == "newton" else torch.float32
    xs = x.detach().to(dtype)
    w = torch.zeros(n_classes, x.shape[1], dtype=dtype, device=x.device)
    b = torch.zeros(n_classes, dtype=dtype, device=x.device)
    if init is not None:
        w0, b0 = init if isinstance(init, tuple) else (init, None)
        w = w0.detach().to(dtype).clone()
        b = b0.detach().to(dtype).clone() if b0 is not None else b
    if solver == "newton":
        with torch.no_grad():
            w, b, iterations, grad, converged = _newton(xs, y, w, b, weight_decay, min(max_iter, NEWTON_MAX_ITER),
                                                        tolerance)
    else:
        w, b, iterations, grad, converged = _lbfgs(xs, y, w, b, weight_decay, max_iter, tolerance)
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(w.detach().to(head.weight.dtype))
        head.bias.copy_(b.detach().to(head.bias.dtype))
    head.converged, head.iterations, head.gradient, head.solver = bool(converged), iterations, grad, solver
    return head


def _lbfgs(xs, y, w, b, weight_decay, max_iter, tolerance):
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=min(100, max_iter), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=tolerance, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = _objective(xs, y, w, b, weight_decay)
        loss.backward()
        return loss

    converged, previous = False, None
    with torch.enable_grad():
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
    return w.detach(), b.detach(), iterations, grad, converged


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


def choose_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, x_val: torch.Tensor | None, y_val,
                weight_decays=WEIGHT_DECAYS, init: torch.Tensor | None = None) -> tuple[float, nn.Linear, dict]:
    """The probe of one train subset ``(x, y)``: fitted at every weight decay along the path (strongest first, each
    warm-started from the last), the one with the best val accuracy kept (the first of equal accuracies in the
    given order; the first decay without val rows); returns ``(weight decay, head, val accuracy by decay)``."""
    y_val = torch.as_tensor(np.asarray(y_val if y_val is not None else []), dtype=torch.long)
    heads, start = {}, init
    with threads_for(int(x.numel())):
        for wd in sorted(weight_decays, reverse=True):  # along the path: each fit warm-starts from the last one
            heads[wd] = fit_logistic(x, y, n_classes, wd, start)
            start = (heads[wd].weight.detach(), heads[wd].bias.detach())
    scores = {}
    for wd in weight_decays:
        with torch.no_grad():
            scores[wd] = probe_metrics(heads[wd](x_val), y_val, n_classes)["acc"] if len(y_val) else 0.0
    best = max(weight_decays, key=lambda w: (scores[w], -list(weight_decays).index(w)))
    return best, heads[best], scores


def full_data_probe(data: ProbeData, weight_decays=WEIGHT_DECAYS) -> dict:
    """The full-data probe of one dataset (weight decay chosen on val): its chosen weight decay, convergence and
    test predictions (``test_pred``, one class index per test row, for paired comparisons of models)."""
    y = torch.as_tensor(np.asarray(data.y_train), dtype=torch.long)
    wd, head, _ = choose_head(data.x_train, y, data.n_classes, data.x_val, data.y_val, weight_decays)
    with torch.no_grad():
        pred = head(data.x_test).argmax(1).numpy()
    return {"weight_decay": wd, "converged": head.converged, "iterations": head.iterations, "solver": head.solver,
            "test_pred": pred}


def _sweep(data: ProbeData, shots, seeds, weight_decays, zs_init: bool, zs_scale: float) -> dict:
    per_seed: dict[str, list[float]] = {"acc": [], "balanced_acc": [], "macro_f1": []}
    chosen = []
    y_test = torch.as_tensor(np.asarray(data.y_test), dtype=torch.long)
    init = data.zs_weights * zs_scale if (zs_init and data.zs_weights is not None) else None
    for seed in seeds:
        idx = np.arange(len(data.y_train)) if shots == "full" else kshot_indices(data.y_train, int(shots), seed)
        x, y = data.x_train[idx], torch.as_tensor(np.asarray(data.y_train)[idx], dtype=torch.long)
        wd, head, _ = choose_head(x, y, data.n_classes, data.x_val, data.y_val, weight_decays, init)
        with torch.no_grad():
            test = probe_metrics(head(data.x_test), y_test, data.n_classes)
        chosen.append(wd)
        for k in per_seed:
            per_seed[k].append(test[k])
    out = {k: {"mean": float(np.mean(v)), "stdev": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
           for k, v in per_seed.items()}
    out["weight_decay"] = chosen
    out["n_train"] = int(len(data.y_train) if shots == "full" else len(kshot_indices(data.y_train, int(shots), 0)))
    out["n_val"], out["n_test"] = int(len(data.y_val)), int(len(data.y_test))
    return out


def row_to_image_index(dm) -> np.ndarray:
    """``row_idx -> position in dm.images('all')`` (−1 for rows of no image), for indexing cached features."""
    images = dm.images("all")
    out = np.full(int(dm.rows["row_idx"].max()) + 1, -1, dtype=np.int64)
    for i, rows in enumerate(images.rows):
        out[rows] = i
    return out


def dataset_probe_data(dm, feats: torch.Tensor, name: str, row_to_image: np.ndarray,
                       valid: np.ndarray | None = None) -> tuple[ProbeData | None, dict]:
    """The probe problem of one source dataset of ``dm`` (split ``all``) on the image features ``feats``: its rows'
    classes (the dataset's class space) by split, rows of undecodable images (NaN features, or ``valid`` false:
    e.g. undecodable for another model compared on the same rows) left out. Returns ``(data, info)``; ``data`` is
    None with ``info["skipped"]`` saying why when a split is empty or the train split has a single class.
    ``info``: ``rows`` per split, ``test_images`` (the image of every test row, for clustered intervals),
    ``classes``."""
    from microbench.data.labelled import build_class_space

    rows = dm.rows[dm.rows["dataset"] == name]
    space, class_of_row, _ = build_class_space(rows, dm.question_table.frame)
    img = row_to_image[rows["row_idx"].to_numpy()]
    ok = ~torch.isnan(feats[img]).any(1).numpy()
    if valid is not None:
        ok &= valid[img]
    split = rows["split"].to_numpy()
    parts = {s: np.flatnonzero(ok & (split == s)) for s in ("train", "val", "test")}
    info = {"rows": {k: len(v) for k, v in parts.items()}, "classes": space.num_classes, "space": space,
            "test_images": rows["image_id"].astype(str).to_numpy()[parts["test"]]}
    if min(len(v) for v in parts.values()) == 0 or len(np.unique(class_of_row[parts["train"]])) < 2:
        return None, dict(info, skipped="empty split or single training class")
    data = ProbeData(*[t for s in ("train", "val", "test") for t in (feats[img[parts[s]]], class_of_row[parts[s]])],
                     n_classes=space.num_classes)
    return data, info
