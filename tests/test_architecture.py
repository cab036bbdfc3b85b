"""The shape of the package, checked from the source so it stays true."""

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
    text = (SRC / "jobs.py").read_text()  # the jobs catch the base only
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


# --- the task layer: dispatch as data, one run record --------------------------------------------------------------

def _imports(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """The microbench modules ``name`` imports anywhere in its source (functions included)."""
    package = name if name in {m for m in modules if (SRC / Path(*m.split(".")[1:]) / "__init__.py").exists()} \
        else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules_counting_imports_inside_functions():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the checker works
    assert _cycles(_graph()) == []


def test_nothing_below_the_task_layer_imports_it():
    graph = _graph()
    entry_points = {"microbench.cli", "microbench.__main__", "microbench.jobs"}  # src/*.py, python -m microbench
    bad = [f"{m} imports {t}" for m, deps in graph.items() if not m.startswith("microbench.tasks")
           and m not in entry_points for t in deps if t.startswith("microbench.tasks")]
    assert not bad, bad
    for name in ("evaluate", "training", "generative_tasks", "localization_tasks", "loggers"):
        assert not (SRC / f"{name}.py").exists(), f"{name}.py is a task file outside tasks/"
    assert not (SRC / "studies" / "run.py").exists()
    tasks = {m.rsplit(".", 1)[1] for m in graph if m.startswith("microbench.tasks.")}
    assert {"perception", "cognition", "localization", "finetune", "linear_probe", "forgetting", "registry",
            "trainer", "records"} <= tasks


def test_only_the_task_layer_reads_hydra_configs():
    allowed = {"microbench.data.config", "microbench.entry", "microbench.jobs"}
    bad = []
    for name, tree in _modules().items():
        if name.startswith("microbench.tasks") or name in allowed:
            continue
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("hydra", "omegaconf")]
    assert not bad, bad


#: underscore attributes read on objects other than ``self``: third-party internals only, never microbench's
THIRD_PARTY_PRIVATE = {"_fingerprint",  # datasets.Dataset's content hash (data/cognition.py)
                       "_version",  # torch.Tensor's in-place version counter (models/backbones/base.py)
                       "_foreach_copy_", "_foreach_lerp_",  # torch's fused list ops (studies/sweep.py)
                       "_paramsEval",  # pycocotools COCOeval: the parameters accumulate() reads (metrics/coco.py)
                       "_target_"}  # a Hydra config key


def test_no_private_attribute_crosses_a_module():
    seen = set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                seen.add((node.attr, name))
    assert {attr for attr, _ in seen} <= THIRD_PARTY_PRIVATE, sorted(a for a in seen if a[0] not in
                                                                      THIRD_PARTY_PRIVATE)


def test_every_job_is_one_copy_that_prints_one_summary_for_every_task():
    from microbench.jobs import JOBS

    tree = ast.parse((SRC / "jobs.py").read_text())
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_job")
    assert not [n for n in ast.walk(run) if isinstance(n, ast.If)], "run_job: a per-task branch"
    prints = [ast.unparse(n) for n in ast.walk(run) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
    assert prints == ["print('\\n'.join(summary(record)))"], prints
    for job in JOBS:  # src/<job>.py is that job and nothing else
        body = ast.parse((REPO / "src" / f"{job}.py").read_text()).body
        calls = [ast.unparse(n) for n in ast.walk(body[-1]) if isinstance(n, ast.Call)]
        assert calls == [f"run_job('{job}')"] and len(body) == 4, job  # docstring, __future__, import, main


def test_every_built_model_config_has_a_target_and_no_overloaded_kind():
    import yaml

    for f in sorted((REPO / "configs" / "model").glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        chain = [cfg]
        while "_target_" not in chain[-1] and chain[-1].get("defaults"):
            parent = chain[-1]["defaults"][0]
            chain.append(yaml.safe_load((REPO / "configs" / "model" / f"{parent}.yaml").read_text()))
        assert "_target_" in chain[-1], f"{f.name} builds nothing: no _target_"
        assert cfg.get("kind") in (None, "open_clip", "hf", "timm"), f"{f.name}: kind={cfg.get('kind')} is not an adapter"


def test_checkpoint_folders_are_configured_where_the_callbacks_are():
    import yaml

    cb = yaml.safe_load((REPO / "configs" / "callbacks" / "default.yaml").read_text())
    assert cb["model_checkpoint"]["dirpath"] == cb["last_checkpoint"]["dirpath"] == "${checkpoint_dir}"
    for f in (SRC / "tasks").glob("*.py"):  # no keyword argument dirpath=... in code
        calls = [k for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call) for k in n.keywords]
        assert "dirpath" not in {k.arg for k in calls}, f"{f.name} injects a checkpoint folder by name"
