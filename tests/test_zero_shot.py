"""Zero-shot scorer: a hand-checked case, encode-once accounting, and equality with the official protocol."""

from __future__ import annotations

import copy

import datasets
import lightning as L
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch

from conftest import build_model, write_raw_hub_copy
from microbench.data import schema
from microbench.data.datamodule import PerceptionDataModule
from microbench.models.backbones import build_backbone
from microbench.models.backbones.base import Backbone
from microbench.models.zero_shot import ZeroShotScorer, random_baseline

KEYWORDS = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}
NOTA_VEC = [0.2, 1.0, 0.2]


class _MeanColour:
    def __call__(self, img):
        return torch.tensor(np.asarray(img.convert("RGB"), dtype=np.float32).mean((0, 1)) / 255.0)


class ColourBackbone(Backbone):
    """Image embedding = mean RGB; text embedding = the colour word it contains ("none of the above" ≈ green)."""

    kind = "fake"

    def __init__(self):
        super().__init__("colour", _MeanColour())
        self.calls = {"images": 0, "texts": []}
        self.dummy = torch.nn.Linear(1, 1)

    @property
    def embed_dim(self) -> int:
        return 3

    def encode_image(self, pixels):
        self.calls["images"] += len(pixels)
        return pixels

    def tokenize(self, texts):
        self.calls["texts"] += list(texts)
        return torch.tensor([NOTA_VEC if t == schema.NOTA else next(v for k, v in KEYWORDS.items() if k in t)
                             for t in texts])

    def encode_text(self, tokens):
        return tokens


def _row(image_id, rgb, options, answer_idx, dataset="kather_et_al_2016"):
    from microbench.data.sample import _png

    return {
        "image_id": image_id, "image": {"bytes": _png(np.full((8, 8, 3), rgb, dtype=np.uint8)), "path": None},
        "label": 0, "label_name": "tumor", "dataset": dataset, "domain": "pathology", "institution": "x",
        "license": "CC-BY-4.0", "microns_per_pixel": 1.0, "modality": "light microscopy", "ncbitaxon_id": "t",
        "ncbitaxon_name": "t", "pmid": None, "split": "test", "stain": "H&E", "subdomain": "s", "submodality": "s",
        "synthetic": False,
        "captions": {"classification_0": {"id": "q", "name": "classification", "question": "A {class} cell.",
                                          "answer_idx": answer_idx, "options": options, "tags": None}},
        "questions": {}, "bbox": None, "polygon": None,
    }


def _run(dm, backbone, **kw):
    scorer = ZeroShotScorer(backbone, progress=False, **kw)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.test(scorer, datamodule=dm, verbose=False)
    return scorer


def test_hand_checked_three_images(tmp_path):
    rows = [
        _row("img-red", (255, 0, 0), ["A red cell.", "A blue cell.", schema.NOTA], "0"),  # right
        _row("img-green", (0, 255, 0), ["A red cell.", "A blue cell.", schema.NOTA], "1"),  # NOTA wins: wrong
        _row("img-blue", (50, 50, 255), ["A blue cell.", "A red cell.", schema.NOTA], "0"),  # right
        _row("img-red", (255, 0, 0), ["A blue cell.", "A red cell.", schema.NOTA], "1", "nirschl_et_al_2018"),
    ]
    datasets.Dataset.from_list(rows, features=schema.FEATURES).save_to_disk(str(tmp_path / "d"))
    bb = ColourBackbone()
    dm = PerceptionDataModule(str(tmp_path / "d"), batch_size=2, transform=bb.preprocess)
    scorer = _run(dm, bb)
    p = scorer.predictions.set_index("row_idx")
    assert p["pred_idx"].tolist() == [0, 2, 0, 1]
    assert p["gold_idx"].tolist() == [0, 1, 0, 1]  # string answer_idx parsed
    assert p["correct"].tolist() == [True, False, True, True]
    assert p.loc[1, "scores"][2] == pytest.approx(1 / np.linalg.norm(NOTA_VEC))  # NOTA scored as a candidate
    # each unique image encoded once (img-red serves two rows), each unique text once
    assert bb.calls["images"] == 3
    assert sorted(bb.calls["texts"]) == sorted(["A red cell.", "A blue cell.", schema.NOTA])


