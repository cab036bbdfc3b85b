"""Generative VLM backends: any OpenAI-compatible chat-completions server, and local transformers models.

Both take :class:`Request` objects (prompt + image bytes) and return :class:`Result` objects, and both go through a
:class:`ResponseCache` on disk (SQLite) keyed by (model, prompt, image hashes, generation parameters), so an
interrupted or repeated run resumes without asking again. Failures never raise out of a run: a request that still
fails after its retries comes back with ``text=None`` and an ``error`` (scored as wrong, never cached).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microbench.errors import UserError

log = logging.getLogger(__name__)


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
    return hashlib.sha256(json.dumps({"model": model, "prompt": prompt, "params": params,
                                      "images": list(image_digests)}, sort_keys=True).encode()).hexdigest()


def _mime(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def data_url(data: bytes) -> str:
    """The image as a data URL, re-encoded to PNG only when its format is not one servers accept (e.g. TIFF)."""
    mime = _mime(data)
    if mime is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _letter_logprobs(entries: list[dict] | None) -> dict[str, float] | None:
    """Log-probabilities of single capital letters among the first generated token's top alternatives."""
    if not entries:
        return None
    first = entries[0] or {}
    out = {}
    for alt in first.get("top_logprobs") or []:
        tok = str(alt.get("token", "")).strip()
        if len(tok) == 1 and tok.isupper() and tok not in out:
            out[tok] = float(alt.get("logprob"))
    return out or None


def _option(check, name: str, value, **kwargs):
    """A numeric model option checked by ``check`` (e.g. ``positive_int``), its error as a model error."""
    from microbench.data.loading import MicroBenchDataError
    try:
        return check(name, value, **kwargs)
    except MicroBenchDataError as err:
        raise GenerativeBackendError(str(err)) from None


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


