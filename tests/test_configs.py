"""Hydra configs compose and instantiate."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from hydra.utils import instantiate

from microbench.options import (
    Density,
    DropProbability,
    NonNegativeInt,
    OpenShare,
    PositiveFloat,
    PositiveInt,
    Share,
    check_value,
    constrained_options,
)


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

def test_every_shipped_preset_and_experiment_passes_the_pre_run_check(tmp_path):
    from conftest import REPO, compose_config
    from microbench.tasks.settings import ENTRY_SETTINGS
    from microbench.tasks.validate import config_problems, settings_problems

    composed = [("train", [f"experiment={e.stem}"]) for e in sorted((REPO / "configs" / "experiment").glob("*.yaml"))]
    composed += [(job, [f"model={m.stem}"]) for m in sorted((REPO / "configs" / "model").glob("*.yaml"))
                 for job in ("eval", "train")]
    composed += [("forgetting", []), ("specialists", []), ("eval", ["task=cognition"]), ("eval", ["logger=wandb"]),
                 ("train", ["trainer=ddp_sim", "logger=wandb"])]
    composed += [(job, [f"study={s.stem}", *(["forgetting.enabled=true"] if job == "train" else []),
                        *([f"study.options.model_stock.finetuned=[{tmp_path / 'seed1.ckpt'}]"]
                          if s.stem == "model_stock" else [])])
                 for s in sorted((REPO / "configs" / "study").glob("*.yaml")) if s.stem != "common"
                 for job in ("forgetting", "train")]
    (tmp_path / "seed1.ckpt").touch()  # Model Stock's second fine-tune (the check reads that it is a file)
    required = {"forgetting": ["finetuned=ft.ckpt"], "specialists": ["runs=multirun"]}  # given on every command line
    problems = {f"{job} {' '.join(o)}": (settings_problems(cfg, ENTRY_SETTINGS[job]) + config_problems(cfg))
                for job, o in composed for cfg in [compose_config(job, [*required.get(job, []), *o])]}
    assert len(problems) > 50 and not {k: v for k, v in problems.items() if v}


# --- the pre-run check: the root settings and the groups that build no target have a schema too ------------------

def test_every_problem_of_the_root_settings_is_reported_with_the_rest_before_any_work(tmp_path, cfg_eval, cfg_train,
                                                                                       cfg_forgetting):
    """`sources`, `box_format`, `task`, `text_batch_size`, `bootstrap.*`, `cognition.format` were checked one at a
    time where each was read (the bootstrap's after every image was scored, as a traceback: `confidence=1.5` a
    ValueError from numpy's percentile, `n_resamples=0` an IndexError; `box_format` after the model was built); now a dataclass per entry (`microbench.tasks.settings`) states them and the pre-run check reports all
    of them at once, beside the nodes' problems, before anything is built."""
    from microbench.errors import UserError
    from microbench.tasks.registry import evaluate, train
    from microbench.tasks.settings import ForgettingSettings
    from microbench.tasks.validate import check_config

    with pytest.raises(UserError) as err:
        evaluate(cfg_eval(["task=nonsense", "sources=[caption]", "text_batch_size=0", "box_format=qwn",
                           "bootstrap.confidence=1.5", "+bootstrap.n_resample=9", "cognition.format=csv",
                           "model=openai_compatible", "model.max_concurrency=0", f"paths.output_dir={tmp_path / 'e'}"]))
    assert str(err.value) == (
        "8 config problem(s), nothing was run: task must be one of perception, cognition, localization; got "
        "'nonsense'; box_format must be one of qwen, qwen_lenient, paligemma, got 'qwn'; sources must be a list, "
        "each one of captions, questions, got ['caption']; text_batch_size must be an integer >= 1, got 0; "
        "bootstrap.n_resample is not a setting of bootstrap (did you mean bootstrap.n_resamples?); "
        "bootstrap.confidence must be a number in (0, 1), got 1.5; cognition.format must be one of auto, official, "
        "table, microvqa, got 'csv'; model.max_concurrency must be an integer >= 1, got 0")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["failed.json"]
    # a root key that is no setting and no config group was merged and never read: a typo in an experiment file
    # (eval_in_domian: false) left the in-domain check on without a word
    with pytest.raises(UserError) as err:
        train(cfg_train(["experiment=demo", "+eval_in_domian=false", "+bootsrap.n_resamples=9",
                         f"checkpoint_dir={tmp_path / 'ck'}"]))
    assert str(err.value) == (
        "2 config problem(s), nothing was run: bootsrap is not a setting of src/train.py (did you mean bootstrap?); "
        "eval_in_domian is not a setting of src/train.py (did you mean eval_in_domain?)")
    # a key of an older layout is reported once, with its new name (not also as a stray key)
    with pytest.raises(UserError, match=r"^1 config problem\(s\), nothing was run: towers in the config has moved to "
                                        r"study.towers"):
        check_config(cfg_forgetting(["finetuned=x.ckpt", "+towers=image"]), ForgettingSettings)
    # the old code scored every image first, then stopped with a traceback (IndexError from an empty resample)
    with pytest.raises(UserError, match=r"^1 config problem\(s\), nothing was run: bootstrap.n_resamples must be an "
                                        r"integer >= 1, got 0$"):
        evaluate(cfg_eval(["bootstrap.n_resamples=0", f"paths.output_dir={tmp_path / 'b'}"]))
    with pytest.raises(UserError) as err:
        train(cfg_train(["experiment=demo", "chain=maybe", "data.split=tset", "module.objective=mse",
                         "test_after_fit=2", f"checkpoint_dir={tmp_path / 'ck'}"]))
    assert str(err.value).startswith("4 config problem(s), nothing was run: chain must be true or false, got 'maybe'; "
                                     "test_after_fit must be true or false, got 2; ")
    assert "data.split must be one of all, train, val, test, got 'tset'" in str(err.value)
    assert "module.objective must be one of ce, contrastive, got 'mse'" in str(err.value)
    assert not (tmp_path / "ck").exists()
    with pytest.raises(UserError) as err:  # the groups: probe, specialty (optional), inference
        train(cfg_train(["experiment=demo", "specialty=custom", "specialty.axis=colour", "specialty.value=x",
                         "inference.precision=fp8", "probe.shots=[full,0]", "+inference.compiled=true"]))
    assert str(err.value) == (
        "4 config problem(s), nothing was run: probe.shots must be a list, each one of full or an integer >= 1, got "
        "['full', 0]; specialty.axis must be one of domain, subdomain, modality, submodality, stain, institution, got "
        "'colour'; inference.compiled is not a setting of inference (did you mean inference.compile?); "
        "inference.precision must be one of fp32, bf16, auto, got 'fp8'")


def test_every_problem_of_the_study_is_reported_at_once_where_a_study_runs(tmp_path, cfg_train, cfg_forgetting):
    """The study's settings were converted one by one and the first bad one raised (a second typo cost a second
    run); a key the study does not read (`study.selection.keep_target_gan`) was silently ignored. Now
    `StudySpec`'s annotations and checks report every one, before the fit, and only where a study will run."""
    from microbench.errors import UserError
    from microbench.tasks.registry import forgetting, train
    from microbench.tasks.study import study_problems

    bad = ["study.alphas=[0,2]", "study.towers=text", "+study.selection.keep_target_gan=0.5",
           "study.selection.trade_off_weight=-1", "study.methods=[tiez]", "bootstrap.n_resamples=0"]
    with pytest.raises(UserError) as err:
        train(cfg_train(["experiment=demo", "forgetting.enabled=true", *bad, f"checkpoint_dir={tmp_path / 'ck'}"]))
    message = str(err.value)
    assert message.startswith("6 config problem(s), nothing was run: bootstrap.n_resamples must be an integer >= 1, "
                              "got 0; study.selection.keep_target_gan is not a study setting (did you mean "
                              "study.selection.keep_target_gain?); study.towers must be one of both, image, got 'text'")
    for clause in ("study.selection.trade_off_weight must be a number >= 0, got -1",
                   "study.alphas [2.0] lie outside [0, 1]", "study.methods: unknown merge method 'tiez'"):
        assert clause in message, clause
    assert not (tmp_path / "ck").exists()
    with pytest.raises(UserError, match=r"^5 config problem\(s\).*study.towers must be one of both, image"):
        forgetting(cfg_forgetting(["finetuned=missing.ckpt", *bad[:-1]]))
    with pytest.raises(UserError) as err:  # a required key is one of the problems, not a first error of its own
        forgetting(cfg_forgetting(["study.towers=text"]))
    assert str(err.value) == ("2 config problem(s), nothing was run: finetuned is required: pass finetuned=<a .ckpt "
                              "written by src/train.py (train_metrics.json names it)>; study.towers must be one of "
                              "both, image, got 'text'")
    # no study after this fit: its settings are not read, so not checked
    assert study_problems(cfg_train(["experiment=demo", "study.towers=text"])) == [
        "study.towers must be one of both, image, got 'text'"]
    from microbench.tasks.settings import TrainSettings
    from microbench.tasks.validate import settings_problems

    assert settings_problems(cfg_train(["experiment=demo", "forgetting.enabled=false", "study.towers=text"]),
                             TrainSettings) == []


def test_each_settings_schema_holds_the_defaults_its_yaml_ships():
    """The dataclass and the YAML state the same defaults (a user reading either reads the truth)."""
    import dataclasses

    from omegaconf import OmegaConf

    from conftest import REPO, compose_config
    from microbench.options import check_value, options_annotations, settable
    from microbench.studies.forgetting import STUDY_CONFIG_KEYS, StudySpec
    from microbench.tasks.settings import ENTRY_SETTINGS

    def compare(cfg, schema, prefix=""):
        hints = options_annotations(schema)
        for f in dataclasses.fields(schema):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name not in cfg:  # set by a group or an experiment (specialty, compare_recipes): off by default
                assert default in (None, False, ()), f"{prefix}{f.name}"
                continue
            if OmegaConf.is_interpolation(cfg, f.name):  # a path under the run's folders (probe.cache_dir)
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                compare(cfg[f.name], hints[f.name], f"{prefix}{f.name}.")
                continue
            value = OmegaConf.to_container(cfg[f.name]) if OmegaConf.is_config(cfg[f.name]) else cfg[f.name]
            if isinstance(value, dict):  # a node passed on whole (forgetting's base, merge_options): read elsewhere
                continue
            if settable(hints[f.name]):
                value = check_value(f.name, hints[f.name], value)[0]
            elif isinstance(value, list):  # a list of names (merges, plugins): the schema's default is a tuple
                value = tuple(value)
            assert value == default, f"{prefix}{f.name}: YAML {value!r}, schema {default!r}"

    for job, schema in ENTRY_SETTINGS.items():
        compare(compose_config(job), schema)
    study = OmegaConf.load(REPO / "configs" / "study" / "common.yaml")
    for name, key in STUDY_CONFIG_KEYS.items():
        if key.startswith("study.") and name not in ("options", "result_cache", "methods"):
            default = next(f for f in dataclasses.fields(StudySpec) if f.name == name).default
            value = OmegaConf.select(study, key.removeprefix("study."))
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            assert value == ([float(a) for a in default] if name == "alphas" else default), key


def assert_read_as_pydantic_reads(target, value, numbers: str) -> None:
    """Each option of ``target`` (one letter each) takes ``value`` exactly when pydantic's ``validate_call`` does,
    as the value pydantic makes of it; a bool is refused where the option is a number (``numbers``)."""
    import pydantic

    specs = constrained_options(target)
    reference = pydantic.validate_call(target)
    for i, name in enumerate(sorted(specs)):
        got, problem = check_value(name, specs[name], value)
        try:
            want, refused = reference(**{name: value})[i], False
        except pydantic.ValidationError:
            want, refused = None, True
        refused = refused or (isinstance(value, bool) and name in numbers)
        assert (problem is not None) == refused, (name, value, problem)
        if problem is None:
            assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value", ["both", "image", "text", None, 1, ["captions"], ["captions", "questions"],
                                   ["caption"], "captions", (), 0.5, "0.5", 1.5, 0, True])
