"""The flattened question table: exact counts, agreement with a naive per-row reading, and validation."""

from __future__ import annotations

import copy

import datasets
import numpy as np

from microbench.data import schema
from microbench.data.questions import build_question_table
from microbench.data.sample import sample_features


def test_exact_counts_on_sample(sample_table):
    t = sample_table
    assert len(t.rows) == 328 and len(t.frame) == 5856
    assert t.counts("captions") == {k: (312 if k.startswith("stain") else 328) for k in schema.CAPTION_KEYS}
    assert t.counts("questions") == {k: (312 if k == "stain" else 328) for k in schema.QUESTION_TYPES}
    assert t.absent[("questions", "stain")] == t.absent[("captions", "stain_0")] == 16
    assert t.absent[("questions", "modality")] == 0
    assert t.problems.empty
    # Held rows (null `dataset`) are named by their stain
    assert (t.rows["dataset"] == "held_et_al_2010_h2b").sum() == 24
    assert (t.rows["dataset"] == "held_et_al_2010_galt").sum() == 18
    assert schema.UNKNOWN_DATASET not in set(t.rows["dataset"])
    # variants: 0/1 for captions, -1 for questions
    f = t.frame
    assert set(f.loc[f.source == "captions", "variant"]) == {0, 1}
    assert set(f.loc[f.source == "questions", "variant"]) == {-1}
    assert f["gold_idx"].dtype == np.int64


def _naive(ds: datasets.Dataset) -> set:
    """The obvious per-row reading of the official protocol, for comparison."""
    out = set()
    for i, row in enumerate(ds.select_columns(["captions", "questions"])):
        for source in ("captions", "questions"):
            for key, entry in row[source].items():
                if entry is None or entry["options"] is None:
                    continue
                if source == "questions" and entry["question"] is None:
                    continue
                gold = int(entry["answer_idx"])
                if source == "questions":
                    assert entry["options"][gold] == entry["answer"]
                out.add((i, source, key, gold, tuple(entry["options"])))
    return out


def test_matches_naive_reading(sample, sample_table):
    f = sample_table.frame
    fast = {(int(r), str(s), str(k), int(g), tuple(o))
            for r, s, k, g, o in zip(f.row_idx, f.source, f.key, f.gold_idx, f.options, strict=True)}
    assert fast == _naive(sample[0])


def test_caption_zero_shares_question_order_and_id(sample_table):
    f = sample_table.frame
    q = f[(f.source == "questions") & (f.key == "modality")].set_index("row_idx")
    c = f[(f.source == "captions") & (f.key == "modality_0")].set_index("row_idx")
    assert (q.loc[c.index, "gold_idx"] == c["gold_idx"]).all()
    assert (q.loc[c.index, "qid"] == c["qid"]).all()
    assert all(o[-1] == schema.NOTA for o in f["options"])


def _broken_rows(sample_rows):
    rows = [copy.deepcopy(r) for r in sample_rows[:8]]
    rows[0]["captions"]["modality_0"]["answer_idx"] = "7"  # out of range
    rows[1]["captions"]["domain_1"]["answer_idx"] = "two"  # not a number
    opts = rows[2]["questions"]["stain"]["options"]
    rows[2]["questions"]["stain"]["options"] = [opts[-1], *opts[:-1]]  # NOTA first
    rows[2]["questions"]["stain"]["answer_idx"] += 1
    rows[3]["questions"]["domain"]["answer"] = "radiology-typo"  # the answer is not among the options
    rows[4]["questions"]["subdomain"]["question"] = None  # null question text: absent, not broken
    rows[5]["questions"]["classification"] = None  # null entry: absent
    rows[6]["dataset"], rows[6]["stain"] = None, "H&E"  # a null name no stain explains
    rows[7]["captions"]["stain_1"]["options"] = []  # no options
    return rows


def test_violations_are_reported_not_dropped(sample_rows):
    ds = datasets.Dataset.from_list(_broken_rows(sample_rows), features=sample_features())
    t = build_question_table(ds)
    probs = t.problems
    got = {(int(r), k, p) for r, k, p in zip(probs.row_idx, probs.key, probs.problem, strict=True)}
    assert got == {
        (0, "modality_0", "gold index out of range"),
        (1, "domain_1", "gold index out of range"),
        (2, "stain", "'none of the above' is not the last option"),
        (3, "domain", "the answer is not one of the options"),
        (6, "dataset", "dataset is null and the stain names no known dataset"),
        (7, "stain_1", "no options"),
    }
    # broken items stay in the table (flagged), absent ones are counted
    assert len(t.frame) == 8 * 18 - 2
    assert (~t.frame["valid"]).sum() == 5
    assert t.absent[("questions", "subdomain")] == 1 and t.absent[("questions", "classification")] == 1
    row1 = t.frame[(t.frame.row_idx == 1) & (t.frame.key == "domain_1")].iloc[0]
    assert row1["gold_idx"] == -1


