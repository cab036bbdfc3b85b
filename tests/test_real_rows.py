"""Real μ-Bench rows (``../shared/real_rows_data``: Hub rows 0–9 with their images and classification questions, a
whole ``nirschl_et_al_2018`` row, a ``jung_et_al_2022`` row) in a Hub-layout copy: every real item is read, named and
scored with its real gold. Skipped, with the reason printed, where ``../shared`` is absent (a user's clone).

Also here: a headline that vanishes says why, and rows that share an ``image_id`` with different pixels are each
scored on their own image."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, png_bytes, write_raw_hub_copy
from microbench.data import schema

REAL = REPO.parent / "shared" / "real_rows_data"
FLAT = ("label", "label_name", "dataset", "domain", "institution", "license", "microns_per_pixel", "modality",
        "ncbitaxon_id", "ncbitaxon_name", "pmid", "split", "stain", "subdomain", "submodality", "synthetic")


def _real_rows() -> list[dict]:
    if not (REAL / "real_rows.json").is_file():
        pytest.skip(f"real μ-Bench rows not found at {REAL} (../shared is absent in a user's clone)")
    return json.loads((REAL / "real_rows.json").read_text())["rows"]


def _question(entry: dict, qtype: str) -> dict:
    """A Hub question entry from a real one; ``answer`` = options[answer_idx] where the source shows no answer."""
    opts = list(entry["options"])
    return {"answer": entry.get("answer", opts[int(entry["answer_idx"])]), "answer_idx": int(entry["answer_idx"]),
            "id": entry.get("id", f"real-{qtype}"), "name": qtype, "options": opts, "question": entry["question"],
            "tags": None}


def _caption(entry: dict) -> dict | None:
    if "options" not in entry:  # partial in the source (id/name only): not a scorable set
        return None
    return {"id": entry["id"], "name": entry["name"], "question": entry["question"],
            "answer_idx": str(entry["answer_idx"]), "options": list(entry["options"]), "tags": entry.get("tags")}


def hub_rows(real: list[dict]) -> list[dict]:
    """The real values, plus filler where the sources show nothing (rows 1–9's flat columns are row 0's: all ten are
    acevedo_et_al_2020; rows 10/11 have no pixels in any source, so they get a plain placeholder image)."""
    row0 = real[0]["fields"]
    out = []
    for r in real:
        f = r["fields"]
        flat = {k: f.get(k, row0[k]) for k in FLAT}
        questions = {t: None for t in schema.QUESTION_TYPES}
        for t, q in (f.get("questions") or {}).items():
            questions[t] = _question(q, t)
        if "label_name" not in f and questions["classification"]:
            name = questions["classification"]["answer"]
            flat["label_name"], flat["label"] = name, schema.LABEL_NAMES.index(name)
        captions = {k: None for k in schema.CAPTION_KEYS}
        for k, c in (f.get("captions") or {}).items():
            captions[k] = _caption(c)
        image = (REAL / r["image_file"]).read_bytes() if r.get("image_file") else \
            png_bytes(np.full((32, 32, 3), 200, np.uint8))
        out.append({"image_id": f["image_id"], "image": {"bytes": image, "path": f"{f['image_id']}.png"}, **flat,
                    "captions": captions, "questions": questions, "bbox": None, "polygon": None})
    return out


@pytest.fixture(scope="module")
def real_copy(tmp_path_factory):
    real = _real_rows()
    root = write_raw_hub_copy(hub_rows(real), tmp_path_factory.mktemp("real") / "hub", n_shards=2, info=True)
    return real, root


def test_every_real_item_is_read_named_and_has_its_real_gold(real_copy):
    from microbench.data.loading import load_ubench
    from microbench.data.questions import build_question_table

    real, root = real_copy
    ds, src = load_ubench(str(root))
    assert len(ds) == len(real) == 12 and src.num_rows == 12
    t = build_question_table(ds)
    assert t.problems.empty and t.notes.empty
    f = t.frame
    assert list(t.rows["dataset"]) == ["acevedo_et_al_2020"] * 10 + ["nirschl_et_al_2018", "jung_et_al_2022"]
    expected = {}
    for i, r in enumerate(real):
        for qtype, q in (r["fields"].get("questions") or {}).items():
            expected[(i, "questions", qtype)] = (q["question"], q["options"], int(q["answer_idx"]))
        for key, c in (r["fields"].get("captions") or {}).items():
            if "options" in c:
                expected[(i, "captions", key)] = (c["question"], c["options"], int(c["answer_idx"]))
    got = {(int(a), str(s), str(k)): (q, list(o), int(g)) for a, s, k, q, o, g in
           zip(f.row_idx, f.source, f.key, f.question, f.options, f.gold_idx, strict=True)}
    assert got == expected
    assert len(expected) == 10 + 6 + 3 + 1  # 10 acevedo + 6 nirschl questions; modality_0 ×3 + classification_0
    # the first real row: basophil, answer E
    assert f[(f.row_idx == 0) & (f.key == "classification")]["answer"].iloc[0] == "basophil"
    # the real images decode at their real size
    dm_img = ds[0]["image"]
    assert dm_img.size == (360, 363)


def test_real_items_are_scored_with_their_real_gold_by_the_official_generative_protocol(real_copy, tmp_path, cfg_eval):
    from microbench.generative.loopback import ScriptedChatServer
    from microbench.tasks.registry import evaluate

    real, root = real_copy
    gold = {}  # prompt -> real gold letter, built from the real rows alone
    for r in real:
        for q in (r["fields"].get("questions") or {}).values():
            lettered = "\n".join(f"{'ABCDEFGH'[j]}) {o}" for j, o in enumerate(q["options"]))
            prompt = "Answer with a single letter, no extra details.\nQuestion:" + q["question"] + "\n" + lettered
            gold[prompt] = "ABCDEFGH"[int(q["answer_idx"])]

    def text_of(body):
        return body["messages"][0]["content"][-1]["text"]

    for policy in ("gold", "always_A"):
        with ScriptedChatServer(reply=lambda b, p=policy: gold[text_of(b)] if p == "gold" else "A") as srv:
            record, objs = evaluate(cfg_eval([f"data.path={root}", "model=openai_compatible",
                                          f"model.base_url={srv.base_url}", "model.model=scripted",
                                          f"model.cache_dir={tmp_path / policy / 'c'}", f"paths.output_dir={tmp_path / policy}"]))
            sent = {text_of(b) for b in srv.bodies}
        assert sent == set(gold)  # every real question asked, with the official prompt byte for byte
        preds = objs["predictions"]
        assert len(preds) == 16
        if policy == "gold":
            assert preds["correct"].all()
        else:
            want = sum(g == "A" for g in gold.values())
            assert int(preds["correct"].sum()) == want and want > 0


def test_contrastive_run_on_real_rows_reports_why_the_headline_is_absent(real_copy, tmp_path, caplog, cfg_eval):
    """The real rows carry only ``_0`` caption variants: the headline (``_1``) vanishes, and the log, the console
    summary and results.md say why, with the counts."""
    from microbench.tasks.registry import evaluate

    _, root = real_copy
    with caplog.at_level(logging.WARNING):
        record, _ = evaluate(cfg_eval([f"data.path={root}"]))
    assert record["n_predictions"] == 4 and "coarse" not in record["headline"]["captions"]
    cov = record["headline_coverage"]["captions"]
    assert "n/a" in cov["coarse"]["note"] and "3 coarse items" in cov["coarse"]["note"]
    assert "1 fine items" in cov["fine"]["note"] and "classification_1" in cov["fine"]["note"]
    md = (tmp_path / "results.md").read_text()
    assert "Headline coverage" in md and cov["coarse"]["note"] in md
    assert any(cov["fine"]["note"] in r.getMessage() for r in caplog.records)
    assert record["metrics"]["captions/all/coarse"]["n"] == 3  # the pooled number is still there


def test_rows_sharing_an_image_id_with_different_pixels_are_each_scored_on_their_own_image(sample_rows, tmp_path, cfg_eval):
    from microbench.tasks.registry import evaluate

    rows = [copy.deepcopy(r) for r in sample_rows if r["dataset"] == "kather_et_al_2016"][:6]
    distinct = write_raw_hub_copy(rows, tmp_path / "distinct", n_shards=1)
    shared = copy.deepcopy(rows)
    shared[3]["image_id"] = shared[0]["image_id"]  # same id, other pixels
    conflict = write_raw_hub_copy(shared, tmp_path / "conflict", n_shards=1)
    runs = {}
    for name, root in (("distinct", distinct), ("conflict", conflict)):
        record, _ = evaluate(cfg_eval([f"data.path={root}", f"paths.output_dir={tmp_path / ('out_' + name)}"]))
        runs[name] = (record, pd.read_parquet(tmp_path / f"out_{name}" / "predictions.parquet"))
    (rec_a, pa_), (rec_b, pb) = runs["distinct"], runs["conflict"]
    assert rec_b["split"]["images"] == rec_a["split"]["images"] == 6  # no row lost its image
    key = ["row_idx", "key"]
    a, b = pa_.sort_values(key).reset_index(drop=True), pb.sort_values(key).reset_index(drop=True)
    assert (a["pred_idx"] == b["pred_idx"]).all()
    assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(a["scores"], b["scores"], strict=True))
    conflicts = rec_b["data_problems"]["image_id_conflicts"]
    assert conflicts == [{"image_id": rows[0]["image_id"], "rows": [0, 3], "distinct_images": 2}]
    assert not rec_a["data_problems"]["image_id_conflicts"]
    assert "image ids shared by rows with different image bytes: 1" in (tmp_path / "out_conflict" / "results.md").read_text()
