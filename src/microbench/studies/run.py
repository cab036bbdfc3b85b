"""The ``src/forgetting.py`` task: base model (a preset or a checkpoint) + fine-tuned checkpoint → report."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from microbench.data.config import PERCEPTION_DM, data_module_cfg
from microbench.loggers import make_loggers
from microbench.studies.forgetting import load_finetuned_state, run_study, study_alphas
from microbench.studies.merging import MergeError


def make_eval_dm(data_cfg: DictConfig, transform, split: str):
    return instantiate(data_module_cfg(data_cfg, PERCEPTION_DM, split=split), transform=transform)


def base_model_config(base) -> DictConfig:
    """``base`` as a model config: the composed preset (``model@base=tiny``), or a preset named on the command line
    (``base=tiny``, which Hydra gives as a plain string)."""
    if not isinstance(base, str):
        return base
    from microbench.errors import UserError

    folder = Path(__file__).resolve().parents[3] / "configs" / "model"
    presets = sorted(p.stem for p in folder.glob("*.yaml"))
    if base not in presets:
        raise UserError(f"base={base!r} is not a model preset; presets: {', '.join(presets)} (or base_checkpoint=...)")
    cfg = OmegaConf.load(folder / f"{base}.yaml")
    cfg.pop("defaults", None)
    return cfg


def forgetting(cfg: DictConfig) -> tuple[dict, dict]:
    from microbench.results.records import start_run

    if not cfg.get("finetuned"):
        raise MergeError("no fine-tuned checkpoint: pass finetuned=<path to a .ckpt from src/train.py>")
    alphas = study_alphas(cfg.alphas, bool(cfg.get("extrapolate", False)))
    start_run(cfg)  # output folder writable, data path there, before the model is built
    backbone = instantiate(base_model_config(cfg.base))
    if cfg.get("base_checkpoint"):
        base_state, _ = load_finetuned_state(cfg.base_checkpoint, backbone, key="base_checkpoint")
    else:
        base_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    ft_state, record = load_finetuned_state(cfg.finetuned, backbone)
    localization = None
    hp = record.get("hyper_parameters") or {}
    if "class_names" in hp:  # a localization checkpoint: score its head on every θ(α) too
        from microbench.localization_tasks import LocalizationSweeper, localization_dm_factory
        from microbench.models.localization import detector_from_checkpoint

        module, _ = detector_from_checkpoint(record["checkpoint"], backbone=backbone)
        loc_record = hp.get("record") or {}
        make_loc = localization_dm_factory(cfg.data, loc_record.get("targets", "boxes"), list(hp["class_names"]))
        localization = LocalizationSweeper(module, make_loc, accelerator=cfg.trainer.get("accelerator", "cpu"))
        record = {"localization_datasets": loc_record.get("datasets")
                  or sorted({im.dataset for im in make_loc("all").images("all")}),
                  "model_config": loc_record.get("model_config")}
    targets = list(cfg.get("target_datasets") or (record.get("class_space") or {}).get("datasets")
                   or record.get("localization_datasets") or [])
    if not targets:
        raise MergeError("cannot tell the fine-tuning datasets: the checkpoint has no class space; pass "
                         "target_datasets=[...]")
    loggers = make_loggers(cfg)
    study = run_study(
        backbone, base_state, ft_state, partial(make_eval_dm, cfg.data, backbone.preprocess), cfg.paths.output_dir,
        targets, alphas, cfg.towers, float(cfg.selection.keep_target_gain), cfg.get("result_cache"),
        accelerator=cfg.trainer.get("accelerator", "cpu"), n_resamples=int(cfg.bootstrap.n_resamples),
        finetuned_path=str(Path(cfg.finetuned)), logger=loggers[0] if loggers else None,
        extra={"config": OmegaConf.to_container(cfg, resolve=True), "finetuned_record": {
            k: v for k, v in record.items() if k in ("backbone", "objective", "model_config")}},
        localization=localization,
    )
    return study, {"backbone": backbone}
