"""The one home of the distributed helpers: is this process one rank of several, which one, and gather objects.

Every sharded evaluation asks here, so :func:`local_only` can make a block of work run on this process alone even
inside a process group (e.g. a study that rank 0 runs by itself inside a DDP fit: without it, its scorers would
wait in collectives for ranks that never join).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch.distributed as dist

_LOCAL = threading.local()


def is_distributed() -> bool:
    """True when this process is one of several ranks of an initialised process group (and not in
    :func:`local_only`)."""
    return (not getattr(_LOCAL, "depth", 0) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` on a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def close_process_group() -> bool:
    """Destroy this process's default process group if one is open (True when one was). Each job calls it as it
    ends: a process that exits with a Gloo group still open can abort at interpreter shutdown, its worker threads
    destroyed while joinable ("terminate called without an active exception", SIGABRT, exit code -6, after the run
    wrote its results; pytorch/pytorch#190489)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


@contextlib.contextmanager
def local_only():
    """Within this block, this process works alone: samplers do not shard, nothing is gathered, and a Lightning
    ``Trainer`` made inside sees no process group (its ``prepare_data`` barrier would otherwise open a new group
    over every rank and wait for ranks that never come: a hang)."""
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    real = dist.is_initialized
    dist.is_initialized = lambda: False
    try:
        yield
    finally:
        dist.is_initialized = real
        _LOCAL.depth -= 1
