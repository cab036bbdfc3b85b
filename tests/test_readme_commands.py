"""Every command of README.md's ``bash`` blocks runs, so the README cannot drift from the code.

Each command is run as written, through the real entry point in its own process (a fork of a Python that imported
the libraries already, ``tests/zygote.py``), with only these changes: the
interpreter is this one; outputs, checkpoints and caches go to a tmp folder; fast settings are appended (fewer
epochs, bootstrap resamples, α values, seeds, COCO's 100 detections an image for the localization fits);
placeholders (``<run>``, ``<time>``, ``out/``, ``logs/``) point at
what the earlier commands of this file produced; ``data/ubench`` is a Hub-layout copy of the sample written with
pyarrow alone; OpenAI-compatible servers are a local scripted server. Commands
that need what this machine cannot have (a GPU, the full release, Hub weights, a cluster) are skipped with that
reason, and any other command makes the test fail until it is classified here.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

#: why a command cannot run offline on a CPU-only machine (first match wins)
CANNOT_RUN = [
    (r"pytest", "the test suite itself"),
    (r"^(pip|microbench) ", "installs into this environment, or runs an installed copy: tests/test_install.py builds "
     "the wheel, installs it into a fresh environment and runs the jobs from outside the checkout"),
    (r"trainer=(gpu|ddp)\b", "needs GPUs"),
    (r"^(srun|torchrun)\b", "needs a cluster"),
    (r"^vllm\b", "starts a vLLM server (GPU)"),
    (r"/path/to/", "a placeholder for the user's own files"),
    (r"model=(biomedclip|gpt4o|hf_vlm)\b", "needs model weights or an API from the internet"),
    (r"model=openclip(?!.*pretrained=null)", "needs the pretrained open_clip weights from the internet"),
    (r"experiment=(linear_probe|finetune_pathology)(?!.*model=tiny)", "the experiment's model needs pretrained "
     "weights from the internet"),
    (r"ConchBackbone", "needs the conch package and its weights"),
    (r"bench_gpu\.py --copy", "the full-size copy on a GPU machine (benchmarks/results/gpu.json)"),
]

FAST = {
    "src/eval.py": ["bootstrap.n_resamples=99"],
    "src/train.py": ["trainer.max_epochs=2", "study.alphas=[0,0.5,1]", "bootstrap.n_resamples=99",
                     "probe.seeds=[0]", "probe.shots=[full,1]", "+trainer.enable_progress_bar=false"],
    "src/forgetting.py": ["study.alphas=[0,0.5,1]", "bootstrap.n_resamples=99"],
    "src/specialists.py": ["bootstrap.n_resamples=99", "lambdas=[0.5,1]", "merge_options.ties.densities=[0.2]"],
}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        current = ""
        for line in block.splitlines():
            if not current and line.strip().startswith("#"):
                continue
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            command = re.sub(r"\s+#.*$", "", current).strip()
            if command:
                out.append(command)
            current = ""
    return out


COMMANDS = readme_commands()
STATE: dict[str, str] = {}


#: what a command leaves for later ones (STATE) and the placeholder by which a later command uses it
PRODUCES = [
    (r"-m experiment=compare_recipes", "recipes"), (r"-m experiment=specialist", "multirun"),
    (r"experiment=detect_nuclei", "detector"),
    (r"^(?!.*(ckpt_path|debug|module\.|-m |checkpoint_dir)).*experiment=demo", "demo"),
]
USES = [("logs/compare_recipes/multiruns/<time>", "recipes"), ("logs/specialists/multiruns/<time>", "multirun"),
        ("checkpoints/detect_nuclei/<time>", "detector"), ("checkpoints/demo/<run>", "demo")]


def command_chains(commands: list[str]) -> list[str]:
    """One group per chain of commands (a command and the later ones that use what it left), each a test class
    that one xdist worker runs in order; the leaderboards and rescoring read every earlier run folder, so they run
    with the evaluations; every other command is its own group, free to run on any worker."""
    parent = list(range(len(commands)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    evaluations, last = [], {}
    for n, command in enumerate(commands):
        uses = [what for placeholder, what in USES if placeholder in command]
        uses += [f"ckpt:{name}" for name in re.findall(r"checkpoints/(\w+)/last\.ckpt", command)]
        for what in uses:
            if what in last:
                parent[root(n)] = root(last[what])
        if re.search(r"src/eval\.py(?!.*task=)|microbench (leaderboard|rescore)", command):
            evaluations.append(n)
        for pattern, what in PRODUCES:
            if re.search(pattern, command):
                last.setdefault(what, n)
        for name in re.findall(r"checkpoint_dir=checkpoints/(\w+)", command):
            last[f"ckpt:{name}"] = n
    for n in evaluations[1:]:
        parent[root(n)] = root(evaluations[0])
    return [f"readme-{min(i for i in range(len(commands)) if root(i) == root(n)):02d}" for n in range(len(commands))]


def _why_not(command: str) -> str | None:
    return next((why for pattern, why in CANNOT_RUN if re.search(pattern, command)), None)


def _as_run(command: str) -> str:
    """The command as it runs once the environment exists (the Quick start's ``bash scripts/setup.sh && ``)."""
    return command.split("&& ", 1)[-1] if command.startswith("bash scripts/setup.sh") else command


def _same_as(n: int) -> int | None:
    """The earlier README command that is this one again (the Quick start's demo, repeated where the README
    explains it), which ran it already."""
    return next((m for m in range(n) if _as_run(COMMANDS[m]) == _as_run(COMMANDS[n])), None)


def _prepare(command: str, tmp: Path, n: int) -> list[str]:
    command = _as_run(command)
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/python", f"unexpected README command form: {command}"
    argv[0] = sys.executable
    subs = {"logs/specialists/multiruns/<time>": STATE.get("multirun", "<no multirun>"),
            "logs/compare_recipes/multiruns/<time>": STATE.get("recipes_multirun", "<no recipes multirun>"),
            "checkpoints/demo/<run>/last.ckpt": STATE.get("demo_last", "<no demo run>"),
            "checkpoints/detect_nuclei/<time>/best_epoch012.ckpt": STATE.get("detect_best", "<no detector run>"),
            "out/": str(tmp.parent), "logs/": str(tmp.parent), "leaderboard/": str(tmp / "leaderboard"),
            "cognition.path=/data/ubench_cognition": "cognition.path=sample", "data/ubench": STATE["copy"],
            **{k: v for k, v in STATE.items() if k.startswith("checkpoints/")}}  # a named checkpoint_dir's ckpt
    argv = [next((v if a == k else a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
    if len(argv) > 1 and argv[1] == "-m":
        return argv
    script = argv[1]
    if script.startswith(("benchmarks/", "scripts/")):  # their own flags; what they write is under out/
        return argv
    argv += FAST.get(script, [])
    if "model.name=ViT-B-32" in command:  # the real architecture, random init: one dataset keeps it quick
        argv += ["data.datasets=[kather_et_al_2016]"]
    if "-m" in argv[2:]:  # a multirun: one folder per job under the sweep folder of paths.log_dir
        if "experiment=specialist" in command:
            return [*argv, f"paths.log_dir={tmp}", f"paths.checkpoint_dir={tmp / 'ckpt'}", "forgetting.enabled=false",
                    "eval_in_domain=false", "specialists_overrides=['bootstrap.n_resamples=99']"]
        return [*argv, f"paths.log_dir={tmp}", f"paths.checkpoint_dir={tmp / 'ckpt'}", "eval_in_domain=false",
                f"study.result_cache={tmp / 'cache'}"]
    argv += [f"paths.output_dir={tmp}"]
    if script == "src/train.py":
        argv += [f"checkpoint_dir={tmp / 'ckpt'}", f"probe.cache_dir={tmp / 'cache'}",
                 f"study.result_cache={tmp / 'cache'}"]
    if script == "src/forgetting.py":
        argv += [f"study.result_cache={tmp / 'cache'}"]
    if "model=openai_compatible" in command:
        argv += [f"model.base_url={STATE['server']}", f"model.cache_dir={tmp / 'responses'}"]
    if "task=localization" in command or "detect_nuclei" in command or "segment_cells" in command:
        argv = [a for a in argv if not a.startswith(("forgetting.", "probe."))]
    if script == "src/train.py" and re.search(r"experiment=(detect_nuclei|segment_cells)\b", command):
        argv += ["module.max_detections=100"]  # COCO's limit: a 2-epoch head passes ~1,000 boxes an image to the mask head
    return argv


@pytest.fixture(scope="module")
def chat_server():
    from microbench.generative.loopback import ScriptedChatServer

    with ScriptedChatServer(reply=lambda body: "A") as srv:
        STATE["server"] = srv.base_url
        yield srv


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_rows):
    from conftest import write_raw_hub_copy

    out = tmp_path_factory.mktemp("readme")
    STATE["copy"] = str(write_raw_hub_copy(sample_rows, out / "ubench_copy", n_shards=2))
    return out


def run_readme_command(n: int, runs: Path) -> None:
    command = COMMANDS[n]
    why = _why_not(command)
    if why:
        pytest.skip(f"README command {n} not run here ({why}): {command}")
    if _same_as(n) is not None:
        pytest.skip(f"README command {n} is README command {_same_as(n)} again, which ran it: {command}")
    tmp = runs / f"cmd{n:02d}"
    argv = _prepare(command, tmp, n)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp)}
    res = run_cli(argv[1:], cwd=REPO, env=env, timeout=600)  # argv[0] is this interpreter
    assert res.returncode == 0, f"README command {n} failed: {command}\n{' '.join(argv)}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    if "-m" in argv[2:]:  # a Hydra multirun (not ``python -m microbench ...``)
        jobs = [p for p in tmp.rglob("train_metrics.json")]
        swept = next(a for a in shlex.split(command) if "=" in a and "," in a.split("=", 1)[1]
                     and not a.split("=", 1)[1].startswith("["))
        assert len(jobs) == swept.split("=", 1)[1].count(",") + 1, jobs
        assert all((p.parent / ".hydra").is_dir() for p in jobs), "each job's Hydra log in its own folder"
        if "experiment=compare_recipes" in command:  # the recipes table when every job was done
            (sweep,) = (tmp / "compare_recipes" / "multiruns").iterdir()
            assert (sweep / "recipes" / "recipes.md").is_file(), res.stdout[-2000:]
            STATE["recipes_multirun"] = str(sweep)
            return
        (STATE["multirun"],) = map(str, (tmp / "specialists" / "multiruns").iterdir())
        if "study_specialists=true" in command:  # the study ran when every job was done, into <sweep>/study/
            study = Path(STATE["multirun"]) / "study" / "specialists.json"
            assert study.is_file(), res.stdout[-2000:]
            if "chain=true" in command:
                import json

                assert json.loads(study.read_text())["chain"] is True
    elif "src/" in argv[1]:
        assert (tmp / ".hydra").is_dir(), "the Hydra log must be in the run's own folder"
    named = re.search(r"checkpoint_dir=(checkpoints/\S+)", command)
    if named:  # a later command names its checkpoint: checkpoints/<name>/last.ckpt
        STATE[named.group(1).rstrip("/") + "/last.ckpt"] = str(tmp / "ckpt" / "last.ckpt")
    elif "experiment=demo" in command and "ckpt_path" not in command and "debug" not in command \
            and "module." not in command:  # the demo's own recipe (not its LoRA / LP-FT variants)
        STATE["demo_last"] = next(str(p) for p in (tmp / "ckpt").glob("last.ckpt"))
    if "experiment=demo" in command and "forgetting.enabled=false" not in command and "ckpt_path" not in command \
            and "debug" not in command:
        assert "forgetting report:" in res.stdout.splitlines()[-1]
    if "experiment=detect_nuclei" in command:
        STATE["detect_best"] = next(str(p) for p in (tmp / "ckpt").glob("best_epoch*.ckpt"))
    if "leaderboard" in command:
        assert (tmp / "leaderboard" / "leaderboard.md").exists()
    if "bench_gpu.py" in command:  # a warm and a cold evaluation of the same images, timed
        import json

        out = json.loads(Path(argv[argv.index("--out") + 1]).read_text())["models"]["microbench-tiny"]["fp32"]
        assert out["eval_warm"]["images"] == out["eval_cold"]["images"] > 100 and out["warm_over_cold"] > 0
    if argv[1].endswith("src/specialists.py"):
        assert (tmp / "specialists.md").read_text().startswith("# Specialists study")


def _chain(ns: list[int]):
    """A class of one chain of commands (pyproject's ``--dist loadscope``: a class runs on one worker, in order)."""
    @pytest.mark.slow
    @pytest.mark.parametrize("n", ns, ids=[f"{n:02d}" for n in ns])
    def test_readme_command_runs(self, n, runs, chat_server):
        run_readme_command(n, runs)
    return type(f"TestReadme{ns[0]:02d}", (), {"test_readme_command_runs": test_readme_command_runs,
                                                "__doc__": f"README commands {ns}, in order"})


CHAINS: dict[str, list[int]] = {}
for _n, _group in enumerate(command_chains(COMMANDS)):
    CHAINS.setdefault(_group, []).append(_n)
for _ns in CHAINS.values():
    globals()[f"TestReadme{_ns[0]:02d}"] = _chain(_ns)


def test_every_readme_command_is_classified():
    """A new README command either runs above or names why it cannot (a GPU, the full release...)."""
    assert len(COMMANDS) >= 30
    runnable = [c for c in COMMANDS if not _why_not(c)]
    assert len(runnable) >= 20, runnable
    for c in runnable:
        head = shlex.split(c.split("&& ", 1)[-1])
        assert head[0] == ".venv/bin/python" and (head[1] == "-m" or Path(REPO / head[1]).is_file()), c
