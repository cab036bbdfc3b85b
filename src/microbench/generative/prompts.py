"""The official μ-Bench generative prompt and answer matching, and MicroVQA's own prompt and parser.

Official (``inference/generative_inference.py``, ``utils.add_alphabet``, ``eval_utils.check_prediction``)::

    "Answer with a single letter, no extra details." + "\\n" + "Question:" + question + "\\n" + "\\n".join(options)

with options lettered ``"A) "``, ``"B) "``, … in stored order (no space after ``Question:``, no system prompt). A
response is correct iff the lettered gold option (``"E) basophil"``) is a case-sensitive substring of it, or its
first character is the gold letter.
"""

from __future__ import annotations

import re
import string

from microbench.errors import UserError

LETTERS = string.ascii_uppercase
OFFICIAL_INSTRUCTION = "Answer with a single letter, no extra details."
#: MicroVQA's ``eval/eval.py`` ``PROMPT_TEMPLATE``, byte for byte (note the space before the first newline, the blank
#: lines around the question and the options, and the options' own trailing newline before the template's).
MICROVQA_TEMPLATE = ('The following is a multiple choice question (with answers). \n'
                     'Think step by step and then output the answer in the format of "The answer is (X)" at the end.\n'
                     '\n{{QUESTION}}\n\nOptions:\n{{CHOICES}}\n')
MICROVQA_ANSWER = re.compile(r"answer is \*?\*?\(?([0-9])\)?\*?\*?")
PROMPT_STYLES = ("official", "microvqa")


def lettered(options: list[str]) -> list[str]:
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options: at most {len(LETTERS)} can be lettered")
    return [f"{LETTERS[i]}) {o}" for i, o in enumerate(options)]


def official_prompt(question: str, options: list[str]) -> str:
    return OFFICIAL_INSTRUCTION + "\n" + "Question:" + question + "\n" + "\n".join(lettered(options))


def official_correct(response: object, gold_idx: int, options: list[str]) -> bool:
    """The official rule: ``"<L>) <answer>" in response`` or ``response[0:1] == <L>``; a non-string is wrong."""
    if not isinstance(response, str) or gold_idx < 0:
        return False
    letter = LETTERS[gold_idx]
    return f"{letter}) {options[gold_idx]}" in response or response[0:1] == letter


def official_choice(response: object, options: list[str]) -> int:
    """The option a response names (for the predictions file; correctness uses :func:`official_correct`): its first
    character if that is a valid letter, else the first lettered option quoted in it, else -1."""
    if not isinstance(response, str):
        return -1
    first = response[0:1]
    if first and first in LETTERS[:len(options)]:
        return LETTERS.index(first)
    hits = [(response.find(t), i) for i, t in enumerate(lettered(options)) if t in response]
    return min(hits)[1] if hits else -1


def microvqa_prompt(question: str, options: list[str]) -> str:
    """MicroVQA's MMLU-Pro-style chain-of-thought prompt (options numbered from 1), filled as MicroVQA fills it:
    the question first, then the choices, each ``"  (j): choice\\n"``."""
    choices = "".join(f"  ({j + 1}): {o}\n" for j, o in enumerate(options))
    return MICROVQA_TEMPLATE.replace("{{QUESTION}}", question).replace("{{CHOICES}}", choices)


def microvqa_choice(response: object, options: list[str]) -> int:
    """MicroVQA's parser: the last-number regex ``answer is (X)`` → X − 1; -1 if absent or out of range."""
    if not isinstance(response, str):
        return -1
    m = MICROVQA_ANSWER.search(response)
    if not m:
        return -1
    idx = int(m.group(1)) - 1
    return idx if 0 <= idx < len(options) else -1


def build_prompt(style: str, question: str, options: list[str]) -> str:
    if style == "official":
        return official_prompt(question, options)
    if style == "microvqa":
        return microvqa_prompt(question, options)
    raise UserError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")


def judge(style: str, response: object, gold_idx: int, options: list[str]) -> tuple[int, bool]:
    """(chosen option index or -1, correct) under the style's own rule."""
    if style == "official":
        return official_choice(response, options), official_correct(response, gold_idx, options)
    choice = microvqa_choice(response, options)
    return choice, choice == gold_idx and gold_idx >= 0
