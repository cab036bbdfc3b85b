"""The one run-record type of every task (perception, cognition, localization, fine-tuning, linear probes,
forgetting studies): what ``metrics.json`` (or the task's JSON) holds and what the summary printer reads.

Built in one place (:func:`microbench.tasks.records.new_record`), written by one writer
(:func:`microbench.tasks.records.write_run`), printed by :func:`microbench.results.report.summary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: the fields every record writes, in this order; a task's own fields (``extra``) go between ``skipped`` and
#: ``timings_s``
CORE = ("microbench_version", "run_id", "task", "model", "data", "split", "headline", "metrics", "skipped")
TAIL = ("timings_s", "environment", "config")


def metric_entry(value: float | None, n: int) -> dict:
    """Metric entries share the perception shape (value, ci, n); COCO/GRIT have no official bootstrap CI."""
    return {"value": None if value is None or value != value else float(value), "ci": None, "n": int(n)}


def is_metric(value: Any) -> bool:
    """A metric entry: ``{"value": float | None, "ci": float | None, "n": int | None}``."""
    return isinstance(value, dict) and "value" in value


def run_name_of(config: dict | None) -> str | None:
    """What a run was called, from the config its record or checkpoint keeps: ``run_name``, or ``task_name`` as
    records and checkpoints written before the rename say."""
    config = config or {}
    return config.get("run_name") or config.get("task_name")


@dataclass
class RunRecord:
    """One run of one task.

    ``headline`` keeps the shape each task has always written (perception: ``{source: {grain: metric}}``; every
    other task: ``{name: metric}``); :meth:`headline_metrics` is the flat view. ``outputs`` (what the run wrote,
    label → path, the main file first) and ``notes`` (lines a reader must see) are for the summary, not written.
    """

    task: str
    model: dict
    data: dict
    split: dict
    headline: dict
    metrics: dict
    skipped: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    run_id: str | None = None
    microbench_version: str = ""
    outputs: dict[str, str] = field(default_factory=dict, compare=False)
    notes: list[str] = field(default_factory=list, compare=False)

    def to_dict(self) -> dict:
        body = {k: getattr(self, k) for k in CORE}
        body.update(self.extra)
        body.update({k: getattr(self, k) for k in TAIL})
        return body

    @classmethod
    def from_dict(cls, body: dict, outputs: dict | None = None, notes: list | None = None) -> RunRecord:
        known = set(CORE) | set(TAIL)
        return cls(**{k: body.get(k) for k in known if k in body},
                   extra={k: v for k, v in body.items() if k not in known},
                   outputs=dict(outputs or {}), notes=list(notes or []))

    def __getitem__(self, key: str):
        """Read like the JSON it writes (``record["headline"]``, ``record["n_predictions"]``)."""
        if key in CORE or key in TAIL:
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return key in CORE or key in TAIL or key in self.extra

    def headline_metrics(self) -> dict[str, dict | None]:
        """The headline flat: ``{"captions/coarse": metric, ...}`` or ``{"bbox_AP": metric, ...}``."""
        flat: dict[str, dict | None] = {}
        for name, value in (self.headline or {}).items():
            if isinstance(value, dict) and not is_metric(value):
                flat.update({f"{name}/{k}": v for k, v in value.items()})
            else:
                flat[name] = value
        return flat
