"""The study of many specialists: base, every specialist and their merges, as one accuracy matrix.

    python src/train.py -m experiment=specialist specialty=pathology,fluorescence,electron
    python src/specialists.py runs=logs/specialists/multiruns/<time>
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from microbench.entry import set_project_root, setup_console

set_project_root(__file__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="specialists.yaml")
def main(cfg: DictConfig) -> None:
    setup_console()
    from microbench.errors import exit_on_user_error
    from microbench.results.report import summary
    from microbench.tasks.registry import specialists

    with exit_on_user_error():
        record, _ = specialists(cfg)
    print("\n".join(summary(record)))


if __name__ == "__main__":
    main()