def test_a_choice_a_list_of_choices_and_a_share_are_pydantics_reading(value):
    """Pinned to pydantic as the ranges are: a value passes exactly when `validate_call` accepts it for the same
    annotation, and comes out as pydantic makes it."""

    def target(a: Literal["both", "image"] = "both", b: tuple[Literal["captions", "questions"], ...] = (),
               c: Share = 0.5, d: OpenShare = 0.5, e: Literal["last", "best"] | None = None, f: Density = 1.0,
               g: DropProbability = 0.0):
        return a, b, c, d, e, f, g

    assert set(constrained_options(target)) == set("abcdefg")
    assert_read_as_pydantic_reads(target, value, numbers="cdfg")


def test_a_choice_is_checked_when_built_from_python_too():
    """`Literal` in the signature is the one statement of a choice: a direct call gets the same line, as the
    target's own error (the hand-written `if x not in (...)` checks went)."""
    from microbench.data.cognition import load_cognition
    from microbench.data.loading import MicroBenchDataError
    from microbench.data.localization import LocalizationDataModule
    from microbench.errors import UserError
    from microbench.studies.forgetting import StudySpec, tower_keys
    from microbench.studies.merging import MergeError
    from microbench.tasks.specialists import find_specialists

    cases = [(lambda: load_cognition("sample", format="csv"), MicroBenchDataError,
              "cognition.format must be one of auto, official, table, microvqa, got 'csv'"),
             (lambda: LocalizationDataModule(targets="points", split="dev"), MicroBenchDataError,
              "data.targets must be one of boxes, masks, got 'points'; data.split must be one of all, train, val, "
              "test, got 'dev'"),
             (lambda: find_specialists("runs", checkpoint="first"), UserError,
              "checkpoint must be one of last, best, got 'first'"),
             (lambda: tower_keys(None, "text"), MergeError, "study.towers must be one of both, image, got 'text'"),
             (lambda: StudySpec(selection="best", confidence=1), UserError,
              "study.selection.rule must be one of keep_gain, trade_off, got 'best'; bootstrap.confidence must be a "
              "number in (0, 1), got 1")]
    for call, error, message in cases:
        with pytest.raises(error) as err:
            call()
        assert str(err.value) == message


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


