"""A Python with the heavy libraries already imported that forks one child per command-line run.

Every CLI the tests run (``src/*.py``, ``python -m microbench``, the README's commands) would otherwise pay ~7 s of
imports (torch, Lightning with torchmetrics, open_clip, timm) before it does anything: half of a typical CLI test.
This server imports them once; each request forks a child that becomes the command exactly as ``python <script>
<args>`` would be (its own process, ``sys.argv``, ``sys.path[0]``, working directory, environment, stdin from
/dev/null, stdout and stderr to files, its own process group, its exit code), then runs the script as ``__main__``.
The parent never runs a tensor operation, so no thread pool exists to be lost across the fork.

Protocol, one JSON line each way: the tests send ``{"argv", "cwd", "env", "stdout", "stderr"}``; the server
answers ``{"pid"}`` once the child started, then ``{"status"}`` (as ``subprocess.returncode``) when it ended.
``conftest.run_cli`` is the client, and runs a command through a real interpreter instead whenever the request
could differ from a fresh one (an environment variable that a preloaded library reads at import, an interpreter
flag, a program other than Python).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import weakref

PRELOAD = ("numpy", "scipy.stats", "pyarrow", "PIL.Image", "torch", "torchvision", "lightning", "lightning.pytorch",
           "torchmetrics", "open_clip", "timm", "hydra", "omegaconf", "datasets", "microbench.tasks.registry",
           "microbench.cli")


def _child(request: dict) -> None:
    """Become the command: ``python <script> <args>`` or ``python -m <module> <args>``."""
    os.setsid()  # its own process group: a timeout kills it and every rank it started
    # what the server made at import is the server's to clean up: a temporary folder removed by the first child's
    # exit would be gone under every later child (wandb makes its media folder at import and removes it at exit)
    for finalizer in list(weakref.finalize._registry):
        finalizer.detach()
    media = sys.modules.get("wandb.sdk.data_types._private")
    if media is not None:
        atexit.unregister(media.MEDIA_TMP.cleanup)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=True, write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    argv = request["argv"]
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(argv[0])
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    _reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
            sys.exit(0)  # the script returned: exit as the interpreter would (atexit, non-daemon threads)
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"status": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
