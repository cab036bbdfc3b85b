"""Where the presets (``configs/``) and the bundled sample copy are, for a checkout and for any install.

A checkout (or an editable install of one) reads its own ``configs/`` and ``data/sample/``, so an edit there is seen
at once. A wheel or ``pip install .`` ships copies of both inside the package (``microbench/shipped/``, put there by
``setup.py`` at build time), so ``python -m microbench eval ...`` works from any folder with no checkout at all.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _checkout() -> Path | None:
    root = _HERE.parents[1]  # <checkout>/src/microbench -> <checkout>
    return root if (root / "configs" / "eval.yaml").is_file() and (root / "src" / "microbench").is_dir() else None


#: the checkout this package runs from (None for an installed copy)
CHECKOUT: Path | None = _checkout()
#: the Hydra configs: every ``model=``, ``data=``, ``experiment=``... preset
CONFIG_DIR: Path = CHECKOUT / "configs" if CHECKOUT else _HERE / "shipped" / "configs"
#: the committed sample copy (``data.path=sample``), in the Hub's own layout
SAMPLE_DIR: Path = CHECKOUT / "data" / "sample" if CHECKOUT else _HERE / "shipped" / "sample"
#: what an installed package ships, as (folder in the checkout, folder under ``microbench/shipped/``)
SHIPPED = (("configs", "configs"), ("data/sample", "sample"))
