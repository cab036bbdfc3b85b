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

from microbench.jobs import run_job

if __name__ == "__main__":
    run_job("eval")
