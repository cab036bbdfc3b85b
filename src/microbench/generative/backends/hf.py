"""A local transformers vision-language model: batched greedy decoding, first-token letter log-probabilities."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
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
from microbench.options import PositiveInt, checked

log = logging.getLogger(__name__)


class HFVisionBackend(GenerativeBackend):
    """A local transformers vision-language model (``AutoModelForImageTextToText`` + ``AutoProcessor``): chat
    template with one image slot per image, batched greedy decoding (left padding), bf16 on GPU, first-token letter
    log-probabilities.

    Args:
        model: a Hub id (``Qwen/Qwen2-VL-2B-Instruct``, ``google/paligemma-3b-mix-224``...) or a local folder.
        dtype: ``bfloat16`` (GPU default) or ``float32``; device: ``cuda``, ``cpu`` or None (cuda if available).
    """

    backend = "hf"

    @checked("model", GenerativeBackendError)
    def __init__(self, model: str, revision: str | None = None, dtype: str = "bfloat16", device: str | None = None,
                 batch_size: PositiveInt = 8, max_new_tokens: int | None = 16, cache_dir: str | Path | None = None,
                 blind: bool = False, prompt: Literal[PROMPT_STYLES] = "official", trust_remote_code: bool = False,
                 hf_cache_dir: str | None = None, max_length: int | None = None,
                 fail_fast_after: PositiveInt = 8) -> None:
        import torch

        self.fail_fast_after = fail_fast_after

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
