"""The shape of the package (issue 14), checked from the source so it stays true."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "microbench"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        name = ".".join(("microbench", *f.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(f.read_text())
    return out


def test_no_module_imports_another_modules_underscore_names():
    bad = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):  # in functions too
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("microbench"):
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def test_the_user_error_base_is_at_the_bottom_and_every_user_error_subclasses_it():
    from microbench import errors
    from microbench.checkpoints import CheckpointError
    from microbench.data.loading import MicroBenchDataError
    from microbench.generative.backends import GenerativeBackendError
    from microbench.models.backbones.base import BackboneError
    from microbench.studies.merging import MergeError

    tree = _modules()["microbench.errors"]
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not [n for n in imports if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("microbench")]
    for cls in (MicroBenchDataError, BackboneError, MergeError, CheckpointError, GenerativeBackendError):
        assert issubclass(cls, errors.UserError), cls
    for entry in ("eval.py", "train.py", "forgetting.py"):  # the entry points catch the base only
        text = (REPO / "src" / entry).read_text()
        assert "from microbench.errors import exit_on_user_error" in text and "Error" not in text.replace(
            "exit_on_user_error", "")


def test_distributed_helpers_live_in_one_public_module():
    bad = []
    for name, tree in _modules().items():
        if name == "microbench.distributed":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("all_gather_object", "get_world_size", "get_rank"):
                bad.append(f"{name}: dist.{node.attr}")
            if isinstance(node, ast.ImportFrom | ast.Import) and any(
                    a.name in ("torch.distributed",) for a in node.names):
                bad.append(f"{name}: import torch.distributed")
    assert not bad, bad


def test_tests_compose_configs_through_the_shared_fixtures():
    for f in sorted((REPO / "tests").glob("test_*.py")):
        if f.name == Path(__file__).name:
            continue
        text = f.read_text()
        assert "initialize_config_dir" not in text, f"{f.name} composes configs itself: use cfg_eval/cfg_train/..."
