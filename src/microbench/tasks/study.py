"""The one reader of the forgetting study's configuration: the ``study`` group (``configs/study/<method>.yaml``) and
the root ``bootstrap`` settings → a :class:`~microbench.studies.forgetting.StudySpec`, for the study after a fit
(:func:`forgetting_callback`), ``src/forgetting.py`` and anything later that studies
forgetting."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from microbench.data.config import make_eval_dm, whole_benchmark_cfg
from microbench.errors import UserError
from microbench.studies.callback import ForgettingCallback
from microbench.studies.forgetting import StudySpec, check_study_model, study_alphas
from microbench.tasks.trainer import build_model


def check_moved_keys(cfg: DictConfig) -> None:
    """A config file (an experiment, a user's YAML) that still sets a study setting under its old name would be
    silently ignored: one line naming the new key instead (command-line overrides are rewritten by
    :func:`microbench.entry.rename_overrides`)."""
    from microbench.entry import RENAMED

    fg = cfg.get("forgetting") or {}
    moved = {**{f"forgetting.{k}": v for k, v in ((k, RENAMED["train"].get(f"forgetting.{k}")) for k in fg) if v},
             **{k: v for k, v in RENAMED["forgetting"].items() if "." not in k and k in cfg},
             **({"selection.keep_target_gain": "study.selection.keep_target_gain"}
                if "keep_target_gain" in (cfg.get("selection") or {}) else {})}
    if moved:
        old, new = next(iter(moved.items()))
        raise UserError(f"{old} in the config has moved to {new} (the `study` config group, configs/study/): "
                        f"rename it in your config file{f' (and {len(moved) - 1} more)' if len(moved) > 1 else ''}")


def study_spec(cfg: DictConfig) -> StudySpec:
    """``cfg.study`` + ``cfg.bootstrap`` as a checked :class:`StudySpec` (every bad value one line)."""
    check_moved_keys(cfg)
    st = cfg.get("study")
    if st is None:
        raise UserError("no study settings in the config: add 'study: wise_ft' to its defaults (configs/study/)")
    sel = st.get("selection") or {}
    boot = cfg.get("bootstrap") or {}
    options = OmegaConf.to_container(st.get("options") or {}, resolve=True)
    methods = st.get("methods")
    methods = [methods] if isinstance(methods, str) else list(methods or [])
    try:
        return StudySpec(
            alphas=study_alphas(OmegaConf.to_container(st.alphas) if not isinstance(st.alphas, str | int | float)
                                else st.alphas, bool(st.get("extrapolate", False))),
            towers=str(st.get("towers", "both")), keep_target_gain=float(sel.get("keep_target_gain", 0.8)),
            n_resamples=int(boot.get("n_resamples", 9999)), methods=tuple(str(m) for m in methods), options=options,
            selection=str(sel.get("rule", "keep_gain")), trade_off_weight=float(sel.get("trade_off_weight", 2.0)),
            extrapolate=bool(st.get("extrapolate", False)), confidence=float(boot.get("confidence", 0.95)),
            seed=int(boot.get("seed", 0)), result_cache=st.get("result_cache"),
            feature_probe=bool(st.get("feature_probe", False)))
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # e.g. study.selection.keep_target_gain=abc
        raise UserError(f"study settings: {err}") from None


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
