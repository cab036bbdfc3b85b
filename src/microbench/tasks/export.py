"""``python -m microbench export CKPT --out DIR``: a fine-tune others can load without microbench.

The folder holds the fine-tuned weights in safetensors in the model library's own layout (open_clip:
``open_clip_config.json`` + ``open_clip_model.safetensors``, loadable with ``model=openclip
model.name=local-dir:DIR`` or ``open_clip.create_model_and_transforms("local-dir:DIR")``; transformers:
``save_pretrained`` with its processor, loadable with ``AutoModel.from_pretrained(DIR)`` or ``model=hf
model.name=DIR``), a LoRA fine-tune merged into the base (``merge_and_unload``), or with ``--adapter-only`` the
adapter alone (``adapter_config.json`` + ``adapter_model.safetensors`` in peft's naming, ``base_model.model.<module>``),
and a ``README.md`` model card whose YAML front matter names the base, the recipe, the data fingerprint and the
μ-Bench and forgetting results (``model-index``) of the run that wrote the checkpoint, when its records are found
beside it (read only when they name this checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from microbench.errors import UserError
from microbench.results.io import read_json, write_json, write_text
from microbench.results.record import run_name_of
from microbench.results.report import points

HOW = "pass a .ckpt written by python src/train.py (task=finetune)"


def _run_records(ckpt: Path, record: dict) -> tuple[dict | None, dict | None]:
    """The fit's train_metrics.json and forgetting.json, when they are there and name this checkpoint."""
    out_dir = ((record.get("config") or {}).get("paths") or {}).get("output_dir")
    if not out_dir:
        return None, None
    fit_file = Path(out_dir) / "train_metrics.json"
    if not fit_file.is_file():
        return None, None
    fit = read_json(fit_file)
    me = str(ckpt.resolve())
    resolved = {k: str(Path(fit[k]).resolve()) if fit.get(k) else None
                for k in ("best_checkpoint", "last_checkpoint", "tested_checkpoint")}
    if fit.get("tested_checkpoint") == "final weights":
        resolved["tested_checkpoint"] = resolved["last_checkpoint"]
    if me not in (resolved["best_checkpoint"], resolved["last_checkpoint"]):
        return None, None  # another run wrote that folder's record: not this checkpoint's results
    # the held-out test scored the tested checkpoint; the study after the fit, the weights the fit ended with
    fit = fit if resolved["tested_checkpoint"] == me else None
    study_file = Path(out_dir) / "forgetting" / "forgetting.json"
    study = read_json(study_file) if study_file.is_file() and resolved["last_checkpoint"] == me else None
    return fit, study


def _model_index(name: str, record: dict, fit: dict | None, study: dict | None) -> list[dict]:
    results = []
    datasets = (record.get("class_space") or {}).get("datasets") or []
    dataset = {"name": "μ-Bench (Micro-Bench): " + ", ".join(datasets), "type": "jnirschl/uBench",
               "split": "test", "revision": (record.get("data") or {}).get("revision")}
    test = (fit or {}).get("test") or {}
    metrics = [{"type": "accuracy", "name": f"held-out test {k.removeprefix('test/')}", "value": round(float(v), 6)}
               for k, v in test.items() if k in ("test/acc", "test/balanced_acc", "test/macro_f1")]
    if metrics:
        results.append({"task": {"type": "image-classification", "name": "fine-grained classification (its "
                                 "training datasets, held-out split)"}, "dataset": dataset, "metrics": metrics})
    if study:
        models = study["splits"]["test"]["models"]
        ft = models.get("finetuned") or {}
        m = []
        for key, label in (("target/fine", "target datasets, fine-grained"), ("supported/all", "rest of μ-Bench")):
            if key in ft:
                m += [{"type": "accuracy", "name": f"zero-shot accuracy, {label}", "value": round(ft[key]["acc"]["value"], 6)},
                      {"type": "delta_vs_base", "name": f"Δ vs base, {label} (paired image-clustered 95 % CI "
                       f"[{ft[key]['delta']['low']:.4f}, {ft[key]['delta']['high']:.4f}])",
                       "value": round(ft[key]["delta"]["value"], 6)}]
        if m:
            results.append({"task": {"type": "zero-shot-image-classification", "name": "μ-Bench forgetting study"},
                            "dataset": {**dataset, "name": "μ-Bench (Micro-Bench), whole copy"}, "metrics": m})
    return [{"name": name, "results": results}] if results else []


