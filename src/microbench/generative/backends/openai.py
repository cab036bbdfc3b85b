"""Any OpenAI-compatible chat-completions server (vLLM, TGI, SGLang, OpenAI, ...) over HTTP, with the retry policy
on tenacity: exponential backoff with jitter on 429 / 5xx / timeouts / connection errors, ``Retry-After`` honoured, and
fail-fast until the run's first answer (a server that fails everything stops the run within seconds, not hours)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from microbench.generative.backends.base import (
    BackendStats,
    GenerativeBackend,
    GenerativeBackendError,
    Request,
    Result,
)
from microbench.generative.prompts import PROMPT_STYLES
from microbench.options import NonNegativeInt, PositiveFloat, PositiveInt, checked


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


@dataclass
class _Attempt:
    """What one POST came back with: an answer, or an error and whether another attempt may help."""

    text: str | None = None
    logprobs: dict[str, float] | None = None
    error: str = ""
    retry: bool = False
    retry_after: float | None = None


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

    @checked("model", GenerativeBackendError)
    def __init__(self, model: str, base_url: str = "http://localhost:8000/v1", api_key_env: str | None =
                 "OPENAI_API_KEY", max_concurrency: PositiveInt = 16, timeout_s: PositiveFloat = 120.0,
                 max_retries: NonNegativeInt = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, temperature: float = 0.0, max_tokens: int = 64,
                 top_p: float | None = None, seed: int | None = 0, logprobs: bool = True, top_logprobs: int = 5,
                 image_detail: str | None = "high", cache_dir: str | Path | None = None, blind: bool = False,
                 prompt: Literal[PROMPT_STYLES] = "official", fail_fast_after: PositiveInt = 8) -> None:
        super().__init__(model, cache_dir, blind, prompt)
        self.base_url = base_url.rstrip("/")
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.fail_fast_after, self.timeout_s = fail_fast_after, float(timeout_s)
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
        import tenacity

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
        tally = {"attempts": 0, "hard": 0}
        # until one request of this run succeeds, retry a 5xx / connection error once and a timeout not at all, so
        # a server that fails everything stops the run (fail_fast_after) within seconds, not hours
        failing = tenacity.stop_any(tenacity.stop_after_attempt(self.max_retries + 1),
                                    lambda _: bool(state["abort"]) or (not state["ok"] and tally["hard"] >= 2))
        backoff = (tenacity.wait_exponential(multiplier=self.backoff_s, max=self.max_backoff_s)
                   + tenacity.wait_random(0, self.backoff_s))

        def wait(retry_state) -> float:  # a Retry-After in seconds wins (an HTTP date is ignored)
            after = retry_state.outcome.result().retry_after
            return min(self.max_backoff_s, after) if after is not None else backoff(retry_state)

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_result(lambda attempt: attempt.retry), stop=failing, wait=wait,
            before_sleep=lambda _: setattr(self.stats, "retries", self.stats.retries + 1),
            retry_error_callback=lambda retry_state: retry_state.outcome.result())
        attempt = await retrying(self._post, client, state, body, tally)
        if attempt.text is not None:
            self.cache.put(key, {"text": attempt.text, "letter_logprobs": attempt.logprobs})
            return Result(req.id, attempt.text, None, attempt.logprobs, attempts=tally["attempts"], key=key)
        self.stats.failed += 1
        return Result(req.id, None, attempt.error or "failed", None, attempts=tally["attempts"], key=key)

    async def _post(self, client, state: dict, body: dict, tally: dict) -> _Attempt:
        """One POST of one question; ``tally`` counts its attempts and the failures that say the server is down."""
        import httpx

        tally["attempts"] += 1
        state["in_flight"] += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, state["in_flight"])
        self.stats.requests_sent += 1
        try:
            resp = await client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            self.stats.timeouts += 1
            tally["hard"] += 2  # no answer yet in this run: a hanging server is not waited on twice
            return _Attempt(error=f"timeout after {self.timeout_s:g} s", retry=True)
        except httpx.TransportError as err:
            tally["hard"] += 1
            nobody = (isinstance(err, httpx.ConnectError) and not state["answered"]
                      and not await self._reachable(client, state))  # nothing listens: stop, do not retry them all
            return _Attempt(error=f"{type(err).__name__}: {err}", retry=not nobody)
        finally:
            state["in_flight"] -= 1
        state["answered"] = True
        if resp.status_code == 200:
            text, lp = self._parse(resp)
            if text is None:  # unparseable: a failure (scored wrong, never cached); retrying gets the same body
                return _Attempt(error="malformed response (HTTP 200 without choices[0].message.content): "
                                      f"{resp.text[:120]!r}")
            return _Attempt(text=text, logprobs=lp)
        code = str(resp.status_code)
        self.stats.http_errors[code] = self.stats.http_errors.get(code, 0) + 1
        tally["hard"] += resp.status_code >= 500  # 429: the server is alive and asks to slow down
        after = resp.headers.get("retry-after")
        return _Attempt(error=f"HTTP {resp.status_code}: {resp.text[:200]}",
                        retry=resp.status_code == 429 or resp.status_code >= 500,  # other 4xx: retrying will not help
                        retry_after=float(after) if after and after.replace(".", "", 1).isdigit() else None)

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
