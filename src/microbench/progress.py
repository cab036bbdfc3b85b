"""Progress of a whole fit with an ETA: Lightning's bar shows one epoch; a user waiting on 25 wants the end."""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("microbench")


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


class FitProgress(L.Callback):
    """After every training epoch (validation included), on global rank 0: ``epoch k/N · s/epoch · elapsed · ETA``
    (the mean epoch so far times the epochs left; ``max_epochs=-1`` or a step budget: no ETA)."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self.lines: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._start_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._t0 is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        done = trainer.current_epoch + 1 - self._start_epoch
        elapsed = time.perf_counter() - self._t0
        per_epoch = elapsed / max(done, 1)
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        line = f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "") + \
            f" · {per_epoch:.1f} s/epoch · elapsed {format_seconds(elapsed)}"
        if total:
            line += f" · ETA {format_seconds(per_epoch * (total - trainer.current_epoch - 1))}"
        self.lines.append(line)
        log.info(line)
