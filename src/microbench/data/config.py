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


LABELLED_DM = "microbench.data.labelled.LabelledDataModule"
#: the perception-family data modules (a LabelledDataModule is a PerceptionDataModule with training labels)
PERCEPTION_FAMILY = (PERCEPTION_DM, LABELLED_DM)


def perception_view(data_cfg: DictConfig, **overrides) -> DictConfig:
    """The same rows seen as a :class:`~microbench.data.datamodule.PerceptionDataModule` (every key of a
    perception-family config kept: filters, exclusions, image size), e.g. a fine-tune's held-out test split
    scored zero-shot; a localization config gives its copy and split specification (``COPY_KEYS``)."""
    if str(data_cfg.get("_target_", "")) in PERCEPTION_FAMILY:
        base = {**OmegaConf.to_container(data_cfg, resolve=True), "_target_": PERCEPTION_DM}
        return OmegaConf.merge(base, overrides)
    return data_module_cfg(data_cfg, PERCEPTION_DM, **overrides)


#: the row filters of a perception config: a specialist's selection, dropped for the whole benchmark
ROW_FILTERS = ("datasets", "domains", "modalities", "subdomains")


def whole_benchmark_cfg(data_cfg: DictConfig) -> DictConfig:
    """The whole perception benchmark of the copy ``data_cfg`` reads (every row filter of the training selection
    dropped: datasets, domains, modalities, subdomains; ``exclude_datasets`` kept, it removes data the user does not
    trust): what a forgetting study scores, after a fine-tune and after a localization fit alike."""
    return perception_view(data_cfg, **dict.fromkeys(ROW_FILTERS))


def make_eval_dm(data_cfg: DictConfig, transform, split: str):
    """``split`` of ``data_cfg`` as a perception data module with ``transform`` (a forgetting study's
    ``make_dm``, bound with :func:`functools.partial`)."""
    from hydra.utils import instantiate

    return instantiate(perception_view(data_cfg, split=split), transform=transform)


def localization_dm_factory(data_cfg: DictConfig, targets: str, classes: list[str]):
    """``split -> LocalizationDataModule`` (set up) from a localization or perception data config, with the label
    space ``classes`` (a head's class names, in its order)."""
    from hydra.utils import instantiate

    def make(split: str):
        dm = instantiate(data_module_cfg(data_cfg, LOCALIZATION_DM, split=split, targets=targets,
                                         classes=list(classes), strict_filters=False, augment=False))
        dm.setup("test")
        return dm
    return make
