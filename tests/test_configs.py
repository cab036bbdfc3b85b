"""Hydra configs compose and instantiate."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO


def _data_cfg(name: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(REPO / "configs" / "data"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def test_data_config_instantiates():
    cfg = _data_cfg("ubench", ["batch_size=8", "split=test", "datasets=[kather_et_al_2016]"])
    dm = instantiate(cfg)
    dm.setup()
    assert dm.batch_size == 8 and set(dm.rows["dataset"]) == {"kather_et_al_2016"}
    assert len(dm.images()) == 7


def test_pathology_preset_on_the_sample():
    dm = instantiate(_data_cfg("ubench_pathology"))
    dm.setup()
    assert set(dm.rows["dataset"]) == {"acevedo_et_al_2020", "kather_et_al_2016", "nirschl_et_al_2018"}
