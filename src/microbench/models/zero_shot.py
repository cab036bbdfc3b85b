"""Zero-shot closed-VQA scoring of CLIP-style models, as the official protocol does it (ubench-format.md §6a).

For every caption set, the candidate texts are its options — already-filled sentences, "none of the above"
included as a candidate — and the prediction is the option with the highest cosine similarity to the image; correct
iff it equals ``int(answer_idx)``. Question sets can also be scored contrastively as ``question + " " + option``
(the official cognition form).

Work is never repeated: each unique image is decoded and encoded once per run (``test_step``), each unique text once
(``on_test_epoch_end``, sharded over ranks), and every question is scored from those embeddings.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch

from microbench import distributed
from microbench.data.datamodule import pixels_of
from microbench.errors import UserError
from microbench.models.backbones.base import Backbone
from microbench.models.inference import TEXT_CACHE

log = logging.getLogger(__name__)

PRED_COLUMNS = ("row_idx", "image_id", "dataset", "source", "key", "question_type", "variant", "n_options",
                "gold_idx", "pred_idx", "correct", "scores")
SOURCES = ("captions", "questions")


def candidate_texts(items: pd.DataFrame, source: str) -> list[list[str]]:
    """The texts scored for each item: caption options as-is, or ``question + " " + option`` for questions."""
    if source == "captions":
        return [list(o) for o in items["options"]]
    return [[f"{q} {o}" for o in opts] for q, opts in zip(items["question"], items["options"], strict=True)]


@torch.no_grad()
def encode_texts(backbone: Backbone, texts: Sequence[str], batch_size: int = 256,
                 device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), D] (float32, on CPU), encoded as ``backbone.inference`` says;
    sharded over ranks under DDP (every rank must call it with the same texts)."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, len(texts), world))
    chunks = []
    it = range(0, len(mine), batch_size)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="encode texts", unit="batch", leave=False)
    for start in it:
        idx = mine[start:start + batch_size]
        tokens = backbone.tokenize([texts[i] for i in idx])
        tokens = {k: v.to(device) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(device)
        chunks.append(backbone.embed_texts(tokens, device).cpu())
    dim = backbone.embed_dim
    local = (torch.tensor(mine, dtype=torch.long), torch.cat(chunks) if chunks else torch.zeros(0, dim))
    out = torch.zeros(len(texts), dim)
    for idx, emb in distributed.gather_objects(local):
        out[idx] = emb
    return out


def score_items(items: pd.DataFrame, texts: list[list[str]], image_of_item: np.ndarray, image_emb: torch.Tensor,
                text_emb_of: Callable[[list[str]], torch.Tensor], chunk: int = 8192) -> pd.DataFrame:
    """Cosine-argmax predictions for items whose image embedding exists (rows of ``image_emb``).

    ``text_emb_of(unique_texts)`` encodes the unique candidate texts once; scoring is chunked so memory stays flat.
    """
    flat = [t for opts in texts for t in opts]
    codes, uniques = pd.factorize(pd.Series(flat, dtype=object), sort=False)
    text_emb = text_emb_of(list(uniques))
    lengths = np.fromiter((len(o) for o in texts), dtype=np.int64, count=len(texts))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    kmax = int(lengths.max()) if len(lengths) else 0
    preds = np.empty(len(items), dtype=np.int64)
    scores: list[list[float]] = []
    for start in range(0, len(items), chunk):
        stop = min(start + chunk, len(items))
        n = stop - start
        ids = np.full((n, kmax), -1, dtype=np.int64)
        for j in range(kmax):  # pad option ids to kmax (vectorized per option position)
            has = lengths[start:stop] > j
            ids[has, j] = codes[offsets[start:stop][has] + j]
        t = text_emb[torch.from_numpy(np.clip(ids, 0, None))]  # [n, K, D]
        img = image_emb[torch.from_numpy(image_of_item[start:stop])]  # [n, D]
        sim = torch.einsum("nd,nkd->nk", img, t)
        sim = sim.masked_fill(torch.from_numpy(ids < 0), float("-inf"))
        preds[start:stop] = sim.argmax(dim=1).numpy()
        sim_np = sim.numpy()
        scores += [row[:k].tolist() for row, k in zip(sim_np, lengths[start:stop], strict=True)]
    return _prediction_frame(items, preds, scores)


def _prediction_frame(items: pd.DataFrame, preds: np.ndarray, scores: list[list[float]]) -> pd.DataFrame:
    out = pd.DataFrame({
        "row_idx": items["row_idx"].to_numpy(dtype=np.int64),
        "image_id": items["image_id"].astype(str).to_numpy(),
        "dataset": items["dataset"].astype(str).to_numpy(),
        "source": items["source"].astype(str).to_numpy(),
        "key": items["key"].astype(str).to_numpy(),
        "question_type": items["question_type"].astype(str).to_numpy(),
        "variant": items["variant"].to_numpy(dtype=np.int8),
        "n_options": items["n_options"].to_numpy(dtype=np.int64),
        "gold_idx": items["gold_idx"].to_numpy(dtype=np.int64),
        "pred_idx": preds.astype(np.int64),
    })
    out["correct"] = out["pred_idx"] == out["gold_idx"]
    out["scores"] = scores
    return out


def official_draw_order(items: pd.DataFrame) -> np.ndarray:
    """Positions of ``items`` in the order the official Random model draws: image by image (row order), and within
    a row its sets in the copy's own key order. The question table is built key by key in the order of the copy's
    struct fields, so the order in which keys first appear in ``items`` is that order (whatever it is, also for
    keys outside the schema)."""
    key_rank, _ = pd.factorize(items["key"].astype(str).to_numpy(), sort=False)
    return np.lexsort((key_rank, items["row_idx"].to_numpy(dtype=np.int64)))


def random_draws(items: pd.DataFrame, seed: int = 42) -> list[list[int]]:
    """The official Random model's shuffles (eVLLM ``random_model.py``): one ``random.Random(seed)`` stream shuffles
    a copy of each item's options, drawn in :func:`official_draw_order`; returns, per item (in ``items`` order), the
    shuffled option indices (the first is the prediction)."""
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(len(items))]
    options = items["options"].tolist()
    for pos in official_draw_order(items):
        order = list(range(len(options[pos])))
        rng.shuffle(order)  # shuffling indices consumes the stream exactly as shuffling the strings
        out[pos] = order
    return out


class RandomBaseline:
    """The official Random model (``configs/model/random.yaml``): each item's options shuffled with
    ``random.seed(seed)``, the first one predicted (:func:`random_baseline`; cognition:
    :func:`microbench.generative.harness.random_cognition`). No weights, no images."""

    family = "random"

    def __init__(self, seed: int = 42) -> None:
        self.seed = int(seed)
        self.name = "random"

    def describe(self) -> dict:
        return {"name": "random", "kind": "random", "fingerprint": f"seed{self.seed}", "embed_dim": 0,
                "has_text": False, "parameters": 0}


def random_baseline(items: pd.DataFrame, seed: int = 42) -> pd.DataFrame:
    """The official Random model on perception: the first shuffled option is the prediction (correct iff it is the
    gold option); each source is its own run, so each has its own stream; the score of the predicted option is 1."""
    preds = np.empty(len(items), dtype=np.int64)
    scores: list[list[float]] = [[] for _ in range(len(items))]
    sources = items["source"].astype(str).to_numpy()
    for source in dict.fromkeys(sources):
        pos = np.flatnonzero(sources == source)
        for p, order in zip(pos, random_draws(items.iloc[pos], seed), strict=True):
            preds[p] = order[0]
            scores[p] = [float(j == order[0]) for j in range(len(order))]
    return _prediction_frame(items, preds, scores)


class ZeroShotScorer(L.LightningModule):
    """Zero-shot scorer for ``trainer.test`` over a :class:`~microbench.data.datamodule.PerceptionDataModule`.

    After the test epoch, every rank holds ``self.predictions`` (one row per scored item) and ``self.skipped``
    (what could not be scored and why); ``on_scored(predictions, skipped)`` is then called on global rank 0, which
    is where run records are written (it also works under ``ddp_spawn``).

    Args:
        backbone: a CLIP-style :class:`Backbone` with a text tower.
        sources: ``captions`` (the official CLIP protocol) and/or ``questions`` (question + option texts).
        text_batch_size: texts per encoder call.
        on_scored: callback ``(predictions, skipped, module) -> None`` run on rank 0.
    """

    text_encodings = 0  # calls of the text encoder (each over the texts of one source not in the text cache)

    def __init__(self, backbone: Backbone, sources: Sequence[str] = ("captions",), text_batch_size: int = 256,
                 on_scored: Callable | None = None, progress: bool = True) -> None:
        super().__init__()
        if not backbone.has_text:
            raise backbone.no_text_error()
        unknown = set(sources) - set(SOURCES)
        if unknown or not sources:
            raise UserError(f"sources must be a non-empty subset of {SOURCES}, got {list(sources)}")
        self.backbone = backbone
        self.sources = tuple(sources)
        self.text_batch_size = text_batch_size
        self.on_scored = on_scored
        self.progress = progress
        self.predictions: pd.DataFrame | None = None
        self.skipped: dict = {}
        self.timings: dict[str, float] = {}
        self._reset()

    def _reset(self, n_images: int = 0) -> None:
        # one preallocated buffer filled in place: nothing is allocated and kept per batch, so memory stays flat
        self._emb = torch.zeros(n_images, self.backbone.embed_dim)
        self._seen = np.zeros(n_images, dtype=bool)
        self._failed: list[int] = []
        self._errors: list[str] = []

    def on_test_epoch_start(self) -> None:
        self._reset(len(self.trainer.datamodule.images()))
        self.backbone.eval()
        self.timings = {"_start": time.perf_counter()}

    def _note_failures(self, batch: dict) -> bool:
        """Count the batch's images that failed to decode; True when something is left to encode."""
        if len(batch["failed"]):
            self._failed += batch["failed"].tolist()
            self._errors += batch["errors"]
        return batch["pixel_values"] is not None

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if not self._note_failures(batch):
            return
        emb = self.backbone.embed_images(pixels_of(batch, self.device))
        idx = batch["image_index"].cpu()
        self._emb[idx] = emb.detach().to("cpu")
        self._seen[idx.numpy()] = True

    def on_test_epoch_end(self) -> None:
        t_images = time.perf_counter()
        self.timings["images"] = round(t_images - self.timings.pop("_start", t_images), 3)
        dm = self.trainer.datamodule
        if distributed.is_distributed():  # send only this rank's rows; every rank then holds all embeddings
            mine = torch.from_numpy(np.flatnonzero(self._seen))
            image_emb = torch.zeros_like(self._emb)
            encoded = np.zeros(len(self._seen), dtype=bool)
            failed, errors = [], []
            for idx, emb, f, e in distributed.gather_objects((mine, self._emb[mine], self._failed, self._errors)):
                image_emb[idx] = emb
                encoded[idx.numpy()] = True
                failed += f
                errors += e
        else:
            image_emb, encoded, errors = self._emb, self._seen, self._errors
        self.predictions, self.skipped = self.score(dm, image_emb, encoded)
        self.timings["texts_and_scoring"] = round(time.perf_counter() - t_images, 3)
        self.timings["texts"] = round(self._text_seconds, 3)
        self.skipped["failed_images"] = errors
        if self.on_scored is not None and self.trainer.is_global_zero:
            self.on_scored(self.predictions, self.skipped, self)
        self._reset()

    @torch.no_grad()
    def score(self, dm, image_emb: torch.Tensor, encoded: np.ndarray) -> tuple[pd.DataFrame, dict]:
        images = dm.images()
        row_to_image = np.full(int(dm.rows["row_idx"].max()) + 1, -1, dtype=np.int64)
        for i, rows in enumerate(images.rows):
            row_to_image[rows] = i
        questions = dm.questions()
        self._text_seconds, self.unique_texts = 0.0, 0
        frames, skipped = [], {"invalid_items": 0, "items_of_failed_images": 0, "problems": []}
        for source in self.sources:
            items = questions[questions["source"] == source]
            invalid = items[~items["valid"]]
            skipped["invalid_items"] += len(invalid)
            skipped["problems"] += invalid[["row_idx", "key", "problem"]].astype(str).to_dict("records")
            items = items[items["valid"]]
            img = row_to_image[items["row_idx"].to_numpy()]
            ok = (img >= 0) & encoded[np.clip(img, 0, None)]
            skipped["items_of_failed_images"] += int((~ok).sum())
            items, img = items[ok], img[ok]
            if len(items) == 0:
                continue
            texts = candidate_texts(items, source)

            def encode(missing: list[str]) -> torch.Tensor:
                t = time.perf_counter()
                out = encode_texts(self.backbone, missing, self.text_batch_size, self.device, progress=self.progress)
                self._text_seconds += time.perf_counter() - t
                self.unique_texts += len(missing)
                self.text_encodings += 1
                return out

            def text_emb_of(unique: list[str]) -> torch.Tensor:  # texts already encoded by this text tower: reused
                return TEXT_CACHE.lookup(self.backbone.text_cache_key(self.device), unique, encode)

            frames.append(score_items(items, texts, img, image_emb, text_emb_of))
        preds = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(PRED_COLUMNS))
        return preds, skipped
