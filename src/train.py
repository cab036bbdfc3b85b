"""Fine-tuning and linear probes on μ-Bench source datasets.

    python src/train.py experiment=demo                                   # tiny model, sample, minutes on a CPU
    python src/train.py experiment=finetune_pathology model=tiny          # the pathology specialist, tiny model
    python src/train.py experiment=finetune_pathology trainer=gpu data.path=data/ubench   # real ViT-B-32
    python src/train.py experiment=linear_probe model=tiny                # probes on every source dataset
    python src/train.py experiment=detect_nuclei                          # nucleus detection head (COCO + GRIT)
    python src/train.py experiment=segment_cells                          # instance segmentation head
    python src/train.py experiment=demo ckpt_path=<...>/last.ckpt         # resume
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from microbench.entry import set_project_root, setup_console

set_project_root(__file__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    setup_console()
    from microbench.errors import exit_on_user_error
    from microbench.training import train

    with exit_on_user_error():
        metrics, _ = train(cfg)
    out = Path(cfg.paths.output_dir).resolve()
    if cfg.get("task", "finetune") == "finetune":
        test = metrics.get("test", {})
        print(f"test accuracy {test.get('test/acc', float('nan')):.4f}, balanced {test.get('test/balanced_acc', float('nan')):.4f}"
              f" | best checkpoint: {metrics.get('best_checkpoint')}")
        print(f"results: {out}/train_metrics.json, in-domain zero-shot: {out}/in_domain/results.md")
        if "forgetting" in metrics:
            f = metrics["forgetting"]
            print(f"forgetting report: {f['report']} (plots alpha_sweep.png, dataset_deltas.png; chosen α "
                  f"{f['chosen_alpha']:.2f})")
    elif cfg.get("task") == "localization":
        test = metrics.get("test", {})
        fmt = lambda v: f"{100 * v:.2f}" if v is not None else "n/a"  # noqa: E731
        print("test " + ", ".join(f"{k} {fmt(v)}" for k, v in test.items())
              + f" | best checkpoint: {metrics.get('best_checkpoint')}")
        print(f"results: {out}/results.md")
    else:
        print(f"results: {out}/linear_probe.md")


if __name__ == "__main__":
    main()