# --- the pre-run check: a bounded option's value is in its range (the range stated once, in the signature) -------

def test_every_out_of_range_value_is_reported_at_once_before_any_work(tmp_path, cfg_train, cfg_eval):
    """`batch_size: PositiveInt` in a target's signature is the one statement of its range: the pre-run check
    reports every value outside it, beside the unknown keys, before anything is built (the data module's, the
    generalist recipe's, a generative backend's: they had seven hand-written checks, each raised when built)."""
    from microbench.errors import UserError
    from microbench.tasks.registry import evaluate, train

    with pytest.raises(UserError) as err:
        train(cfg_train(["experiment=demo", "data.batch_size=0", "data.num_workers=-1", "model.epochs=2.5",
                         "model.lr=0", "+trainer.max_epoch=3", f"checkpoint_dir={tmp_path / 'ck'}"]))
    assert str(err.value).startswith("5 config problem(s), nothing was run: ")
    for clause in ("trainer.max_epoch is not an option", "data.batch_size must be an integer >= 1, got 0",
                   "data.num_workers must be an integer >= 0, got -1", "model.epochs must be an integer >= 1, got 2.5",
                   "model.lr must be a number > 0, got 0"):
        assert clause in str(err.value), clause
    assert not (tmp_path / "ck").exists() and not (tmp_path / ".cache").exists()
    with pytest.raises(UserError, match=r"2 config problem\(s\).*model.max_concurrency must be an integer >= 1, got "
                                        r"0; model.timeout_s must be a number > 0, got -1"):
        evaluate(cfg_eval(["model=openai_compatible", "model.max_concurrency=0", "model.timeout_s=-1"]))
    with pytest.raises(UserError, match=r"data.batch_size must be an integer >= 1, got 'abc'"):
        evaluate(cfg_eval(["task=cognition", "data.batch_size=abc"]))


