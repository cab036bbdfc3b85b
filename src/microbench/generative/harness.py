"""Ask a generative model every question of an item table and judge the answers (official rule or MicroVQA's).

Items are rows of a question table (perception ``questions`` or cognition items): ``row_idx``, ``question``,
``options``, ``gold_idx`` and the identifying columns; ``images_of(row_idx)`` gives an item's encoded image bytes.
The predictions frame has the columns of contrastive predictions (so the same metrics and leaderboard apply) plus
``response``, ``error``, ``cached`` and ``letter_logprobs``. A failed or malformed answer is wrong, never a crash.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pandas as pd

from microbench.generative.backends import GenerativeBackend, Request
from microbench.generative.prompts import LETTERS, build_prompt, judge

ID_COLUMNS = ("row_idx", "image_id", "dataset", "source", "key", "question_type", "variant", "n_options", "gold_idx")


def build_requests(items: pd.DataFrame, images_of: Callable[[int], list[bytes]], style: str) -> list[Request]:
    """One request per item; an item's images are read when its request is sent (consecutive questions of one
    image read it once)."""
    images_of = functools.lru_cache(maxsize=32)(images_of)
    reqs = []
    for row, key, q, opts in zip(items["row_idx"], items["key"], items["question"], items["options"], strict=True):
        reqs.append(Request(id=f"{row}/{key}", prompt=build_prompt(style, str(q), list(opts)),
                            images=lambda r=int(row): images_of(r)))
    return reqs


def run_generative(items: pd.DataFrame, images_of: Callable[[int], list[bytes]], backend: GenerativeBackend,
                   progress: bool = True) -> pd.DataFrame:
    style = backend.prompt_style
    results = backend.generate(build_requests(items, images_of, style), progress=progress)
    out = pd.DataFrame({c: items[c].to_numpy() for c in ID_COLUMNS if c in items})
    choice, correct = [], []
    for res, gold, opts in zip(results, items["gold_idx"], items["options"], strict=True):
        c, ok = judge(style, res.text, int(gold), list(opts))
        choice.append(c)
        correct.append(ok)
    out["pred_idx"] = np.asarray(choice, dtype=np.int64)
    out["correct"] = np.asarray(correct, dtype=bool)
    out["scores"] = [[(r.letter_logprobs or {}).get(LETTERS[j], float("nan")) for j in range(len(o))]
                     for r, o in zip(results, items["options"], strict=True)]
    out["response"] = [r.text for r in results]
    out["error"] = [r.error for r in results]
    out["cached"] = [r.cached for r in results]
    return out


def random_cognition(items: pd.DataFrame, seed: int = 42) -> pd.DataFrame:
    """The official Random model for cognition (eVLLM): the candidate strings are ``question + " " + option``, one
    ``random.Random(seed)`` stream shuffles them item by item, the first is the prediction, and it is correct iff the
    gold answer is a *substring* of it, so a question whose text names its answer counts every draw as correct.
    ``correct`` follows that official rule (the Table-1 figure); ``correct_strict`` is the drawn option being the
    gold one."""
    from microbench.models.zero_shot import random_draws

    out = pd.DataFrame({c: items[c].to_numpy() for c in ID_COLUMNS if c in items})
    preds, correct, strict = [], [], []
    for order, q, opts, gold in zip(random_draws(items, seed), items["question"], items["options"],
                                    items["gold_idx"], strict=True):
        opts = list(opts)
        first = order[0]
        preds.append(first)
        correct.append(gold >= 0 and opts[gold] in f"{q} {opts[first]}")
        strict.append(gold >= 0 and first == gold)
    out["pred_idx"] = np.asarray(preds, dtype=np.int64)
    out["correct"] = np.asarray(correct, dtype=bool)
    out["correct_strict"] = np.asarray(strict, dtype=bool)
    out["scores"] = [[float(j == p) for j in range(len(o))] for p, o in zip(preds, items["options"], strict=True)]
    return out
