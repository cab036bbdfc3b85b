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

from microbench.jobs import run_job

if __name__ == "__main__":
    run_job("train")
