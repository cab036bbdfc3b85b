"""Hydra configs compose and instantiate."""

from __future__ import annotations

import json

import pytest
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


# --- the pre-run check: every key of every node a run builds is an option of what it builds ---------------------

def test_every_shipped_preset_and_experiment_passes_the_pre_run_check():
    from conftest import REPO, compose_config
    from microbench.tasks.validate import config_problems

    composed = [("train", [f"experiment={e.stem}"]) for e in sorted((REPO / "configs" / "experiment").glob("*.yaml"))]
    composed += [(job, [f"model={m.stem}"]) for m in sorted((REPO / "configs" / "model").glob("*.yaml"))
                 for job in ("eval", "train")]
    composed += [("forgetting", []), ("specialists", []), ("eval", ["task=cognition"]), ("eval", ["logger=wandb"]),
                 ("train", ["trainer=ddp_sim", "logger=wandb"])]
    problems = {f"{job} {' '.join(o)}": config_problems(compose_config(job, o)) for job, o in composed}
    assert len(problems) > 40 and not {k: v for k, v in problems.items() if v}


def test_every_typo_of_a_run_is_reported_at_once_with_its_fix_before_any_work(tmp_path, cfg_train, cfg_eval):
    """A key a node's target does not take (a typo in an experiment file, a ``+key=``) reached the target as a
    keyword it rejects (after minutes of work for the late ones) or ignores; now all of them, with the fix, first."""
    import time

    from microbench.errors import UserError
    from microbench.tasks.registry import evaluate, train

    cfg = cfg_train(["experiment=demo", "+model.precison=bf16", "+trainer.max_epoch=3", "+module.lrr=1",
                     f"paths.output_dir={tmp_path / 'fit'}", f"checkpoint_dir={tmp_path / 'ck'}"])
    t = time.perf_counter()
    with pytest.raises(UserError) as err:
        train(cfg)
    assert time.perf_counter() - t < 5 and not (tmp_path / "ck").exists()  # nothing was built or fitted
    assert str(err.value) == (
        "3 config problem(s), nothing was run: trainer.max_epoch is not an option of "
        "lightning.pytorch.trainer.Trainer (did you mean trainer.max_epochs?); model.precison is not an option of "
        "microbench.models.generalist.build_generalist (did you mean model.revision?); module.lrr is not an option "
        "of microbench.models.finetune.FineTuneModule (did you mean module.lr?)")
    assert json.loads((tmp_path / "fit" / "failed.json").read_text())["kind"] == "user error"
    # a target that takes **kwargs and dispatches on them declares its options per node: the backend's, the adapter's
    with pytest.raises(UserError, match=r"model.temprature is not an option of .*build_generative_backend \(did you "
                                        r"mean model.temperature\?\)"):
        evaluate(cfg_eval(["model=openai_compatible", "+model.temprature=0.5", f"paths.output_dir={tmp_path / 'g'}"]))
    with pytest.raises(UserError, match=r"model.trim_padding is not an option of .*build_backbone \(did you mean "
                                        r"model.trim_text_padding\?\)"):
        evaluate(cfg_eval(["+model.trim_padding=false", f"paths.output_dir={tmp_path / 'e'}"]))