def test_corrupt_image_is_a_counted_skip(tmp_path):
    rows = [_row("a", (255, 0, 0), ["A red cell.", schema.NOTA], "0"),
            _row("b", (0, 0, 255), ["A blue cell.", schema.NOTA], "0")]
    rows[1]["image"] = {"bytes": b"\x89PNG-broken", "path": None}
    datasets.Dataset.from_list(rows, features=schema.FEATURES).save_to_disk(str(tmp_path / "d"))
    bb = ColourBackbone()
    scorer = _run(PerceptionDataModule(str(tmp_path / "d"), transform=bb.preprocess), bb)
    assert len(scorer.predictions) == 1 and scorer.skipped["items_of_failed_images"] == 1
    assert len(scorer.skipped["failed_images"]) == 1 and scorer.skipped["failed_images"][0].startswith("row 1:")


def test_question_form_scores_question_plus_option(tmp_path):
    row = _row("a", (255, 0, 0), ["A red cell.", schema.NOTA], "0")
    row["questions"] = {"stain": {"answer": "blue", "answer_idx": 1, "id": "s", "name": "stain",
                                  "options": ["red", "blue", schema.NOTA], "question": "Which colour?", "tags": None}}
    datasets.Dataset.from_list([row], features=schema.FEATURES).save_to_disk(str(tmp_path / "d"))
    bb = ColourBackbone()
    bb_tokenize = bb.tokenize
    bb.tokenize = lambda texts: bb_tokenize([t.replace("Which colour? none", "none") for t in texts])  # noqa: E731
    scorer = _run(PerceptionDataModule(str(tmp_path / "d"), transform=bb.preprocess), bb,
                  sources=("captions", "questions"))
    q = scorer.predictions[scorer.predictions["source"] == "questions"].iloc[0]
    assert "Which colour? red" in bb.calls["texts"] and q["pred_idx"] == 0 and not q["correct"]
    assert set(scorer.predictions["source"]) == {"captions", "questions"}


def test_random_baseline_is_the_official_rule(sample_table):
    items = sample_table.frame.iloc[:50]
    preds = random_baseline(items, seed=42)
    import random

    rng = random.Random(42)
    for (_, item), pred in zip(items.iterrows(), preds["pred_idx"], strict=True):
        opts = list(item["options"])
        shuffled = opts.copy()
        rng.shuffle(shuffled)
        assert pred == opts.index(shuffled[0])
    assert (random_baseline(items, seed=42)["pred_idx"] == preds["pred_idx"]).all()


def _official_protocol(ds, model_dir):
    """The obvious per-question re-implementation (eVLLM clip_inference): encode the image and its option texts for
    each caption set, softmax over logit-scaled cosine similarities, argmax; open_clip only, no microbench code."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    out = {}
    with torch.no_grad():
        for i, row in enumerate(ds):
            for key, cap in row["captions"].items():
                if cap is None:
                    continue
                img = model.encode_image(preprocess(row["image"].convert("RGB"))[None])
                txt = model.encode_text(tokenizer(cap["options"]))
                img = img / img.norm(dim=-1, keepdim=True)
                txt = txt / txt.norm(dim=-1, keepdim=True)
                probs = (model.logit_scale.exp() * img @ txt.T).softmax(dim=-1)
                out[(i, key)] = (int(probs.argmax()), int(cap["answer_idx"]))
    return out


def test_matches_the_official_protocol_question_for_question(sample_rows, tmp_path):
    rows = [copy.deepcopy(r) for r in sample_rows[::8]]  # 41 rows over every dataset
    root = write_raw_hub_copy(rows, tmp_path / "hub", n_shards=2)
    model_dir = build_model("tiny").save_local_dir(tmp_path / "model")
    bb = build_backbone("open_clip", f"local-dir:{model_dir}")
    dm = PerceptionDataModule(str(root), transform=bb.preprocess, batch_size=7)
    preds = _run(dm, bb).predictions
    shards = [datasets.Dataset.from_file(str(f)) for f in sorted((root / "perception/0.1.0").glob("*.arrow"))]
    ref = _official_protocol(datasets.concatenate_datasets(shards).cast_column("image", datasets.Image()), model_dir)
    got = {(int(r), k): (int(p), int(g)) for r, k, p, g in
           zip(preds["row_idx"], preds["key"], preds["pred_idx"], preds["gold_idx"], strict=True)}
    assert len(got) == len(ref) == sum(12 - 2 * (r["captions"]["stain_0"] is None) for r in rows)
    assert got == ref
    assert isinstance(preds, pd.DataFrame) and preds["correct"].dtype == bool
