"""Data-module configs: one copy and split specification, seen through different data modules."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

PERCEPTION_DM = "microbench.data.datamodule.PerceptionDataModule"
LOCALIZATION_DM = "microbench.data.localization.LocalizationDataModule"
#: what identifies the copy, its splits and the loading, shared by every data module
COPY_KEYS = ("path", "revision", "split_seed", "split_fractions", "batch_size", "num_workers")


def data_module_cfg(data_cfg: DictConfig, target: str, **overrides) -> DictConfig:
    """``data_cfg`` for the data module ``target``: as it is if it already configures that module, otherwise the
    same copy and split specification (``COPY_KEYS``) under ``target`` (perception ↔ localization); then
    ``overrides``."""
    if str(data_cfg.get("_target_", "")) == target:
        base = OmegaConf.to_container(data_cfg, resolve=True)
    else:
        base = {"_target_": target, **{k: data_cfg.get(k) for k in COPY_KEYS if data_cfg.get(k) is not None}}
    return OmegaConf.merge(base, overrides)
