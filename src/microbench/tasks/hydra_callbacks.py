"""Hydra callbacks of the specialists multirun (``configs/experiment/specialist.yaml``).

:class:`SpecialistsStudyAtEnd`: with ``study_specialists=true``, when every job of ``python src/train.py -m
experiment=specialist specialty=a,b,c`` has returned, run ``python src/specialists.py`` on the multirun's folder
(``chain`` passed on), written to ``<sweep>/study/``. It runs on the machine that launched the multirun (as Hydra
runs callbacks), in a fresh process: the jobs' memory is not shared with the study.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from microbench.errors import UserError
from microbench.resources import CHECKOUT

log = logging.getLogger(__name__)


def study_command(config: DictConfig) -> list[str] | None:
    """The ``src/specialists.py`` command for this multirun (None when ``study_specialists`` is off)."""
    if not config.get("study_specialists"):
        return None
    sweep = Path(str(config.hydra.sweep.dir))
    extra = [str(x) for x in (config.get("specialists_overrides") or [])]
    job = [str(CHECKOUT / "src" / "specialists.py")] if CHECKOUT else ["-m", "microbench", "specialists"]
    return [sys.executable, *job, f"runs={sweep}",
            f"chain={str(bool(config.get('chain'))).lower()}", f"paths.output_dir={sweep / 'study'}", *extra]


class SpecialistsStudyAtEnd(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        argv = study_command(config)
        if argv is None:
            return
        print(f"specialists study of the multirun: {' '.join(argv[1:])}", flush=True)
        res = subprocess.run(argv, check=False)
        if res.returncode != 0:
            print(f"error: the specialists study after the multirun failed (exit {res.returncode}); the specialists "
                  f"are trained: rerun it with {' '.join(argv[1:])}", file=sys.stderr, flush=True)
            raise SystemExit(res.returncode)


class RecipesTableAtEnd(Callback):
    """With ``compare_recipes=true`` (``experiment=compare_recipes``): when every recipe's job has returned, the
    recipes table of the multirun (:func:`microbench.results.recipes.compare`, ``<sweep>/recipes/``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("compare_recipes"):
            return
        from microbench.results.recipes import compare

        sweep = Path(str(config.hydra.sweep.dir))
        try:
            result = compare(sweep, sweep / "recipes")
        except UserError as err:
            print(f"error: recipes table of {sweep}: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        print(f"recipes: {sweep / 'recipes' / 'recipes.md'} ({len(result['recipes'])} recipes; plot recipes.png)",
              flush=True)
