"""The one reader of the forgetting study's configuration: the ``study`` group (``configs/study/<method>.yaml``) and
the root ``bootstrap`` settings → a :class:`~microbench.studies.forgetting.StudySpec`, for the study after a fit
(:func:`microbench.tasks.trainer.forgetting_callback`), ``src/forgetting.py`` and anything later that studies
forgetting."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from microbench.errors import UserError
from microbench.studies.forgetting import StudySpec, study_alphas


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
