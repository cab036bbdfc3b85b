"""The one reader of the forgetting study's configuration: the ``study`` group (``configs/study/<method>.yaml``) and
the root ``bootstrap`` settings → a :class:`~microbench.studies.forgetting.StudySpec`, for the study after a fit
(:func:`forgetting_callback`), ``src/forgetting.py`` and anything later that studies
forgetting."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from microbench.data.config import make_eval_dm, whole_benchmark_cfg
from microbench.entry import RENAMED
from microbench.errors import UserError
from microbench.studies.callback import ForgettingCallback
from microbench.studies.forgetting import STUDY_CONFIG_KEYS, StudySpec, check_study_model, spec_problems
from microbench.tasks.trainer import build_model
from microbench.tasks.validate import unknown_keys


def moved_key_problems(cfg: DictConfig) -> list[str]:
    """A config file (an experiment, a user's YAML) that still sets a study setting under its old name would be
    silently ignored: one line naming the new key instead (command-line overrides are rewritten by
    :func:`microbench.entry.rename_overrides`)."""
    fg = cfg.get("forgetting") or {}
    moved = {**{f"forgetting.{k}": v for k, v in ((k, RENAMED["train"].get(f"forgetting.{k}")) for k in fg) if v},
             **{k: v for k, v in RENAMED["forgetting"].items() if "." not in k and k in cfg},
             **({"selection.keep_target_gain": "study.selection.keep_target_gain"}
                if "keep_target_gain" in (cfg.get("selection") or {}) else {})}
    return [f"{old} in the config has moved to {new} (the `study` config group, configs/study/): rename it in your "
            "config file" for old, new in moved.items()]


#: the keys of the ``study`` group (configs/study/common.yaml), each a field of StudySpec (STUDY_CONFIG_KEYS)
STUDY_KEYS = {k.split(".")[1] for k in STUDY_CONFIG_KEYS.values() if k.startswith("study.")}
SELECTION_KEYS = {k.split(".")[2] for k in STUDY_CONFIG_KEYS.values() if k.startswith("study.selection.")}


def _study_values(cfg: DictConfig) -> dict:
    """The StudySpec fields a config sets, as plain values (unconverted: :func:`spec_problems` reads them)."""
    out, unset = {}, object()
    for name, key in STUDY_CONFIG_KEYS.items():
        value = OmegaConf.select(cfg, key, default=unset)
        if value is unset:
            continue
        out[name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if isinstance(out.get("methods"), str):
        out["methods"] = [out["methods"]]
    if out.get("options") is None:
        out.pop("options", None)
    return out


def _checked_study(cfg: DictConfig) -> tuple[dict, list[str]]:
    """The StudySpec fields the config sets, converted, and every problem of its study settings."""
    problems = moved_key_problems(cfg)
    st = cfg.get("study")
    if st is None:
        return {}, [*problems, "no study settings in the config: add 'study: wise_ft' to its defaults (configs/study/)"]
    problems += unknown_keys(set(st), STUDY_KEYS, "study", "a study setting")
    if isinstance(st.get("selection"), DictConfig):
        problems += unknown_keys(set(st.selection), SELECTION_KEYS, "study.selection", "a study setting")
    values, refused = spec_problems(_study_values(cfg))
    return values, problems + refused


def study_problems(cfg: DictConfig) -> list[str]:
    """Every problem of the config's study settings, one clause each with its fix: moved keys, keys the study does
    not read, and the values :class:`StudySpec`'s annotations and checks refuse (read by the pre-run check)."""
    return _checked_study(cfg)[1]


def study_spec(cfg: DictConfig) -> StudySpec:
    """``cfg.study`` + ``cfg.bootstrap`` as a checked :class:`StudySpec` (every problem at once, one line)."""
    values, problems = _checked_study(cfg)
    if problems:
        raise UserError("; ".join(problems))
    return StudySpec(**values)


# --- the study after a fit (the fine-tune's and the localization fit's) -------------------------------------------

def forgetting_callback(cfg: DictConfig, backbone, out_dir: Path, **extra) -> ForgettingCallback | None:
    """With ``forgetting.enabled``: the study after fit (``<out_dir>/forgetting/``) over the whole benchmark of the
    copy ``cfg.data`` reads, with the ``study`` group's settings (:func:`microbench.tasks.study.study_spec`);
    ``extra`` (a localization fit's targets and head sweep) goes to
    :class:`~microbench.studies.callback.ForgettingCallback`."""
    fg = cfg.get("forgetting") or {}
    if not fg.get("enabled"):
        return None
    spec = study_spec(cfg)
    check_study_model(spec, backbone, extra.get("localization") is not None)  # before the fit, not after it
    return ForgettingCallback(partial(make_eval_dm, whole_benchmark_cfg(cfg.data), backbone.preprocess),
                              Path(out_dir) / "forgetting", spec, make_base=partial(build_model, cfg.model), **extra)


def forgetting_summary(study: dict, out_dir: Path) -> tuple[dict, str]:
    """What a fit's record keeps of its study (the report's path, the chosen α) and the summary line naming it."""
    fields = {"report": str(Path(out_dir) / "forgetting" / "forgetting.md"), "chosen_alpha": study["selection"]["alpha"]}
    return fields, (f"{fields['report']} (plots alpha_sweep.png, dataset_deltas.png; chosen α "
                    f"{fields['chosen_alpha']:.2f})")
