"""Hydra configs compose and instantiate."""

from __future__ import annotations

from hydra.utils import instantiate


def test_data_config_instantiates(cfg_data):
    cfg = cfg_data("ubench", ["batch_size=8", "split=test", "datasets=[kather_et_al_2016]"])
    dm = instantiate(cfg)
    dm.setup()
    assert dm.batch_size == 8 and set(dm.rows["dataset"]) == {"kather_et_al_2016"}
    assert len(dm.images()) == 7


def test_pathology_preset_on_the_sample(cfg_data):
    dm = instantiate(cfg_data("ubench_pathology"))
    dm.setup()
    assert set(dm.rows["dataset"]) == {"acevedo_et_al_2020", "kather_et_al_2016", "nirschl_et_al_2018"}
