"""Parsing generative models' box answers into pixel boxes, and scoring them with GRIT (official protocol).

- Qwen-VL (``qwen``, the official parse of eVLLM ``qwenvlm.forward_detect``): ``<box>(x1,y1),(x2,y2)</box>`` with
  non-negative integers and no spaces, on a 0–1000 grid (x first), every box in the answer, scaled to pixels and
  *not* clipped (a coordinate beyond 1000 lands outside the image, as in the official code). ``qwen_lenient`` also
  accepts spaces, decimals and negative numbers and clips to the image: an explicit option, not the official number.
- PaliGemma: ``<locNNNN>`` quadruples (y_min, x_min, y_max, x_max) on a 0–1024 grid, one object per
  ``;``-separated segment, the first four numbers of each (``<segNNN>`` mask tokens are ignored).

A malformed or empty answer is no prediction (an empty list), never an exception: GRIT then scores 0 when the
image has objects of that class and 1 when it has none.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd

from microbench.metrics.grit import GritLocalization, localization_score

QWEN_BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")  # official: digits only, no spaces
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
QWEN_BOX_LENIENT = re.compile(rf"<box>\s*\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)\s*</box>")
PALIGEMMA_LOC = re.compile(r"<loc(\d{4})>")


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), float(hi))


def parse_qwen_boxes(text: object, width: float, height: float, grid: float = 1000.0,
                     lenient: bool = False) -> list[list[float]]:
    """Every ``<box>(x1,y1),(x2,y2)</box>`` of a Qwen-VL answer, scaled from the 0–``grid`` grid to pixels.

    Default: the official parse (integers, no spaces, no clipping). ``lenient=True``: spaces, decimals and negative
    numbers are accepted and boxes are clipped to the image."""
    if not isinstance(text, str):
        return []
    boxes = []
    for m in (QWEN_BOX_LENIENT if lenient else QWEN_BOX).finditer(text):
        x1, y1, x2, y2 = (float(v) for v in m.groups())
        box = [x1 / grid * width, y1 / grid * height, x2 / grid * width, y2 / grid * height]
        if lenient:
            box = [_clip(box[0], width), _clip(box[1], height), _clip(box[2], width), _clip(box[3], height)]
        boxes.append(box)
    return boxes


def parse_qwen_boxes_lenient(text: object, width: float, height: float, grid: float = 1000.0) -> list[list[float]]:
    return parse_qwen_boxes(text, width, height, grid, lenient=True)


def parse_paligemma_boxes(text: object, width: float, height: float, grid: float = 1024.0) -> list[list[float]]:
    """PaliGemma ``<locNNNN>`` objects (y_min, x_min, y_max, x_max)/``grid`` → ``[x1, y1, x2, y2]`` pixels."""
    if not isinstance(text, str):
        return []
    boxes = []
    for segment in text.split(";"):
        locs = [int(v) for v in PALIGEMMA_LOC.findall(segment)]
        if len(locs) < 4:
            continue
        y1, x1, y2, x2 = (v / grid for v in locs[:4])
        boxes.append([_clip(x1 * width, width), _clip(y1 * height, height), _clip(x2 * width, width),
                      _clip(y2 * height, height)])
    return boxes


PARSERS: dict[str, Callable[..., list[list[float]]]] = {"qwen": parse_qwen_boxes, "qwen_lenient": parse_qwen_boxes_lenient,
                                                        "paligemma": parse_paligemma_boxes}

#: the official detection prompts (``inference/generative_inference_detection.py``), called with the raw className
PROMPTS = {"qwen": "Detect {class_name}", "qwen_lenient": "Detect {class_name}", "paligemma": "detect {class_name}"}


def score_box_answers(answers: pd.DataFrame, parser: str | Callable = "qwen") -> tuple[pd.DataFrame, dict]:
    """GRIT of generative box answers. ``answers`` has one row per (image, class): ``response`` (text or None),
    ``width``, ``height``, ``gt_boxes`` (list of [x1, y1, x2, y2]), ``dataset``, ``class``. Returns the table with
    ``pred_boxes``, ``parsed`` (whether any box was found) and ``grit`` columns, and the GRIT metrics per
    ``dataset/class`` with their macro and pooled means."""
    parse = PARSERS[parser] if isinstance(parser, str) else parser
    out = answers.copy()
    out["pred_boxes"] = [parse(r, w, h) for r, w, h in zip(out["response"], out["width"], out["height"],
                                                           strict=True)]
    out["parsed"] = out["pred_boxes"].map(bool)
    out["grit"] = [localization_score(p, g) for p, g in zip(out["pred_boxes"], out["gt_boxes"], strict=True)]
    names = [f"{d}/{c}" for d, c in zip(out["dataset"], out["class"], strict=True)]
    metric = GritLocalization(sorted(set(names)), sync_on_compute=False)  # scores are already gathered
    if names:
        metric.update(None, None, names, scores=out["grit"].tolist())
    metrics = {f"grit/{k}": v for k, v in metric.compute().items()} if names else {}
    metrics["unparsed_answers"] = int((~out["parsed"]).sum())
    return out, metrics
