"""Forgetting study of a fine-tuned checkpoint against its base model, with WiSE-FT weight interpolation.

    python src/forgetting.py base=tiny finetuned=checkpoints/demo/<run>/last.ckpt
    python src/forgetting.py base=openclip_openai finetuned=<ckpt> data.path=data/ubench trainer=gpu \\
        'alphas=[0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1]' paths.output_dir=out/forgetting
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from microbench.entry import set_project_root, setup_console

set_project_root(__file__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="forgetting.yaml")
def main(cfg: DictConfig) -> None:
    setup_console()
    from microbench.errors import exit_on_user_error
    from microbench.studies.run import forgetting

    with exit_on_user_error():
        study, _ = forgetting(cfg)
    out = Path(cfg.paths.output_dir).resolve()
    chosen = study["chosen_test"]
    ft = study["splits"]["test"]["models"]["finetuned"]
    print(f"fine-tuned: target fine {100 * ft['target/fine']['acc']['value']:.2f}, supported "
          f"{100 * ft['supported/all']['acc']['value']:.2f} | chosen α={study['selection']['alpha']:.2f}: target fine "
          f"{100 * chosen['target/fine']['acc']['value']:.2f}, supported {100 * chosen['supported/all']['acc']['value']:.2f}")
    print(f"report: {out}/forgetting.md (plots: alpha_sweep.png, dataset_deltas.png)")


if __name__ == "__main__":
    main()
