"""Forgetting study of a fine-tuned checkpoint against its base model, with WiSE-FT weight interpolation.

    python src/forgetting.py base=tiny finetuned=checkpoints/demo/<run>/last.ckpt
    python src/forgetting.py base=openclip_openai finetuned=<ckpt> data.path=data/ubench trainer=gpu \\
        'alphas=[0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1]' paths.output_dir=out/forgetting
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from microbench.entry import set_project_root, setup_console

set_project_root(__file__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="forgetting.yaml")
def main(cfg: DictConfig) -> None:
    setup_console()
    from microbench.errors import exit_on_user_error
    from microbench.results.report import summary
    from microbench.tasks.registry import forgetting

    with exit_on_user_error():
        record, _ = forgetting(cfg)
    print("\n".join(summary(record)))


if __name__ == "__main__":
    main()
