"""The μ-Bench paper's Table 1 (Lozano, Nirschl et al., "μ-Bench: A Vision-Language Benchmark for Microscopy
Understanding", NeurIPS 2024 Datasets & Benchmarks, arXiv:2407.01791, Table 1 "Macro-average accuracy (with
bootstrap confidence interval)"), entered from the table as transcribed in shared/reference/ubench-format.md §8 and
checked against the issue's list: accuracy in % and the official ± half-width, coarse- and fine-grained perception
and cognition. ``MODEL_NAMES`` maps the names our runs record (the presets of ``configs/model``) to the paper's."""

from __future__ import annotations

#: paper model → {column: (accuracy %, ± half-width %)}
TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "GPT-4o": {"coarse": (62.68, 0.35), "fine": (51.73, 0.82), "cognition": (62.00, 9.00)},
    "CogVLM": {"coarse": (52.05, 0.35), "fine": (28.18, 0.70), "cognition": (41.00, 10.00)},
    "QwenVLM": {"coarse": (49.85, 0.35), "fine": (27.81, 0.70), "cognition": (41.00, 10.00)},
    "BiomedCLIP": {"coarse": (47.57, 0.34), "fine": (34.65, 0.75), "cognition": (25.00, 8.00)},
    "ALIGN": {"coarse": (40.7, 0.34), "fine": (31.9, 0.72), "cognition": (31.00, 9.00)},
    "OpenCLIP": {"coarse": (36.34, 0.33), "fine": (29.36, 0.69), "cognition": (38.33, 8.33)},
    "PaliGemma": {"coarse": (36.29, 0.33), "fine": (21.29, 0.64), "cognition": (25.00, 8.00)},
    "CLIP": {"coarse": (35.41, 0.34), "fine": (30.09, 0.71), "cognition": (28.00, 9.00)},
    "PLIP": {"coarse": (31.11, 0.32), "fine": (25.49, 0.68), "cognition": (17.00, 7.00)},
    "CONCH": {"coarse": (27.84, 0.31), "fine": (33.64, 0.72), "cognition": (18.00, 7.00)},
    "QuiltNet": {"coarse": (26.58, 0.31), "fine": (27.85, 0.69), "cognition": (13.00, 6.00)},
    "Random": {"coarse": (18.34, 0.27), "fine": (19.13, 0.60), "cognition": (17.00, 7.00)},
}
SOURCE = ("Lozano, Nirschl et al., μ-Bench, NeurIPS 2024 Datasets & Benchmarks (arXiv:2407.01791), Table 1 "
          "(accuracy % ± official bootstrap half-width)")

#: the model names our runs record → the paper's name (OpenCLIP: ViT-B-32 on laion2b_s34b_b79k, see below)
MODEL_NAMES = {
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": "BiomedCLIP",
    "kakaobrain/align-base": "ALIGN",
    "openai/clip-vit-base-patch32": "CLIP",
    "vinid/plip": "PLIP",
    "hf-hub:wisdomik/QuiltNet-B-32": "QuiltNet",
    "conch_ViT-B-16": "CONCH",
    "random": "Random",
    "gpt-4o": "GPT-4o",
    "THUDM/cogvlm-chat-hf": "CogVLM",
    "Qwen/Qwen-VL-Chat": "QwenVLM",
    "google/paligemma-3b-mix-224": "PaliGemma",
}


def paper_name(model: dict) -> str | None:
    """The Table-1 name of a recorded model, or None. open_clip ``ViT-B-32`` is Table 1's OpenCLIP only with the
    ``laion2b_s34b_b79k`` weights (the authors' July-2024 code; ``openai`` weights are a different model)."""
    name = str(model.get("name") or "")
    if model.get("blind"):  # a generative model without the image is not the paper's model
        return None
    if name == "ViT-B-32":
        return "OpenCLIP" if model.get("pretrained") == "laion2b_s34b_b79k" else None
    return MODEL_NAMES.get(name) or MODEL_NAMES.get(str(model.get("model") or ""))
