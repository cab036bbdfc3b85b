"""Shared fixtures. Every test is offline and hermetic: the environment is set before any Hugging Face import."""

from __future__ import annotations

import os
import tempfile

_HERMETIC = tempfile.mkdtemp(prefix="microbench-tests-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_DIR": _HERMETIC,
    "WANDB_CACHE_DIR": _HERMETIC,
    "HF_HOME": os.path.join(_HERMETIC, "hf"),
    "HF_DATASETS_CACHE": os.path.join(_HERMETIC, "hf", "datasets"),
    "TOKENIZERS_PARALLELISM": "false",
    "MICROBENCH_PIXEL_CACHE": "null",  # each test decodes (what it counts is its own); tests of the cache pass one
})
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several workers on the machine's cores: one thread each, so the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers (and the CLIs they start) do not oversubscribe them

_SESSION_ENV = dict(os.environ)  # what every CLI of the suite inherits, unless a test says otherwise

import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from microbench.data import schema  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _sample_is_never_written():
    """`datasets` writes cache files next to memory-mapped sources; no test may leave one in data/sample."""
    folder = REPO / "data" / "sample"
    before = sorted(p.name for p in folder.rglob("*"))
    yield
    after = sorted(p.name for p in folder.rglob("*"))
    assert after == before, f"tests wrote into data/sample: {sorted(set(after) - set(before))}"


@pytest.fixture(scope="session", autouse=True)
def _no_run_folders_in_the_checkout():
    """Every test writes its runs under a tmp folder: none may leave logs/, checkpoints/ or outputs/ behind."""
    def listing():
        return {d: sorted(p.relative_to(REPO).as_posix() for p in (REPO / d).glob("*/*"))
                for d in ("logs", "checkpoints", "outputs", "multirun") if (REPO / d).is_dir()}

    before = listing()
    yield
    after = listing()
    new = {d: sorted(set(v) - set(before.get(d, []))) for d, v in after.items()}
    assert not any(new.values()), f"tests left run folders in the checkout: {new}"


@pytest.fixture(scope="session")
def sample():
    """The committed sample, loaded once: (datasets.Dataset, DataSource)."""
    from microbench.data.loading import load_ubench

    return load_ubench("sample")


@pytest.fixture(scope="session")
def sample_table(sample):
    from microbench.data.questions import build_question_table

    return build_question_table(sample[0])


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# --- an independent writer: Arrow IPC stream shards made with pyarrow alone, schema as in ubench-format.md ------

_ENTRY = [("id", pa.string()), ("name", pa.string()), ("question", pa.string())]


