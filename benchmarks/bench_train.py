"""Training benchmarks (figures for the README and closing notes; never timed in unit tests).

1. Fine-tuning steps/s of the real ``ViT-B-32`` architecture (random init) at batch 32 on this CPU: Lightning
   (``FineTuneModule`` + ``Trainer``, CE objective, AdamW + cosine, grad clipping) against a plain PyTorch loop doing
   the same steps on the same batches (same model, loss, optimizer, clipping). Target: Lightning overhead <= 10 %.
2. A full weight-decay sweep (11 values x 3 seeds, full data) of a linear probe on cached features of one dataset,
   with small fits on one thread (the default) and on every thread; ``--busy N`` runs N busy processes beside it
   (thread oversubscription on a loaded machine is what made the probe experiment take 15 minutes).

Usage: .venv/bin/python benchmarks/bench_train.py [--steps 12] [--model ViT-B-32] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from microbench.data.labelled import LabelledDataModule  # noqa: E402
from microbench.models.backbones import build_backbone  # noqa: E402
from microbench.models.finetune import FineTuneModule  # noqa: E402
from microbench.models.linear_probe import ProbeData, sweep  # noqa: E402
from microbench.results.io import write_json  # noqa: E402


class _Timer(L.Callback):
    def __init__(self, skip: int):
        self.skip, self.times = skip, []

    def on_train_batch_start(self, trainer, module, batch, idx):
        if idx == self.skip:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        self.times.append(time.perf_counter())


def lightning_steps(model_name: str, batch: dict, steps: int, warmup: int) -> float:
    bb = build_backbone("open_clip", model_name, pretrained=None)
    dm = LabelledDataModule("sample", transform=bb.preprocess, batch_size=len(batch["label"]))
    module = FineTuneModule(bb, objective="ce", lr=1e-5)
    timer = _Timer(warmup)
    # the same pre-decoded batch: measure the training step, not decoding (a DataLoader: Lightning reads a plain
    # list as a list of dataloaders)
    loader = torch.utils.data.DataLoader([batch] * (steps + warmup), batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps + warmup, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[timer], limit_val_batches=0, num_sanity_val_steps=0)
    dm.setup("fit")
    dm.train_dataloader = lambda: loader
    dm.val_dataloader = lambda: []
    trainer.fit(module, datamodule=dm)
    return steps / (timer.times[-1] - timer.t0)


def plain_steps(model_name: str, batch: dict, steps: int, warmup: int) -> float:
    """The same step as FineTuneModule's CE objective, written as a bare loop."""
    bb = build_backbone("open_clip", model_name, pretrained=None)
    dm = LabelledDataModule("sample", transform=bb.preprocess, batch_size=len(batch["label"]))
    dm.setup("fit")
    from microbench.models.finetune import class_text_embeddings

    space = dm.class_space
    zs = class_text_embeddings(bb, space.prompts)
    head = torch.nn.Linear(zs.shape[1], space.num_classes)
    with torch.no_grad():
        head.weight.copy_(zs * float(bb.logit_scale))
        head.bias.zero_()
    bb.freeze_text_tower()
    mask = space.mask()
    params = [p for p in bb.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    bb.train()
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        feats = F.normalize(bb.encode_image(batch["pixel_values"]).float(), dim=-1)
        logits = head(feats).masked_fill(~mask[batch["dataset_idx"]], float("-inf"))
        loss = F.cross_entropy(logits, batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return steps / (time.perf_counter() - t0)


def probe_sweep_seconds() -> dict:
    """Cached features of the sample's largest dataset through the tiny model, then the full sweep."""
    from microbench.data.datamodule import PerceptionDataModule
    from microbench.models.features import compute_image_features

    bb = build_backbone("open_clip", "microbench-tiny", pretrained=None)
    dm = PerceptionDataModule("sample", transform=bb.preprocess, datasets=["acevedo_et_al_2020"])
    dm.setup()
    feats, _ = compute_image_features(bb, dm, progress=False)
    rows = dm.rows
    labels = rows["label_name"].astype("category").cat.codes.to_numpy()
    img = {r: i for i, rs in enumerate(dm.images("all").rows) for r in rs}
    x = feats[[img[r] for r in rows["row_idx"]]]
    parts = {s: np.flatnonzero(rows["split"].to_numpy() == s) for s in ("train", "val", "test")}
    data = ProbeData(x[parts["train"]], labels[parts["train"]], x[parts["val"]], labels[parts["val"]],
                     x[parts["test"]], labels[parts["test"]], int(labels.max()) + 1)
    import microbench.models.linear_probe as lp

    # a larger synthetic dataset with the real feature width, for scale
    g = torch.Generator().manual_seed(0)
    n, d, c = 2000, 512, 8
    centers = torch.randn(c, d, generator=g)
    y = torch.arange(n) % c
    xs = F.normalize(centers[y] + 2 * torch.randn(n, d, generator=g), dim=-1)
    big = ProbeData(xs[:1400], y[:1400].numpy(), xs[1400:1600], y[1400:1600].numpy(), xs[1600:], y[1600:].numpy(), c)
    out = {"sample_dataset": "acevedo_et_al_2020", "sweep_values": 11, "seeds": 3, "synthetic_n_train": 1400,
           "synthetic_dim": d, "torch_threads": torch.get_num_threads()}
    small_fit, newton = lp.SMALL_FIT, lp.NEWTON_MAX_PARAMS
    for label, limit, newton_max in (("one_thread_small_fits", small_fit, newton), ("all_threads", 0, newton),
                                     ("lbfgs_only", small_fit, 0)):  # the fixes, and without each
        lp.SMALL_FIT, lp.NEWTON_MAX_PARAMS = limit, newton_max
        t0 = time.perf_counter()
        r = sweep(data, shots="full", seeds=(0, 1, 2))
        t1 = time.perf_counter()
        rb = sweep(big, shots="full", seeds=(0, 1, 2))
        out[label] = {"n_train": r["n_train"], "sweep_s": round(t1 - t0, 3),
                      "synthetic_sweep_s": round(time.perf_counter() - t1, 3), "acc": r["acc"]["mean"],
                      "synthetic_acc": rb["acc"]["mean"]}
    lp.SMALL_FIT, lp.NEWTON_MAX_PARAMS = small_fit, newton
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes beside the probe sweep (a loaded machine)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    args = ap.parse_args()
    res: dict = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "model": args.model,
                 "batch_size": args.batch_size}
    hogs = [__import__("subprocess").Popen([__import__("sys").executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        res["probe"] = probe_sweep_seconds() if not args.skip_probe else None
    finally:
        for h in hogs:
            h.kill()
    if res["probe"] is not None:
        res["probe"]["busy_processes"] = args.busy
    print("probe:", res["probe"], flush=True)
    bb = build_backbone("open_clip", args.model, pretrained=None)
    dm = LabelledDataModule("sample", transform=bb.preprocess, batch_size=args.batch_size)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    del bb
    t = time.perf_counter()
    plain = plain_steps(args.model, batch, args.steps, args.warmup)
    print(f"plain loop: {plain:.4f} steps/s ({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    light = lightning_steps(args.model, batch, args.steps, args.warmup)
    print(f"lightning: {light:.4f} steps/s ({time.perf_counter() - t:.0f} s)", flush=True)
    res["finetune"] = {"plain_steps_per_s": round(plain, 4), "lightning_steps_per_s": round(light, 4),
                       "lightning_overhead_pct": round(100 * (plain / light - 1), 2), "steps": args.steps}
    print("finetune:", res["finetune"], flush=True)
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