def test_example_row_from_the_format_reference():
    """The real nirschl_et_al_2018 row quoted in ubench-format.md §2.4, read through the schema."""
    row = {
        "image_id": "02bf6398-5f9a-479a-9359-8182ff96ce43", "image": None, "label": 65,
        "label_name": "chronic_heart_failure", "dataset": "nirschl_et_al_2018", "domain": "pathology",
        "institution": "upenn", "license": "CC-BY-4.0", "microns_per_pixel": 2.0, "modality": "light microscopy",
        "ncbitaxon_id": "NCBITaxon_9606", "ncbitaxon_name": "Homo sapiens", "pmid": None, "split": "test",
        "stain": "H&E", "subdomain": "cardiovascular pathology", "submodality": "brightfield microscopy",
        "synthetic": False,
        "captions": {
            "modality_0": {"id": "f01087e7", "name": "modality", "question": "A micrograph acquired through {class}.",
                           "answer_idx": "2", "options": [
                               "A micrograph acquired through fluorescence microscopy.",
                               "A micrograph acquired through electron microscopy.",
                               "A micrograph acquired through light microscopy.", "none of the above"], "tags": None},
            "classification_0": {"id": "0d1bb749", "name": "classification",
                                 "question": "An H&E micrograph of {class}.", "answer_idx": "1", "options": [
                                     "An H&E micrograph of not chronic heart failure.",
                                     "An H&E micrograph of chronic heart failure.", "none of the above"],
                                 "tags": None}},
        "questions": {
            "classification": {"answer": "chronic heart failure", "answer_idx": 1, "id": "0d1bb749",
                               "name": "classification", "options": ["not chronic heart failure",
                                                                     "chronic heart failure", "none of the above"],
                               "question": "H&E stained light micrograph of human cardiac tissue.", "tags": None},
            "stain": {"answer": "H&E", "answer_idx": 0, "id": "cc361a46", "name": "stain",
                      "options": ["H&E", "Ziehl-Neelsen", "Basic fuchsin", "PAS", "IHC(HDab)", "none of the above"],
                      "question": "What is the most likely technique used to stain this micrograph?", "tags": None}},
        "bbox": None, "polygon": None,
    }
    ds = datasets.Dataset.from_list([row], features=schema.FEATURES)
    t = build_question_table(ds)
    f = t.frame.set_index("key")
    assert f.loc["modality_0", "gold_idx"] == 2 and f.loc["classification_0", "gold_idx"] == 1
    assert f.loc["classification", "answer"] == "chronic heart failure" and f.loc["stain", "gold_idx"] == 0
    assert len(t.frame) == 4 and t.problems.empty
    assert t.absent[("captions", "modality_1")] == 1


def test_question_gold_is_options_index_of_answer_and_disagreements_are_reported(sample_rows):
    """eVLLM takes a question's gold as ``options.index(answer)``; a stored ``answer_idx`` that disagrees is a
    reported data problem, and the item is scored with the official gold (never dropped)."""
    rows = [copy.deepcopy(r) for r in sample_rows[:3]]
    q = rows[0]["questions"]["modality"]
    true_gold = q["options"].index(q["answer"])
    q["answer_idx"] = (true_gold + 1) % (len(q["options"]) - 1)
    # a duplicated option text: index() takes the first occurrence
    q2 = rows[1]["questions"]["domain"]
    g2 = q2["options"].index(q2["answer"])
    q2["options"] = [q2["answer"], *q2["options"]]
    q2["answer_idx"] = g2 + 1
    ds = datasets.Dataset.from_list(rows, features=sample_features())
    t = build_question_table(ds)
    f = t.frame
    item = f[(f.row_idx == 0) & (f.source == "questions") & (f.key == "modality")].iloc[0]
    assert item["valid"] and item["gold_idx"] == true_gold
    assert item["answer"] == q["answer"]
    item2 = f[(f.row_idx == 1) & (f.source == "questions") & (f.key == "domain")].iloc[0]
    assert item2["valid"] and item2["gold_idx"] == 0
    notes = t.notes
    assert {(int(r), k) for r, k in zip(notes.row_idx, notes.key, strict=True)} == {(0, "modality"), (1, "domain")}
    assert f"answer_idx {q['answer_idx']} disagrees with options.index(answer) = {true_gold}" in \
        notes[notes.row_idx == 0]["note"].iloc[0]
    assert t.problems.empty  # nothing dropped