def test_a_bounded_option_is_checked_and_converted_when_built_from_python():
    """The same annotation checks a direct call (`@checked`): a number given as text is converted, a bad one is
    the target's own error naming the option as a config names it."""
    from microbench.data.datamodule import PerceptionDataModule
    from microbench.data.labelled import LabelledDataModule
    from microbench.data.loading import MicroBenchDataError
    from microbench.generative.backends import GenerativeBackendError, OpenAICompatibleBackend

    dm = PerceptionDataModule("sample", batch_size="8", num_workers=0.0)
    assert dm.batch_size == 8 and isinstance(dm.batch_size, int) and dm.num_workers == 0
    with pytest.raises(MicroBenchDataError, match=r"^data.batch_size must be an integer >= 1, got True; "
                                                  r"data.num_workers must be an integer >= 0, got -2$"):
        LabelledDataModule("sample", batch_size=True, num_workers=-2)  # passed on to its parent's __init__
    assert {"batch_size", "num_workers"} <= set(constrained_options(LabelledDataModule))  # read by the pre-run check
    with pytest.raises(GenerativeBackendError, match=r"^model.max_retries must be an integer >= 0, got -1$"):
        OpenAICompatibleBackend("m", max_retries=-1)


@pytest.mark.parametrize("value", [1, 7, "8", 8.0, 0, -3, 2.5, "abc", None, [1], "1e3"])
def test_the_range_check_is_pydantics_reading_of_the_annotation(value):
    """Pinned to pydantic: a value passes exactly when pydantic's own `validate_call` accepts it for the same
    annotation (lax mode), and comes out as the number pydantic makes of it; a bool is refused (not a count)."""

    def target(a: PositiveInt = 1, b: NonNegativeInt = 0, c: PositiveFloat = 1.0):
        return a, b, c

    specs = constrained_options(target)
    assert_read_as_pydantic_reads(target, value, numbers="abc")
    assert check_value("a", specs["a"], True)[1] == "a must be an integer >= 1, got True"


