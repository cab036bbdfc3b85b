"""Zero-shot evaluation of a CLIP-style model on μ-Bench perception.

    python src/eval.py                                    # the embedded sample with the tiny model
    python src/eval.py model=openclip data.path=data/ubench paths.output_dir=out/openclip
    python src/eval.py model=openclip model.name=local-dir:/path/to/model
    python src/eval.py model=random                       # the official Random baseline
    python src/eval.py trainer=ddp                        # all GPUs of the node
    python src/eval.py task=cognition                     # the sample's expert multiple-choice questions
    python src/eval.py task=cognition model=openai_compatible model.base_url=http://localhost:8000/v1 \
        model.model=Qwen/Qwen2-VL-7B-Instruct            # any OpenAI-compatible server (vLLM, TGI, OpenAI)
    python src/eval.py model=gpt4o data.path=data/ubench  # generative perception with the official prompt
    python src/eval.py task=localization checkpoint=checkpoints/detect_nuclei/<time>/best_epoch012.ckpt
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from microbench.entry import set_project_root, setup_console

set_project_root(__file__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    setup_console()
    from microbench.errors import exit_on_user_error
    from microbench.results.report import summary
    from microbench.tasks.registry import evaluate

    with exit_on_user_error():
        record, _ = evaluate(cfg)
    print("\n".join(summary(record)))


if __name__ == "__main__":
    main()
