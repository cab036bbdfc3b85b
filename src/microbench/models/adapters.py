"""LoRA adapters on any backbone's towers, with peft (``module.adapter=lora``).

- :func:`lora_targets`: the modules to adapt: by default every ``nn.MultiheadAttention`` (peft's own MHA layer: the
  module, never its ``out_proj`` alone, which open_clip calls through ``F.linear(out_proj.weight, ...)`` so an adapter
  there would never train) and every ``nn.Linear`` of the image tower, and of the text tower with ``text=True``;
  ``target_modules`` (name suffixes) narrows them.
- :func:`add_lora`: injects the adapters in place (:class:`peft.tuners.lora.LoraModel`), freezes every other weight of
  the backbone and returns the adapter's spec (what a checkpoint records to rebuild it).
- :func:`merged_copy`: a copy of an adapted backbone with the adapters merged into its weights and removed (peft's
  ``merge_and_unload``): the base's structure and key names, for scoring, interpolation and export.
- :func:`adapter_state` / :func:`merged_state`: the adapter's tensors alone, and the full merged weights rebuilt from
  the base + a checkpoint's adapter (:func:`microbench.studies.forgetting.load_finetuned_state` uses it, so every
  command that takes a fine-tuned checkpoint takes a LoRA one).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from microbench.errors import UserError

#: the attribute (outside the module tree, so it adds no weights) holding the backbone's peft LoraModel
WRAPPER = "_microbench_lora"


def lora_targets(backbone, text: bool = False, target_modules: Sequence[str] | None = None) -> list[str]:
    """Full names (in ``backbone.model``) of the modules to adapt; one line when there are none."""
    model = backbone.model
    image = {id(m) for m in backbone.image_tower().modules()}
    inside_mha = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
                  for c in m.modules() if c is not m}
    wanted = [str(t) for t in (target_modules or [])]
    names = []
    for name, m in model.named_modules():
        if not name or not (isinstance(m, nn.Linear | nn.MultiheadAttention)
                            or (wanted and isinstance(m, nn.Conv2d))):  # a convolution only when named
            continue
        if id(m) in inside_mha and not wanted:  # by default the attention module, not its out_proj (see above)
            continue
        if id(m) not in image and not text:
            continue
        if wanted and not any(name == t or name.endswith("." + t) for t in wanted):
            continue
        names.append(name)
    if not names:
        where = "image and text towers" if text else "image tower"
        raise UserError(f"module.adapter=lora: no nn.Linear or nn.MultiheadAttention to adapt in the {where} of "
                        f"{backbone.name}" + (f" matching module.lora.target_modules={wanted}" if wanted else "")
                        + "; name other modules with module.lora.target_modules=[...]")
    return names


def lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(r=int(spec["r"]), lora_alpha=float(spec["alpha"]), lora_dropout=float(spec["dropout"]),
                      target_modules=list(spec["targets"]), bias="none")


def _inject(backbone, spec: dict) -> None:
    from peft.tuners.lora import LoraModel

    backbone.__dict__[WRAPPER] = LoraModel(backbone.model, lora_config(spec), "default")


def add_lora(backbone, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Sequence[str] | None = None, text: bool = False) -> dict:
    """Adapt ``backbone`` in place; every non-adapter weight frozen. Returns the spec a checkpoint keeps."""
    if int(r) < 1:
        raise UserError(f"module.lora.r must be a rank >= 1, got {r}")
    spec = {"kind": "lora", "r": int(r), "alpha": float(alpha), "dropout": float(dropout), "text": bool(text),
            "targets": lora_targets(backbone, text, target_modules), "base_fingerprint": backbone.fingerprint()}
    for p in backbone.parameters():
        p.requires_grad_(False)
    _inject(backbone, spec)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    return spec


def is_adapted(backbone) -> bool:
    return WRAPPER in backbone.__dict__


def adapter_modules(backbone) -> dict[str, nn.Module]:
    """The adapted modules (peft LoraLayers) by name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in backbone.model.named_modules() if isinstance(m, LoraLayer)}


def silent_adapters(backbone) -> list[str]:
    """Adapted modules none of whose adapter weights got a non-zero gradient (call after a backward pass)."""
    out = []
    for name, m in adapter_modules(backbone).items():
        grads = [p.grad for n, p in m.named_parameters() if "lora_" in n]
        if not any(g is not None and bool(torch.any(g != 0)) for g in grads):
            out.append(name)
    return out


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "lora_" in k}


def merged_copy(backbone):
    """A deep copy of an adapted backbone with its adapters merged and removed (``merge_and_unload``)."""
    bb = copy.deepcopy(backbone)
    wrapper = bb.__dict__.pop(WRAPPER)
    bb.model = wrapper.merge_and_unload()
    return bb


def merged_state(base_backbone, spec: dict, adapter: dict[str, torch.Tensor], source: str = "checkpoint"
                 ) -> dict[str, torch.Tensor]:
    """The fine-tune's full weights (the base's key names): ``base_backbone`` (unchanged) + the adapter, merged."""
    if spec.get("kind") != "lora":
        raise UserError(f"{source}: unknown adapter kind {spec.get('kind')!r} (this version knows lora)")
    fp = base_backbone.fingerprint()
    if spec.get("base_fingerprint") and spec["base_fingerprint"] != fp:
        raise UserError(f"{source}: its LoRA adapter was trained on base weights {spec['base_fingerprint']}, but "
                        f"this base is {fp}: pass the base it was fine-tuned from")
    bb = copy.deepcopy(base_backbone)
    _inject(bb, spec)
    result = bb.load_state_dict(adapter, strict=False)
    if result.unexpected_keys or adapter_state(dict.fromkeys(result.missing_keys)):
        bad = result.unexpected_keys[:1] or list(adapter_state(dict.fromkeys(result.missing_keys)))[:1]
        raise UserError(f"{source}: its adapter does not fit this base ({bad[0]}): pass the base it was fine-tuned "
                        "from")
    return {k: v.detach().clone() for k, v in merged_copy(bb).state_dict().items()}