# --- one word for each idea: `task` is what runs, `run_name` what the run is called ------------------------------

def test_run_name_names_the_run_and_the_old_task_name_is_rewritten_or_refused(tmp_path, cfg_eval, capsys):
    """`task_name` (lightning-hydra-template's word) read as the name of `task`; it is `run_name` now: the old
    override is rewritten with a note, a config file that still sets it is one line (it would be ignored), and a
    record or checkpoint written before the rename is read either way."""
    import sys

    from microbench.entry import rename_overrides
    from microbench.errors import UserError
    from microbench.results.record import run_name_of
    from microbench.tasks.validate import check_config

    cfg = cfg_eval([])
    assert cfg.run_name == "eval" and cfg.task == "perception" and "task_name" not in cfg
    argv = ["src/train.py", "experiment=demo", "task_name=my_run"]
    assert rename_overrides(argv, "train") == ["src/train.py", "experiment=demo", "run_name=my_run"]
    assert "note: task_name= is now run_name=" in capsys.readouterr().err
    old_file = cfg_eval(["+task_name=my_run"])  # as a user's experiment file that sets `task_name:` composes
    with pytest.raises(UserError, match=r"^1 config problem\(s\), nothing was run: task_name in the config is now "
                                        r"run_name .*: rename it in your config file$"):
        check_config(old_file)
    assert run_name_of({"run_name": "a"}) == "a" and run_name_of({"task_name": "b"}) == "b"
    assert run_name_of(None) is None and sys.argv  # (argv of this process untouched)


