"""The configured experiment loggers (``logger=csv|wandb|null``), built once per run, checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def check_loggers(cfg: DictConfig) -> None:
    """``logger=wandb`` without a login and without an offline mode would stop at the first log call (or prompt
    for a key): say how to log in or go offline, before any work."""
    from microbench.errors import UserError

    for name, lg in (cfg.get("logger") or {}).items():
        if lg is None or not str(lg.get("_target_", "")).endswith("WandbLogger"):
            continue
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if lg.get("offline") or mode in ("offline", "dryrun", "disabled") or _wandb_logged_in():
            continue
        raise UserError(f"logger={name} needs a W&B login: run `wandb login` (or set WANDB_API_KEY), or log offline "
                        "with WANDB_MODE=offline (or logger.wandb.offline=true) and `wandb sync` later")


def make_loggers(cfg: DictConfig) -> list:
    """The loggers of ``cfg.logger`` (an empty list for ``logger=null``)."""
    check_loggers(cfg)
    return [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