def raw_arrow_schema(bbox_layout: str = "list_of_structs") -> pa.Schema:
    """The Hub schema written by hand (no `datasets` involved), as documented in ubench-format.md §2."""
    caption = pa.struct([*_ENTRY, ("answer_idx", pa.string()), ("options", pa.list_(pa.string())),
                         ("tags", pa.list_(pa.string()))])
    question = pa.struct([("answer", pa.string()), ("answer_idx", pa.int64()), ("id", pa.string()),
                          ("name", pa.string()), ("options", pa.list_(pa.string())), ("question", pa.string()),
                          ("tags", pa.list_(pa.string()))])
    points = pa.struct([(k, pa.float32()) for k in ("x1", "y1", "x2", "y2")])
    if bbox_layout == "list_of_structs":
        bbox = pa.list_(pa.struct([("className", pa.string()), ("points", points)]))
        polygon = pa.list_(pa.struct([("className", pa.string()), ("points", pa.list_(pa.float32()))]))
    else:  # dict of lists
        bbox = pa.struct([("className", pa.list_(pa.string())), ("points", pa.list_(points))])
        polygon = pa.struct([("className", pa.list_(pa.string())), ("points", pa.list_(pa.list_(pa.float32())))])
    fields = [
        ("image_id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("label", pa.int64()), ("label_name", pa.string()), ("dataset", pa.string()), ("domain", pa.string()),
        ("institution", pa.string()), ("license", pa.string()), ("microns_per_pixel", pa.float32()),
        ("modality", pa.string()), ("ncbitaxon_id", pa.string()), ("ncbitaxon_name", pa.string()),
        ("pmid", pa.string()), ("split", pa.string()), ("stain", pa.string()), ("subdomain", pa.string()),
        ("submodality", pa.string()), ("synthetic", pa.bool_()),
        ("captions", pa.struct([(k, caption) for k in schema.CAPTION_KEYS])),
        ("questions", pa.struct([(k, question) for k in schema.QUESTION_TYPES])),
        ("bbox", bbox), ("polygon", polygon),
    ]
    return pa.schema(fields)


def _to_dict_of_lists(items):
    if items is None:
        return None
    return {k: [it[k] for it in items] for k in items[0]}


def write_raw_hub_copy(rows: list[dict], root: Path, n_shards: int = 3, bbox_layout: str = "list_of_structs",
                       info: bool = False) -> Path:
    """Write rows as ``root/perception/0.1.0/ubench-test-0000k-of-0000N.arrow`` with pyarrow only."""
    sch = raw_arrow_schema(bbox_layout)
    if bbox_layout != "list_of_structs":
        rows = [dict(r, bbox=_to_dict_of_lists(r["bbox"]), polygon=_to_dict_of_lists(r["polygon"])) for r in rows]
    folder = root / "perception" / "0.1.0"
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), n_shards + 1).round().astype(int)
    for k in range(n_shards):
        part = pa.Table.from_pylist(rows[bounds[k]:bounds[k + 1]], schema=sch)
        with pa.OSFile(str(folder / f"ubench-test-{k:05d}-of-{n_shards:05d}.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, sch) as writer:
            writer.write_table(part)
    if info:
        (folder / "dataset_info.json").write_text(json.dumps({"description": "test copy"}))
    return root


@pytest.fixture(scope="session")
def sample_rows():
    """The committed sample's rows as plain Python dicts (raw Arrow view: captions/questions as nested dicts).

    Read from ``data/sample``, never regenerated: only ``test_sample`` compares regenerated data with the copy."""
    from microbench.data.loading import SAMPLE_DIR

    tables = []
    for shard in sorted((SAMPLE_DIR / "perception" / "0.1.0").glob("*.arrow")):
        with pa.OSFile(str(shard)) as f:
            tables.append(pa.ipc.open_stream(f).read_all())
    return pa.concat_tables(tables).to_pylist()


def copy_without_column(column: str, root: Path) -> Path:
    """The committed sample as one Hub-layout shard without ``column``, beside the sample's own
    ``dataset_info.json`` (which still lists it): a copy edited by hand, or exported by another tool."""
    import shutil

    from microbench.data.loading import SAMPLE_DIR

    tables = []
    for shard in sorted((SAMPLE_DIR / "perception" / "0.1.0").glob("*.arrow")):
        with pa.OSFile(str(shard)) as f:
            tables.append(pa.ipc.open_stream(f).read_all())
    part = pa.concat_tables(tables).drop_columns([column])
    folder = root / "perception" / "0.1.0"
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "ubench-test-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, part.schema) as writer:
        writer.write_table(part)
    shutil.copy(SAMPLE_DIR / "perception" / "0.1.0" / "dataset_info.json", folder)
    return root


# --- command-line runs: through a pre-imported, forking Python (tests/zygote.py) when that is the same -----------

#: environment variables a child may set differently from the server's: read when a run needs them, never at import
#: (pytest's own, PYTEST_CURRENT_TEST, change with every test; Lightning and torch.compile set the others in the
#: tests' process, and read them when a run asks for CUDA, compiles or seeds: every in-process fit's
#: seed_everything sets PL_GLOBAL_SEED and PL_SEED_WORKERS, an in-process ddp_spawn MASTER_PORT, a deterministic
#: Trainer CUBLAS_WORKSPACE_CONFIG (read when cuBLAS starts): each sent every later CLI of that worker to a fresh
#: interpreter, ~6 s of imports each)
_RUNTIME_ENV = re.compile(r"^(WANDB_|MICROBENCH_|PYTEST_)|^(PYTHONUNBUFFERED|PYTORCH_NVML_BASED_CUDA_CHECK|"
                          r"TORCHINDUCTOR_CACHE_DIR|PL_GLOBAL_SEED|PL_SEED_WORKERS|MASTER_ADDR|MASTER_PORT|"
                          r"CUBLAS_WORKSPACE_CONFIG)$")


class _Zygote:
    """One ``tests/zygote.py`` per test process, started with the session (it imports while the first tests run),
    closed when the process ends."""

    proc = None
    ready = False

    @classmethod
    def start(cls):
        import atexit
        import subprocess

        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py")], cwd=REPO, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_SESSION_ENV)
            cls.ready = False
            atexit.register(cls.proc.kill)

    @classmethod
    def get(cls):
        cls.start()
        if not cls.ready:
            assert json.loads(cls.proc.stdout.readline()).get("ready"), "tests/zygote.py did not start"
            cls.ready = True
        return cls.proc


@pytest.fixture(scope="session", autouse=True)
def _zygote_imports_while_the_first_tests_run():
    if not os.environ.get("MICROBENCH_TESTS_NO_ZYGOTE"):
        _Zygote.start()


def _same_as_a_fresh_python(args: list[str], env: dict[str, str]) -> bool:
    if not args or (args[0].startswith("-") and args[0] != "-m") or (args[0] == "-m" and len(args) < 2):
        return False
    if os.environ.get("MICROBENCH_TESTS_NO_ZYGOTE"):
        return False
    base = _SESSION_ENV
    changed = {k for k in set(base) | set(env) if base.get(k) != env.get(k)}
    return all(_RUNTIME_ENV.match(k) for k in changed)


def run_cli(args, cwd=REPO, env=None, timeout=600):
    """``subprocess.run([sys.executable, *args], capture_output=True, text=True, ...)``, in a fresh fork of a
    Python that has imported torch, Lightning and open_clip already (``tests/zygote.py``: ~7 s less per run), or in
    a real interpreter when a fork could differ from it (an import-time variable changed, an interpreter flag)."""
    import subprocess

    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    if not _same_as_a_fresh_python(args, env):
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    import signal
    import threading

    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _Zygote.get()
        proc.stdin.write(json.dumps({"argv": args, "cwd": str(cwd), "env": env, "stdout": out, "stderr": err}) + "\n")
        proc.stdin.flush()
        pid = json.loads(proc.stdout.readline())["pid"]
        timer = threading.Timer(timeout, os.killpg, (pid, signal.SIGKILL))  # as subprocess.run's timeout
        timer.start()
        status = json.loads(proc.stdout.readline())["status"]
        timer.cancel()
        read = [Path(path).read_text(errors="replace") for path in (out, err)]
        if timer.finished.is_set() and status == -signal.SIGKILL:
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout, *read)
        return subprocess.CompletedProcess([sys.executable, *args], status, *read)


def run_entry(job: str, overrides: list[str], capsys) -> tuple[int, list[str], object]:
    """(exit code, stderr ``error:`` lines, result) of one job run in this process as its entry point runs it
    (``configs/<job>.yaml`` composed with ``overrides``, its task inside ``exit_on_user_error``), without a
    process: for the many cases that check what a run says and leaves behind."""
    from microbench.errors import exit_on_user_error
    from microbench.jobs import JOBS
    from microbench.tasks import registry

    capsys.readouterr()
    result, code = None, 0
    try:
        with exit_on_user_error():
            result = getattr(registry, JOBS[job])(compose_config(job, overrides))
    except SystemExit as stop:
        code = int(stop.code)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")], result


def one_line_error(job: str, overrides: list[str], capsys, *expect: str) -> str:
    """The one ``error:`` line (exit 2) of a job that must stop on a user's mistake, holding each of ``expect``."""
    code, errors, _ = run_entry(job, overrides, capsys)
    assert code == 2 and len(errors) == 1, (code, errors)
    for text in expect:
        assert text in errors[0], errors[0]
    return errors[0]


# --- configs: every test composes through these (as lightning-hydra-template's cfg_train / cfg_eval) -------------

def compose_config(name: str, overrides=(), config_dir: Path | None = None):
    """``configs/<name>.yaml`` composed with ``overrides``, as the entry point would see it (no Hydra run)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir or REPO / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides or []))


def build_model(name: str, **overrides):
    """The backbone of ``model=<name>`` (``configs/model/<name>.yaml``), built as a run builds it."""
    from omegaconf import OmegaConf

    from microbench.tasks.trainer import build_model as build

    return build(OmegaConf.merge(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"), overrides))


def _fast(overrides, tmp_path: Path) -> tuple[str, ...]:
    """``overrides`` and what a test config gets unless the test sets it: its own output folder (the test's
    ``tmp_path``) and 99 bootstrap resamples (enough for a test; the configs' 9999 are for results)."""
    overrides = tuple(str(o) for o in overrides)
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    return (*overrides, *([] if "paths.output_dir" in given else [f"paths.output_dir={tmp_path}"]),
            *([] if "bootstrap.n_resamples" in given else ["bootstrap.n_resamples=99"]))


def _config_fixture(name: str, tmp_path: Path):
    """As lightning-hydra-template's ``cfg_train``: the job's config with the test's overrides and the fast
    defaults of :func:`_fast`."""
    return lambda overrides=(): compose_config(name, _fast(overrides, tmp_path))


@pytest.fixture
def cfg_eval(tmp_path):
    """``cfg_eval([overrides])``: the ``src/eval.py`` config (with the fast test defaults)."""
    return _config_fixture("eval", tmp_path)


@pytest.fixture
def cfg_train(tmp_path):
    """``cfg_train([overrides])``: the ``src/train.py`` config (with the fast test defaults)."""
    return _config_fixture("train", tmp_path)


@pytest.fixture
def cfg_forgetting(tmp_path):
    """``cfg_forgetting([overrides])``: the ``src/forgetting.py`` config (with the fast test defaults)."""
    return _config_fixture("forgetting", tmp_path)


@pytest.fixture(scope="session")
def cfg_data():
    """``cfg_data(name, [overrides])``: one ``configs/data/<name>.yaml`` on its own."""
    return lambda name, overrides=(): compose_config(name, overrides, config_dir=REPO / "configs" / "data")


@pytest.fixture(autouse=True)
def _fresh_text_cache():
    """Each test starts with an empty text-embedding cache (what it counts is its own encodings)."""
    from microbench.models.inference import TEXT_CACHE

    TEXT_CACHE.clear()
    yield


@pytest.fixture(autouse=True)
def _one_ddp_test_at_a_time(request, tmp_path_factory):
    """Tests whose name says ``ddp`` start two ranks each: one at a time across the xdist workers (four ranks
    busy-waiting on two cores run many times slower), by a lock file every worker of the session shares."""
    if "ddp" not in request.node.originalname:
        yield
        return
    from filelock import FileLock

    with FileLock(str(tmp_path_factory.getbasetemp().parent / "ddp-tests.lock")):
        yield