def test_a_fit_started_from_another_is_named_after_that_runs_name(tmp_path):
    """`init_from=<run>` records the chain it continues: a specialist by its specialty, any other fit by its
    run_name (task_name in a record written before the rename; the old code read a top-level `task_name` no record
    has, and always fell back to the checkpoint's file name, "last")."""
    from omegaconf import OmegaConf

    from microbench.tasks.finetune import chain_start

    for name, config in (("new", {"run_name": "demo"}), ("old", {"task_name": "demo_old"})):
        run = tmp_path / name
        run.mkdir()
        (run / "last.ckpt").write_bytes(b"")
        (run / "train_metrics.json").write_text(json.dumps({"config": config,
                                                            "last_checkpoint": str(run / "last.ckpt")}))
        got = chain_start(OmegaConf.create({"init_from": str(run)}))
        assert got == {"job": None, "init_from": str(run / "last.ckpt"),
                       "after": [config.get("run_name") or config["task_name"]]}


def test_every_merge_option_problem_is_reported_at_once_from_the_methods_signatures(tmp_path):
    """A merge method's option ranges were four hand-written check functions, each raising its first problem after
    the last; now the method's signature states them (`p: DropProbability`, `density: Density`, `seeds: Seeds`) and
    every problem of the study's methods, and of the specialists study's merges with the rest of its config, is
    one clause of one error before any work."""
    from conftest import compose_config
    from microbench.errors import UserError
    from microbench.options import Seeds, options_annotations
    from microbench.studies.methods import METHODS, SPECIALIST_MERGES, methods_problems
    from microbench.tasks.registry import specialists

    assert constrained_options(METHODS["dare"].paths) == {"p": DropProbability}
    assert constrained_options(METHODS["ties_trim"].paths) == {"density": Density}
    assert options_annotations(METHODS["dare"].paths)["seeds"] == Seeds
    assert METHODS["dare"].check is None and SPECIALIST_MERGES["ties"].check is None  # no hand-written range check
    names, problems = methods_problems(["dare", "ties_trim", "dare", "nope"],
                                       {"dare": {"p": 1, "seeds": []}, "ties_trim": {"density": 2, "per_tensor": "x"},
                                        "lines": {"depth": 3}})
    assert names == ["dare", "ties_trim", "dare", "nope"]
    assert problems == [
        "study.methods: unknown merge method 'nope'; known: wise_ft, lines, ties_trim, dare, model_stock (a new one "
        "is a function registered with microbench.studies.methods.merge_method)",
        "study.methods=['dare', 'ties_trim', 'dare', 'nope'] names a method twice",
        "study.options.dare.p must be a number in [0, 1), got 1",
        "study.options.dare.seeds must be an integer or a non-empty list, each an integer, got []",
        "study.options.ties_trim.density must be a number in (0, 1], got 2",
        "study.options.ties_trim.per_tensor must be true or false, got 'x'",
        "study.options.lines.depth is not an option of lines; its options: none"]
    out = tmp_path / "s"
    with pytest.raises(UserError, match=r"^1 config problem\(s\), nothing was run: runs is required: pass runs="):
        specialists(compose_config("specialists", [f"paths.output_dir={out}"]))
    with pytest.raises(UserError) as err:
        specialists(compose_config("specialists", [
            f"runs={tmp_path / 'none'}", "merges=[ties,dare]", "merge_options.ties.densities=[0]",
            "merge_options.dare.p=1", "checkpoint=first", "lambdas=0.5", f"paths.output_dir={out}"]))
    assert str(err.value) == (
        "4 config problem(s), nothing was run: checkpoint must be one of last, best, got 'first'; lambdas must be a "
        "list, each a number, got 0.5; merge_options.ties.densities must be a number in (0, 1] or a non-empty list, "
        "each a number in (0, 1], got [0]; merge_options.dare.p must be a number in [0, 1), got 1")