def model_card(name: str, record: dict, base: dict, fit: dict | None, study: dict | None, exported: dict) -> str:
    import yaml

    cfg = record.get("config") or {}
    module = cfg.get("module") or {}
    recipe = {"objective": record.get("objective"), "lr": module.get("lr"), "weight_decay": module.get("weight_decay"),
              "epochs": (cfg.get("trainer") or {}).get("max_epochs"), "batch_size": (cfg.get("data") or {}).get(
                  "batch_size"), "adapter": record.get("adapter"), "head_init": record.get("head_init"),
              "seed": cfg.get("seed"), "microbench_version": record.get("microbench_version")}
    front = {"library_name": exported["library"], "tags": ["microbench", "micro-bench", "microscopy", "clip"],
             "base_model": base, "datasets": ["jnirschl/uBench"],
             "microbench": {"recipe": {k: v for k, v in recipe.items() if v is not None},
                            "data": {k: (record.get("data") or {}).get(k) for k in ("kind", "location", "revision",
                                                                                   "fingerprint", "num_rows")},
                            "training_datasets": (record.get("class_space") or {}).get("datasets"),
                            "weights_fingerprint": exported["fingerprint"], "export": exported["what"]},
             "model-index": _model_index(name, record, fit, study)}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {name}", "", f"A fine-tune of `{base['name']}` made with microbench "
             f"({recipe['objective']} objective" + (", LoRA" if record.get("adapter") else "") + ") on "
             f"{', '.join((record.get('class_space') or {}).get('datasets') or ['?'])}.", "",
             f"Load it: {exported['load']}", ""]
    if study:
        ft = study["splits"]["test"]["models"]["finetuned"]
        target, rest = ft["target/fine"]["delta"]["value"], ft["supported/all"]["delta"]["value"]
        lines += [f"Forgetting study (test split): target fine-grained Δ {points(target, signed=True)}"
                  f" points, rest of μ-Bench Δ {points(rest, signed=True)} points vs the base "
                  "(paired image-clustered 95 % CIs in the front matter).", ""]
    return "\n".join(lines)


def export(ckpt: str | Path, out: str | Path, adapter_only: bool = False) -> dict:
    """Write the export folder; returns what was written."""
    from microbench.checkpoints import read_checkpoint
    from microbench.studies.forgetting import load_finetuned_state
    from microbench.tasks.trainer import build_model

    ckpt, out = Path(ckpt), Path(out)
    blob = read_checkpoint(ckpt, "CKPT", HOW)
    record = (blob.get("microbench") or {}) if isinstance(blob, dict) else {}
    if not record.get("model_config") or not record.get("objective"):
        raise UserError(f"{ckpt} is not a fine-tune's checkpoint (no model config or objective): {HOW}")
    backbone = build_model(OmegaConf.create(record["model_config"]))
    base = {"name": backbone.name, "kind": backbone.kind, "fingerprint": backbone.fingerprint(refresh=True),
            "model_config": {k: v for k, v in record["model_config"].items() if k != "cache_dir"}}
    out.mkdir(parents=True, exist_ok=True)
    fit, study = _run_records(ckpt, record)
    if adapter_only:
        exported = _export_adapter(blob, record, out)
    else:
        state, _ = load_finetuned_state(ckpt, backbone)
        backbone.load_state_dict(state)
        exported = _export_full(backbone, out)
    name = run_name_of(record.get("config")) or ckpt.stem
    write_text(out / "README.md", model_card(name, record, base, fit, study, exported))
    return {"out": str(out), **exported, "results_in_card": bool(fit or study)}


def _export_full(backbone, out: Path) -> dict:
    if backbone.kind == "open_clip":
        backbone.save_local_dir(out)
        load = (f"`model=openclip model.name=local-dir:{out}` in microbench, or "
                f"`open_clip.create_model_and_transforms('local-dir:{out}')`")
        files = ["open_clip_config.json", "open_clip_model.safetensors"]
    elif backbone.kind == "hf":
        backbone.model.save_pretrained(out, safe_serialization=True)
        backbone.tokenizer.save_pretrained(out)
        backbone.preprocess.image_processor.save_pretrained(out)
        load = f"`model=hf model.name={out}` in microbench, or `transformers.AutoModel.from_pretrained('{out}')`"
        files = sorted(p.name for p in out.iterdir() if p.name != "README.md")
    else:
        raise UserError(f"export writes open_clip and transformers models; this one is {backbone.kind} "
                        f"({backbone.name}): its weights are in the .ckpt (state_dict, 'backbone.' keys)")
    return {"library": "open_clip" if backbone.kind == "open_clip" else "transformers", "what": "full weights",
            "files": files, "load": load, "fingerprint": backbone.fingerprint(refresh=True)}


def _export_adapter(blob: dict, record: dict, out: Path) -> dict:
    from safetensors.torch import save_file

    from microbench.models.adapters import lora_config

    spec = record.get("adapter")
    if not spec:
        raise UserError("--adapter-only: this checkpoint is a full fine-tune, not a LoRA one (module.adapter=lora); "
                        "export it without --adapter-only")
    tensors = {}
    for k, v in blob["state_dict"].items():
        if "lora_" in k and k.startswith("backbone.model."):
            name = "base_model.model." + k.removeprefix("backbone.model.").replace(".default.", ".")
            tensors[name] = v.detach().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = lora_config(spec).to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else None
    write_json(out / "adapter_config.json", cfg)
    from microbench.models.backbones.base import state_fingerprint

    return {"library": "peft", "what": "LoRA adapter alone (base weights not included)",
            "files": ["adapter_config.json", "adapter_model.safetensors"],
            "load": "peft's `inject_adapter_in_model` / `set_peft_model_state_dict` on the base named below "
                    f"(fingerprint {spec.get('base_fingerprint')}), or merge it with microbench",
            "fingerprint": state_fingerprint({k: torch.as_tensor(v) for k, v in tensors.items()})}
