"""Specialists (issue 22): fine-tunes on one corner of μ-Bench and their studies."""

from __future__ import annotations

import json
import math

import pytest


def _walk_floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_floats(v)


def test_a_fluorescence_specialist_is_studied_on_the_whole_benchmark_without_nan(tmp_path, cfg_train):
    """The issue's command died in the report (NaN in JSON): the study scored only the training modality (its
    `data.modalities` filter was kept), so nothing was 'supported' and the chance level of that empty group was NaN.
    Now the study scores every row of the copy, and an undefined number is None with its reason."""
    from microbench.tasks.registry import train

    out = tmp_path / "fluo"
    train(cfg_train(["experiment=demo", "task_name=fluo_specialist", "data.datasets=null",
                     "data.modalities=[fluorescence microscopy]", "trainer.max_epochs=1", "eval_in_domain=false",
                     "study.alphas=[0,0.5,1]", "bootstrap.n_resamples=99", "study.result_cache=null",
                     "+trainer.enable_progress_bar=false", f"paths.output_dir={out}", f"checkpoint_dir={out / 'ckpt'}"]))
    text = (out / "forgetting" / "forgetting.json").read_text()
    assert "NaN" not in text
    study = json.loads(text)
    assert all(math.isfinite(x) for x in _walk_floats(study))
    targets = set(study["target_datasets"])
    assert "held_et_al_2010_h2b" in targets and "kather_et_al_2016" not in targets
    ft = study["splits"]["test"]["models"]["finetuned"]
    assert ft["supported/all"]["acc"]["n"] > 0  # the rest of the benchmark is scored
    assert "kather_et_al_2016/coarse" in ft["datasets"]
    assert study["splits"]["test"]["chance"]["supported"] is not None


def test_undefined_numbers_become_none_with_their_place_and_reason():
    from microbench.studies.report import undefined_numbers

    study = {"a": {"b": float("nan"), "c": 1.0}, "d": [0.5, float("inf")]}
    found = undefined_numbers(study)
    assert study == {"a": {"b": None, "c": 1.0}, "d": [0.5, None]}
    assert set(found) == {"a/b", "d/1"} and all(v.startswith("undefined:") for v in found.values())


def test_a_plugin_backbone_without_a_learnable_temperature_fine_tunes_contrastively(tmp_path, cfg_train,
                                                                                     monkeypatch):
    """`logit_scale_parameter()` may return None (the base class's default): the contrastive loss then uses a
    fixed scale, CLIP's initial 1/0.07, instead of dying with AttributeError in training_step."""
    import sys

    from conftest import REPO
    from microbench.models.finetune import FIXED_LOGIT_SCALE
    from microbench.tasks.registry import train

    monkeypatch.syspath_prepend(str(REPO / "tests"))
    sys.modules.pop("plugin_backbone", None)
    out = tmp_path / "plugin"
    record, objs = train(cfg_train(["experiment=demo", "model=plugin", "model._target_=plugin_backbone.PluginBackbone",
                                    "trainer.max_epochs=1", "forgetting.enabled=false", "eval_in_domain=false",
                                    "+trainer.enable_progress_bar=false", f"paths.output_dir={out}",
                                    f"checkpoint_dir={out / 'ckpt'}"]))
    module = objs["module"]
    assert module.backbone.logit_scale_parameter() is None and module.objective == "contrastive"
    assert float(module.contrastive_scale()) == pytest.approx(FIXED_LOGIT_SCALE)
    assert record["best_checkpoint"] and 0 <= record["test"]["test/acc"] <= 1
