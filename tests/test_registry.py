"""Dispatch is data: (task, model family) → task function, table-driven like open_clip's
``tests/test_factory_task.py``. The family is read from what the model config builds, without building it."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from microbench.errors import UserError
from microbench.tasks import cognition, finetune, linear_probe, localization, perception, registry
from microbench.tasks.trainer import build_model, model_family

EVAL_CASES = [
    ("perception", "tiny", perception.zero_shot),
    ("perception", "openclip", perception.zero_shot),
    ("perception", "clip", perception.zero_shot),
    ("perception", "timm", perception.zero_shot),
    ("perception", "random", perception.random),
    ("perception", "openai_compatible", perception.generative),
    ("perception", "gpt4o", perception.generative),
    ("perception", "hf_vlm", perception.generative),
    ("cognition", "tiny", cognition.contrastive),
    ("cognition", "openai_compatible", cognition.generative),
    ("cognition", "random", cognition.random),
    ("localization", "tiny", localization.evaluate_head),
    ("localization", "qwen_vl_chat", localization.evaluate_generative),
    ("localization", "paligemma", localization.evaluate_generative),
]


@pytest.mark.parametrize(("task", "model", "expected"), EVAL_CASES, ids=[f"{t}-{m}" for t, m, _ in EVAL_CASES])
def test_evaluate_dispatches_each_task_and_family_to_its_function(cfg_eval, task, model, expected):
    cfg = cfg_eval([f"task={task}", f"model={model}"])
    fn = registry.lookup(registry.EVALUATE, task, lambda: model_family(cfg.model), "src/eval.py")
    assert fn is expected


TRAIN_CASES = [
    ("finetune", [], finetune.run),
    ("finetune", ["experiment=demo"], finetune.run),
    ("linear_probe", ["experiment=linear_probe", "model=tiny"], linear_probe.run),
    ("localization", ["experiment=detect_nuclei"], localization.train),
]


@pytest.mark.parametrize(("task", "overrides", "expected"), TRAIN_CASES, ids=[c[0] + str(len(c[1])) for c in TRAIN_CASES])
def test_train_dispatches_each_task_to_its_function(cfg_train, task, overrides, expected):
    cfg = cfg_train(overrides)
    assert cfg.task == task
    assert registry.lookup(registry.TRAIN, task, lambda: model_family(cfg.model), "src/train.py") is expected


def test_every_entry_of_the_tables_is_a_distinct_task_function():
    for table in (registry.EVALUATE, registry.TRAIN, registry.FORGETTING):
        for (task, family), fn in table.items():
            assert family in ("contrastive", "generative", "random") and callable(fn), (task, family)
    assert len(set(registry.EVALUATE.values())) == len(registry.EVALUATE)


@pytest.mark.parametrize(("table", "task", "family", "message"), [
    ("EVALUATE", "nonsense", "contrastive", "task must be one of perception, cognition, localization; got 'nonsense'"),
    ("EVALUATE", "localization", "random", "src/eval.py task=localization needs a contrastive or generative model; "
                                           "this model is random"),
    ("TRAIN", "finetune", "generative", "src/train.py task=finetune needs a contrastive model; this model is "
                                        "generative"),
    ("TRAIN", "perception", "contrastive", "task must be one of finetune, linear_probe, localization"),
])
def test_a_pair_with_no_task_function_is_one_line_naming_what_exists(table, task, family, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        registry.lookup(getattr(registry, table), task, lambda: family, "src/eval.py" if table == "EVALUATE"
                        else "src/train.py")


def test_the_task_is_checked_before_the_model_is_looked_at():
    def never():
        raise AssertionError("the model's family was read for an unknown task")

    with pytest.raises(UserError, match="task must be one of"):
        registry.lookup(registry.EVALUATE, "nonsense", never, "src/eval.py")


def test_every_model_preset_declares_its_family_without_being_built():
    expected = {"random": "random", "openai_compatible": "generative", "gpt4o": "generative", "hf_vlm": "generative",
                "cogvlm": "generative", "paligemma": "generative", "qwen_vl_chat": "generative"}
    for f in sorted((REPO / "configs" / "model").glob("*.yaml")):
        if f.stem == "plugin":  # _target_: ??? (the user's class)
            continue
        cfg = OmegaConf.load(f)
        if "_target_" not in cfg:  # a preset extending another (defaults: [openai_compatible])
            cfg = OmegaConf.merge(OmegaConf.load(f.parent / f"{cfg.defaults[0]}.yaml"), cfg)
        assert model_family(cfg) == expected.get(f.stem, "contrastive"), f.stem


def test_the_built_model_is_of_the_family_its_config_declares(cfg_eval):
    rnd = build_model(cfg_eval(["model=random", "model.seed=7"]).model)
    assert rnd.family == "random" and rnd.seed == 7 and rnd.describe()["fingerprint"] == "seed7"
    assert build_model(cfg_eval([]).model).family == "contrastive"
    with pytest.raises(UserError, match="declares the contrastive family but built a dict"):
        build_model(OmegaConf.create({"_target_": "test_registry.lying_factory"}))
    with pytest.raises(UserError, match="does not declare its family"):
        model_family(OmegaConf.create({"_target_": "collections.OrderedDict"}))
    with pytest.raises(UserError, match="cannot be imported"):
        model_family(OmegaConf.create({"_target_": "no_such_package.Model"}))
    with pytest.raises(UserError, match="has no _target_"):
        model_family(OmegaConf.create({"seed": 1}))


def lying_factory():
    return {}


lying_factory.family = "contrastive"


def test_the_data_config_names_the_module_a_fine_tune_fits(cfg_train, tmp_path):
    from microbench.tasks.registry import train

    cfg = cfg_train(["experiment=demo"])
    assert cfg.data._target_ == "microbench.data.labelled.LabelledDataModule"  # what runs, no swap at run time
    with pytest.raises(UserError, match=r"task=finetune fits labelled images, but data._target_=microbench.data."
                                        r"datamodule.PerceptionDataModule: use data=ubench_labelled"):
        train(cfg_train(["data=ubench"]))
