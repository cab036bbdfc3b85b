"""The shared start of the Hydra entry points (``src/eval.py``, ``src/train.py``, ``src/forgetting.py``)."""

from __future__ import annotations

import os
from pathlib import Path


def set_project_root(script: str) -> Path:
    """``PROJECT_ROOT`` (read by ``configs/paths``) = the checkout holding ``src/<script>``, unless already set.

    Running ``python src/<script>.py`` puts ``src/`` first on ``sys.path``, so ``microbench`` imports from a plain
    checkout as well as from an installed copy.
    """
    root = Path(script).resolve().parents[1]
    os.environ.setdefault("PROJECT_ROOT", str(root))
    return root
