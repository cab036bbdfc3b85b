"""Forgetting study of a fine-tuned checkpoint against its base model, with WiSE-FT weight interpolation.

    python src/forgetting.py base=tiny finetuned=checkpoints/demo/<run>/last.ckpt
    python src/forgetting.py base=openclip_openai finetuned=<ckpt> data.path=data/ubench trainer=gpu \\
        'alphas=[0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1]' paths.output_dir=out/forgetting
"""

from __future__ import annotations

from microbench.jobs import run_job

if __name__ == "__main__":
    run_job("forgetting")