class OpenAICompatibleBackend(GenerativeBackend):
    """Chat completions over HTTP (vLLM, TGI, SGLang, OpenAI, ...): images as data URLs, bounded concurrency,
    retries with exponential backoff and jitter on 429 / 5xx / timeouts / connection errors (``Retry-After`` is
    honoured), a per-request timeout, and letter log-probabilities when the server returns them.

    Args:
        base_url: e.g. ``http://localhost:8000/v1`` (vLLM) or ``https://api.openai.com/v1``.
        model: the served model name.
        api_key_env: environment variable holding the key (none needed for most local servers).
        max_concurrency: requests in flight at once.
        timeout_s: per-request timeout; max_retries: retries after the first attempt.
        temperature, max_tokens, top_p, seed: generation parameters (part of the cache key).
        logprobs / top_logprobs: ask for the first token's alternatives (A–F confidences).
        image_detail: OpenAI's ``detail`` (``high`` as in the paper); None leaves it out.
        blind: send the same prompts without images (the language-prior baseline).
    """

    backend = "openai"

    def __init__(self, model: str, base_url: str = "http://localhost:8000/v1", api_key_env: str | None =
                 "OPENAI_API_KEY", max_concurrency: int = 16, timeout_s: float = 120.0, max_retries: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, temperature: float = 0.0, max_tokens: int = 64,
                 top_p: float | None = None, seed: int | None = 0, logprobs: bool = True, top_logprobs: int = 5,
                 image_detail: str | None = "high", cache_dir: str | Path | None = None, blind: bool = False,
                 prompt: str = "official", fail_fast_after: int = 8) -> None:
        from microbench.data.loading import positive_int

        super().__init__(model, cache_dir, blind, prompt)
        self.base_url = base_url.rstrip("/")
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.max_concurrency = _option(positive_int, "model.max_concurrency", max_concurrency)
        self.max_retries = _option(positive_int, "model.max_retries", max_retries, minimum=0)
        self.fail_fast_after = _option(positive_int, "model.fail_fast_after", fail_fast_after)
        self.timeout_s = float(timeout_s)
        if not self.timeout_s > 0:
            raise GenerativeBackendError(f"model.timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.gen = {"temperature": temperature, "max_tokens": max_tokens, "top_p": top_p, "seed": seed}
        self.logprobs, self.top_logprobs, self.image_detail = logprobs, top_logprobs, image_detail

    @property
    def params(self) -> dict:
        return {**{k: v for k, v in self.gen.items() if v is not None}, "logprobs": self.logprobs,
                "image_detail": self.image_detail}

    def payload(self, prompt: str, images: list[bytes], digests: list[str] | None = None) -> dict:
        content: list[dict] = []
        for k, img in enumerate(images):
            url = {"url": self._memo(("url", digests[k]), lambda img=img: data_url(img)) if digests
                   else data_url(img)}
            if self.image_detail:
                url["detail"] = self.image_detail
            content.append({"type": "image_url", "image_url": url})
        content.append({"type": "text", "text": prompt})
        body = {"model": self.model_name, "messages": [{"role": "user", "content": content}],
                **{k: v for k, v in self.gen.items() if v is not None}}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body

    def generate(self, requests: Sequence[Request], progress: bool = True) -> list[Result]:
        self.stats = BackendStats()
        t = time.perf_counter()
        try:
            asyncio.get_running_loop()
            running = True
        except RuntimeError:
            running = False
        if running:  # called from inside an event loop (a notebook): run ours in a thread
            box: dict = {}
            th = threading.Thread(target=lambda: box.update(r=asyncio.run(self._run(requests, progress))))
            th.start()
            th.join()
            results = box["r"]
        else:
            results = asyncio.run(self._run(requests, progress))
        self.stats.seconds = round(time.perf_counter() - t, 3)
        return self.check_answered(results)

    async def _run(self, requests: Sequence[Request], progress: bool) -> list[Result]:
        """``max_concurrency`` workers take requests in order from one iterator: at most that many requests (and
        their images) are in memory or in flight at any time."""
        import httpx

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc=f"{self.name}", unit="q")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        results: list[Result | None] = [None] * len(requests)
        todo = iter(enumerate(requests))
        state = {"in_flight": 0, "answered": False, "unreachable": None, "ok": 0, "failed": 0, "abort": None}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits,
                                     timeout=httpx.Timeout(self.timeout_s)) as client:
            async def worker() -> None:
                for i, req in todo:  # one shared iterator: each worker takes the next request
                    if state["abort"] or state["unreachable"]:
                        return
                    res = results[i] = await self._one(client, state, req)
                    if res.text is not None and not res.cached:
                        state["ok"] += 1
                    elif res.text is None:
                        state["failed"] += 1
                        if not state["ok"] and state["failed"] >= self.fail_fast_after and not state["abort"]:
                            state["abort"] = res.error or "failed"
                    if bar is not None:
                        bar.update(1)

            await asyncio.gather(*(worker() for _ in range(self.max_concurrency)))
        if bar is not None:
            bar.close()
        if state["unreachable"]:
            raise GenerativeBackendError(f"cannot reach the chat-completions server at {self.base_url} "
                                         f"({state['unreachable']}): start it (e.g. vllm serve <model>) or set "
                                         f"model.base_url; the {len(self.cache)} answers cached so far are kept")
        if state["abort"]:
            raise self.fail_fast_error(state["failed"], len(requests), state["abort"])
        return list(results)

    async def _reachable(self, client, state: dict) -> bool:
        """After a connection error with no answer yet in this run: is anything listening at ``base_url``?"""
        import httpx

        if state["unreachable"]:
            return False
        try:
            await client.get("/models", timeout=min(10.0, self.timeout_s))
            return True
        except httpx.TransportError as err:
            state["unreachable"] = f"{type(err).__name__}: {err}"
            return False

    async def _one(self, client, state: dict, req: Request) -> Result:
        import httpx

        if state["unreachable"] or state["abort"]:
            return Result(req.id, None, "server unreachable" if state["unreachable"] else "run stopped", None)
        try:
            key, digests, images = self._key_and_images(req)
            hit = self.cache.get(key)
            body = None if hit is not None else self.payload(req.prompt, images, digests)
        except Exception as err:  # noqa: BLE001 - an unreadable image is this question's failure, not the run's
            self.stats.failed += 1
            return Result(req.id, None, f"image unreadable: {type(err).__name__}: {err}", None)
        if hit is not None:
            self.stats.cache_hits += 1
            return Result(req.id, hit.get("text"), None, hit.get("letter_logprobs"), cached=True, key=key)
        error, attempt, hard = "", 0, 0
        for attempt in range(1, self.max_retries + 2):
            state["in_flight"] += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, state["in_flight"])
            retry_after = None
            try:
                self.stats.requests_sent += 1
                resp = await client.post("/chat/completions", json=body)
                state["answered"] = True
                if resp.status_code == 200:
                    text, lp = self._parse(resp)
                    if text is not None:
                        self.cache.put(key, {"text": text, "letter_logprobs": lp})
                        return Result(req.id, text, None, lp, attempts=attempt, key=key)
                    error = f"malformed response (HTTP 200 without choices[0].message.content): {resp.text[:120]!r}"
                    break  # unparseable: a failure (scored wrong, never cached); retrying gets the same body
                code = str(resp.status_code)
                self.stats.http_errors[code] = self.stats.http_errors.get(code, 0) + 1
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code != 429 and resp.status_code < 500:
                    break  # 4xx other than 429: retrying will not help
                hard += resp.status_code != 429  # 429: the server is alive and asks to slow down
                retry_after = resp.headers.get("retry-after")
            except httpx.TimeoutException:
                self.stats.timeouts += 1
                error = f"timeout after {self.timeout_s:g} s"
                hard += 2  # no answer yet in this run: a hanging server is not waited on twice
            except httpx.TransportError as err:
                error = f"{type(err).__name__}: {err}"
                hard += 1
                if (isinstance(err, httpx.ConnectError) and not state["answered"]
                        and not await self._reachable(client, state)):
                    break  # nothing is listening: stop the run instead of retrying every question
            finally:
                state["in_flight"] -= 1
            # until one request of this run succeeds, retry a 5xx / connection error once and a timeout not at all,
            # so a server that fails everything stops the run (fail_fast_after) within seconds, not hours
            if attempt > self.max_retries or state["abort"] or (not state["ok"] and hard >= 2):
                break
            self.stats.retries += 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            if retry_after and retry_after.replace(".", "", 1).isdigit():  # seconds (an HTTP date is ignored)
                delay = min(self.max_backoff_s, float(retry_after))
            await asyncio.sleep(delay)
        self.stats.failed += 1
        return Result(req.id, None, error or "failed", None, attempts=attempt, key=key)

    @staticmethod
    def _parse(resp) -> tuple[str | None, dict | None]:
        try:
            choice = resp.json()["choices"][0]
            text = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, None
        if isinstance(text, list):  # content parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if not isinstance(text, str):
            return None, None
        lp = _letter_logprobs(((choice.get("logprobs") or {}).get("content")) if isinstance(choice, dict) else None)
        return text, lp


