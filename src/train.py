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

import hydra
from omegaconf import DictConfig

from microbench.entry import set_project_root, setup_console

set_project_root(__file__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    setup_console()
    from microbench.errors import exit_on_user_error
    from microbench.results.report import summary
    from microbench.tasks.registry import train

    with exit_on_user_error():
        record, _ = train(cfg)
    print("\n".join(summary(record)))


if __name__ == "__main__":
    main()
