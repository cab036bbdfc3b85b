"""What every generative backend shares: the request and result types, the on-disk response cache and its key,
the run counters and the run-level checks (:class:`GenerativeBackend`).

Failures never raise out of a run: a request that still fails after its retries comes back with ``text=None`` and an
``error`` (scored as wrong, never cached); a run in which nothing was answered is one :class:`GenerativeBackendError`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microbench.errors import UserError
from microbench.results.io import cache_key


class GenerativeBackendError(UserError):
    """A generative model cannot be built or asked (a server that is down, every request failing, a bad option)."""


@dataclass
class Request:
    """One question to a model: ``images`` returns the encoded image bytes (called lazily, once)."""

    id: str
    prompt: str
    images: Callable[[], list[bytes]] | list[bytes] = field(default_factory=list)

    def image_bytes(self) -> list[bytes]:
        return self.images() if callable(self.images) else list(self.images)


@dataclass
class Result:
    id: str
    text: str | None
    error: str | None = None
    letter_logprobs: dict[str, float] | None = None
    cached: bool = False
    attempts: int = 0
    key: str = ""


@dataclass
class BackendStats:
    """Counters of one ``generate`` call (what reached the server, what came from the cache)."""

    requests_sent: int = 0
    retries: int = 0
    timeouts: int = 0
    http_errors: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    failed: int = 0
    max_in_flight: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class ResponseCache:
    """SQLite map from request key to the model's answer; safe to share between runs (one writer at a time)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._db = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes, no fsync per answer
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()

    def get(self, key: str) -> dict | None:
        if self._db is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        if self._db is None:
            return
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(value)))
            self._db.commit()

    def __len__(self) -> int:
        if self._db is None:
            return 0
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])


def request_key(model: str, prompt: str, image_digests: Sequence[str], params: dict) -> str:
    """Cache key of one question: model, prompt, generation parameters and the SHA-256 of every image."""
    return cache_key({"model": model, "prompt": prompt, "params": params, "images": list(image_digests)}, length=None)


class GenerativeBackend:
    """Shared by the backends: the cache, the counters and the run-level bookkeeping."""

    kind = "generative"
    family = "generative"  # what the task registry dispatches on (microbench.tasks.registry)

    def __init__(self, model: str, cache_dir: str | Path | None = None, blind: bool = False,
                 prompt: str = "official") -> None:
        self.model_name = model
        self.blind = blind
        self.prompt_style = prompt
        self.cache = ResponseCache(Path(cache_dir) / "responses.sqlite" if cache_dir else None)
        self.stats = BackendStats()
        self._lru: OrderedDict = OrderedDict()

    @property
    def params(self) -> dict:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.model_name + ("+blind" if self.blind else "")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "generative", "backend": self.backend, "model": self.model_name,
                "blind": self.blind, "prompt": self.prompt_style, "params": self.params,
                "fingerprint": hashlib.blake2b(json.dumps([self.model_name, self.blind, self.params],
                                                          sort_keys=True).encode(), digest_size=8).hexdigest(),
                "has_text": True, "parameters": None}

    def _key_and_images(self, req: Request) -> tuple[str, list[str], list[bytes]]:
        """The request's cache key, its images' SHA-256 digests and bytes (none when blind)."""
        images = [] if self.blind else req.image_bytes()
        digests = [hashlib.sha256(img).hexdigest() for img in images]
        return request_key(self.model_name, req.prompt, digests, self.params), digests, images

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """A small LRU of per-image work (data URLs, decoded images): the questions of one image come in a row,
        so each image is encoded or decoded once, not once per question."""
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        value = self._lru[key] = make()
        if len(self._lru) > 64:
            self._lru.popitem(last=False)
        return value

    def generate(self, requests: Sequence[Request], progress: bool = True) -> list[Result]:
        raise NotImplementedError

    def check_answered(self, results: Sequence[Result]) -> list[Result]:
        """A run in which not one question got an answer (every request failed or came back unparseable: wrong
        model name, endpoint, key, a model that cannot run, a proxy answering HTML) is a configuration error, not
        an accuracy of 0: one clear error. Single failures are counted and scored wrong."""
        if results and all(r.text is None for r in results):
            raise GenerativeBackendError(f"{self.name}: all {len(results)} requests failed, e.g. "
                                         f"{results[0].error!r}; check the model name, base_url, API key and server "
                                         "logs")
        return list(results)

    def fail_fast_error(self, n_failed: int, n_total: int, example: str):
        """The error of a run whose first ``n_failed`` requests all failed: stop instead of retrying every one."""
        return GenerativeBackendError(
            f"{self.name}: the first {n_failed} requests all failed (e.g. {example!r}), so the run stopped instead of "
            f"trying all {n_total}; check the server logs, model name, base_url and API key (answers already cached "
            f"are kept; model.fail_fast_after sets how many failures in a row stop a run)")