class HFVisionBackend(GenerativeBackend):
    """A local transformers vision-language model (``AutoModelForImageTextToText`` + ``AutoProcessor``): chat
    template with one image slot per image, batched greedy decoding (left padding), bf16 on GPU, first-token letter
    log-probabilities.

    Args:
        model: a Hub id (``Qwen/Qwen2-VL-2B-Instruct``, ``google/paligemma-3b-mix-224``...) or a local folder.
        dtype: ``bfloat16`` (GPU default) or ``float32``; device: ``cuda``, ``cpu`` or None (cuda if available).
    """

    backend = "hf"

    def __init__(self, model: str, revision: str | None = None, dtype: str = "bfloat16", device: str | None = None,
                 batch_size: int = 8, max_new_tokens: int | None = 16, cache_dir: str | Path | None = None,
                 blind: bool = False, prompt: str = "official", trust_remote_code: bool = False,
                 hf_cache_dir: str | None = None, max_length: int | None = None, fail_fast_after: int = 8) -> None:
        import torch

        from microbench.data.loading import positive_int

        self.fail_fast_after = _option(positive_int, "model.fail_fast_after", fail_fast_after)
        batch_size = _option(positive_int, "model.batch_size", batch_size)

        super().__init__(model, cache_dir, blind, prompt)
        from microbench.models.backbones.registry import hub_unreachable

        hub_down = None if Path(model).expanduser().exists() else hub_unreachable()
        try:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(model, revision=revision, cache_dir=hf_cache_dir,
                                                           trust_remote_code=trust_remote_code)
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if self.device == "cpu" and dtype == "bfloat16":
                dtype = "float32"
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, revision=revision, cache_dir=hf_cache_dir, dtype=getattr(torch, dtype),
                trust_remote_code=trust_remote_code).to(self.device).eval()
        except Exception as err:  # noqa: BLE001 - one clear line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = (f"; the Hub is unreachable ({hub_down}), so only the local HF cache was tried: download it once "
                     "on a machine with internet, or pass a local folder") if hub_down else ""
            raise GenerativeBackendError(f"cannot load vision-language model {model!r}@{revision or 'main'}: {reason}"
                                         f"{where}") from err
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        self.revision, self.dtype, self.batch_size, self.max_new_tokens = revision, dtype, batch_size, max_new_tokens
        self.max_length = max_length
        if max_new_tokens is None and max_length is None:
            raise GenerativeBackendError("set model.max_new_tokens or model.max_length (the official CogVLM setting is "
                                         "max_length=1900, PaliGemma max_new_tokens=100)")

    @property
    def params(self) -> dict:
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "revision": self.revision, "dtype": self.dtype}
        if self.max_length is not None:  # total length, prompt included (the official CogVLM setting)
            out["max_length"] = self.max_length
        return out

    def _length_kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens} if self.max_length is None else {"max_length": self.max_length}

    def _letter_ids(self) -> dict[str, int]:
        tok = self.processor.tokenizer
        out = {}
        for letter in "ABCDEFGH":
            ids = tok.encode(letter, add_special_tokens=False)
            if len(ids) == 1:
                out[letter] = ids[0]
        return out

    def generate(self, requests: Sequence[Request], progress: bool = True) -> list[Result]:
        import torch
        from PIL import Image

        self.stats = BackendStats()
        t0 = time.perf_counter()
        results: list[Result | None] = [None] * len(requests)
        letters = self._letter_ids()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc=self.name, unit="q")
        pending: list[tuple] = []  # at most one batch of uncached questions (and their images) in memory

        def run_batch() -> None:
            try:
                texts, imgs = [], []
                for i, _, digests, images in pending:
                    pil = [self._memo(("pil", d), lambda b=b: Image.open(io.BytesIO(b)).convert("RGB"))
                           for d, b in zip(digests, images, strict=True)]
                    content = [{"type": "image"} for _ in pil] + [{"type": "text", "text": requests[i].prompt}]
                    texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                                    add_generation_prompt=True, tokenize=False))
                    imgs.append(pil)
                kwargs = {"text": texts, "padding": True, "return_tensors": "pt"}
                if any(imgs):
                    kwargs["images"] = imgs
                inputs = self.processor(**kwargs).to(self.device)
                self.stats.requests_sent += len(pending)
                with torch.inference_mode():
                    out = self.model.generate(**inputs, **self._length_kwargs(), do_sample=False,
                                              output_scores=True, return_dict_in_generate=True)
                new = out.sequences[:, inputs["input_ids"].shape[1]:]
                decoded = self.processor.batch_decode(new, skip_special_tokens=True)
                first = out.scores[0].float().log_softmax(-1).cpu() if out.scores else None
                for j, (i, key, _, _) in enumerate(pending):
                    lp = {L: float(first[j, tid]) for L, tid in letters.items()} if first is not None else None
                    self.cache.put(key, {"text": decoded[j], "letter_logprobs": lp})
                    results[i] = Result(requests[i].id, decoded[j], None, lp, attempts=1, key=key)
            except Exception as err:  # noqa: BLE001 - a failing batch is scored wrong, the run goes on
                log.warning("generation failed for %d questions: %s", len(pending), err)
                for i, key, _, _ in pending:
                    self.stats.failed += 1
                    results[i] = Result(requests[i].id, None, f"{type(err).__name__}: {err}", None, key=key)
            if bar is not None:
                bar.update(len(pending))
            pending.clear()

        for i, req in enumerate(requests):
            key, digests, images = self._key_and_images(req)
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                results[i] = Result(req.id, hit.get("text"), None, hit.get("letter_logprobs"), cached=True, key=key)
                if bar is not None:
                    bar.update(1)
                continue
            pending.append((i, key, digests, images))
            if len(pending) == self.batch_size:
                run_batch()
                answered = sum(r is not None and r.text is not None and not r.cached for r in results)
                if not answered and self.stats.failed >= self.fail_fast_after:
                    first = next(r for r in results if r is not None and r.text is None)
                    raise self.fail_fast_error(self.stats.failed, len(requests), first.error)
        if pending:
            run_batch()
        if bar is not None:
            bar.close()
        self.stats.seconds = round(time.perf_counter() - t0, 3)
        return self.check_answered([r for r in results if r is not None])


BACKENDS = {"openai": OpenAICompatibleBackend, "hf": HFVisionBackend}


def build_generative_backend(backend: str = "openai", **kwargs) -> GenerativeBackend:
    """Hydra target of ``configs/model/openai_compatible.yaml`` / ``hf_vlm.yaml``."""
    import inspect

    if backend not in BACKENDS:
        raise GenerativeBackendError(f"generative backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    kwargs.pop("kind", None)
    known = set(inspect.signature(BACKENDS[backend]).parameters)
    unknown = sorted(set(kwargs) - known)
    if unknown:  # a typo in model.<key> must not be silently ignored
        raise GenerativeBackendError(f"unknown option(s) {unknown} for the {backend} backend; known: {sorted(known)}")
    return BACKENDS[backend](**kwargs)


build_generative_backend.family = "generative"  # read by microbench.tasks without building
