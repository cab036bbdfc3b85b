"""Ships the presets (configs/) and the sample copy (data/sample/) inside the package of a built wheel or a
``pip install .``, as microbench/shipped/ (microbench.resources finds them there); an editable install reads the
checkout's own folders instead. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = (("configs", "configs"), ("data/sample", "sample"))  # as microbench.resources.SHIPPED


class BuildWithPresets(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for src, dst in SHIPPED:
            target = Path(self.build_lib) / "microbench" / "shipped" / dst
            shutil.copytree(Path(src), target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".cache*"))


setup(cmdclass={"build_py": BuildWithPresets})
