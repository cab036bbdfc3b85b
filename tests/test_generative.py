"""Cognition and generative evaluation (cognition split, official prompt, HF and OpenAI-compatible backends)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from microbench.data.cognition import CognitionDataModule, load_cognition
from microbench.generative.backends import OpenAICompatibleBackend, Request
from microbench.generative.loopback import ScriptedChatServer
from microbench.generative.prompts import (
    microvqa_choice,
    microvqa_prompt,
    official_choice,
    official_correct,
    official_prompt,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 16


def test_official_prompt_byte_for_byte():
    p = official_prompt("Which cell type?", ["lymphocyte", "basophil", "none of the above"])
    assert p == ("Answer with a single letter, no extra details.\nQuestion:Which cell type?\n"
                 "A) lymphocyte\nB) basophil\nC) none of the above")


@pytest.mark.parametrize("response,correct", [
    ("E", True), ("E) basophil", True), ("The answer is E) basophil.", True), ("E.", True),
    ("e", False), ("e) basophil", False), ("", False), (None, False), ("The answer is E", False),
    ("A) lymphocyte", False), ("Basophil", False), (" E", False),
])
def test_official_matching_rule(response, correct):
    options = ["lymphocyte", "neutrophil", "eosinophil", "monocyte", "basophil", "none of the above"]
    assert official_correct(response, 4, options) is correct


def test_official_choice_and_microvqa_parser():
    opts = ["a", "b", "c"]
    assert official_choice("B", opts) == 1 and official_choice("I think C) c", opts) == 2
    assert official_choice("Z", opts) == -1 and official_choice(None, opts) == -1
    prompt = microvqa_prompt("Why?", ["x", "y"])
    assert prompt.endswith("\n\nWhy?\n\nOptions:\n  (1): x\n  (2): y\n\n") and "The answer is (X)" in prompt
    assert microvqa_choice("... so the answer is (2)", opts) == 1
    assert microvqa_choice("The answer is **3**", opts) == 2
    assert microvqa_choice("the answer is (9)", opts) == -1 and microvqa_choice("no idea", opts) == -1


# --- the OpenAI-compatible client against a real loopback server ----------------------------------------------

def _requests(n, prefix="q"):
    return [Request(f"{prefix}{i}", f"question {prefix}{i}", [PNG]) for i in range(n)]


def test_client_retries_429_and_500_then_succeeds():
    def fail(n, body):  # the first two attempts of every question fail: 429 then 500
        attempt = sum(b["messages"] == body["messages"] for b in srv.bodies)
        return {1: 429, 2: 500}.get(attempt)

    with ScriptedChatServer(fail=fail) as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, backoff_s=0.01, max_concurrency=4)
        res = be.generate(_requests(5), progress=False)
    assert [r.text for r in res] == ["A"] * 5 and all(r.attempts == 3 for r in res)
    assert be.stats.retries == 10 and be.stats.http_errors == {"429": 5, "500": 5} and be.stats.failed == 0
    assert srv.requests == 15 and srv.errors == {"429": 5, "500": 5}


def test_client_gives_up_after_max_retries_and_on_4xx():
    def fail(n, body):
        text = json.dumps(body)
        return 503 if "q0" in text else 400 if "q1" in text else None

    with ScriptedChatServer(fail=fail) as srv:  # q2 answers first: a healthy run retries a 503 max_retries times
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, backoff_s=0.01, max_retries=2, max_concurrency=1)
        reqs = _requests(3)
        res = be.generate([reqs[2], reqs[0], reqs[1]], progress=False)
        res = [res[1], res[2], res[0]]
    assert res[0].text is None and "HTTP 503" in res[0].error and res[0].attempts == 3
    assert res[1].text is None and "HTTP 400" in res[1].error and res[1].attempts == 1  # 4xx: no retry
    assert res[2].text == "A" and be.stats.failed == 2 and srv.requests == 5


def test_a_run_without_a_single_answer_is_one_clear_error(tmp_path):
    from microbench.generative.backends import GenerativeBackendError

    with ScriptedChatServer(fail=lambda n, body: 404) as srv:  # e.g. a wrong model name
        be = OpenAICompatibleBackend("no-such-model", base_url=srv.base_url)
        with pytest.raises(GenerativeBackendError, match="all 3 requests failed, e.g. 'HTTP 404"):
            be.generate(_requests(3), progress=False)
    with ScriptedChatServer() as srv:  # answers one question, then the server goes away
        url = srv.base_url
        be = OpenAICompatibleBackend("m", base_url=url, cache_dir=tmp_path, max_concurrency=2)
        assert be.generate(_requests(1), progress=False)[0].text == "A"
    be = OpenAICompatibleBackend("m", base_url=url, cache_dir=tmp_path, max_concurrency=2, backoff_s=0.01)
    t = __import__("time").perf_counter()
    with pytest.raises(GenerativeBackendError, match=f"cannot reach the chat-completions server at {url}.*1 answers cached"):
        be.generate(_requests(50), progress=False)
    assert __import__("time").perf_counter() - t < 5  # stops at once instead of retrying 50 questions
    assert len(be.generate(_requests(1), progress=False)) == 1  # a fully cached rerun needs no server


def test_client_timeout_is_retried():
    with ScriptedChatServer(fail=lambda n, body: "hang" if n == 2 else None, hang_s=1.5) as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, timeout_s=0.3, backoff_s=0.01, max_concurrency=1)
        res = be.generate(_requests(2), progress=False)
    assert [r.text for r in res] == ["A", "A"] and be.stats.timeouts == 1 and be.stats.retries == 1


def test_client_respects_the_concurrency_limit():
    with ScriptedChatServer(delay_s=0.05) as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, max_concurrency=4)
        be.generate(_requests(40), progress=False)
    assert srv.max_in_flight == 4 and be.stats.max_in_flight == 4 and srv.requests == 40


def test_cache_resumes_an_interrupted_run_and_a_full_rerun_sends_nothing(tmp_path):
    broken = {"on": True}
    with ScriptedChatServer(fail=lambda n, body: 400 if broken["on"] and n % 2 == 0 else None) as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, cache_dir=tmp_path, max_concurrency=1)
        first = be.generate(_requests(10), progress=False)
        failed = sum(r.text is None for r in first)
        assert failed == 5 and len(be.cache) == 5
        broken["on"] = False
        sent_before = srv.requests
        second = be.generate(_requests(10), progress=False)
        assert srv.requests - sent_before == failed and be.stats.cache_hits == 5  # only the missing ones
        assert all(r.text == "A" for r in second)
        third = OpenAICompatibleBackend("m", base_url=srv.base_url, cache_dir=tmp_path).generate(
            _requests(10), progress=False)
        assert srv.requests - sent_before == failed  # nothing new was sent
        assert all(r.cached for r in third)
        # a different image, prompt or parameter is a different question
        other = OpenAICompatibleBackend("m", base_url=srv.base_url, cache_dir=tmp_path, temperature=0.5)
        other.generate(_requests(1), progress=False)
        assert other.stats.cache_hits == 0 and other.stats.requests_sent == 1


def test_payload_images_blind_and_logprobs():
    with ScriptedChatServer(reply=lambda body: "C) something") as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url)
        res = be.generate(_requests(1), progress=False)
        blind = OpenAICompatibleBackend("m", base_url=srv.base_url, blind=True)
        blind.generate(_requests(1), progress=False)
    seen, blind_body = srv.bodies
    content = seen["messages"][0]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[0]["image_url"]["detail"] == "high" and content[-1] == {"type": "text", "text": "question q0"}
    assert [c["type"] for c in blind_body["messages"][0]["content"]] == ["text"]
    assert res[0].letter_logprobs["C"] == pytest.approx(-0.1) and res[0].letter_logprobs["A"] < -1
    assert blind.name == "m+blind"


def test_malformed_replies_count_as_wrong_and_never_crash(tmp_path):
    from microbench.generative.harness import run_generative

    def reply(body):
        text = body["messages"][0]["content"][-1]["text"]
        return {"0": "", "1": "B", "2": "\u00bfqu\u00e9?", "3": None}[text.split("Question:q")[1][0]]

    items = pd.DataFrame({"row_idx": [0, 1, 2, 3], "key": ["cognition"] * 4,
                          "question": ["q0", "q1", "q2", "q3"], "options": [["x", "y"]] * 4, "gold_idx": [1] * 4})
    with ScriptedChatServer(reply=reply) as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, cache_dir=tmp_path, backoff_s=0.01, max_retries=1)
        preds = run_generative(items, lambda r: [PNG], be, progress=False)
    assert preds["correct"].tolist() == [False, True, False, False]
    assert preds["pred_idx"].tolist() == [-1, 1, -1, -1]
    assert "malformed" in preds.loc[3, "error"] and be.stats.failed == 1


def test_a_server_answering_200_with_a_non_json_body_is_a_failure_not_a_score_of_zero(tmp_path):
    """Twelve HTTP 200 replies with an HTML body scored 0.00 ± 0.00 with exit 0."""
    from microbench.generative.backends import GenerativeBackendError
    from microbench.generative.harness import run_generative

    items = pd.DataFrame({"row_idx": range(12), "key": ["cognition"] * 12, "question": [f"q{i}" for i in range(12)],
                          "options": [["x", "y"]] * 12, "gold_idx": [1] * 12})
    with ScriptedChatServer(fail=lambda n, body: "non_json") as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, cache_dir=tmp_path, fail_fast_after=50)
        with pytest.raises(GenerativeBackendError, match=r"all 12 requests failed, e.g. .malformed response \(HTTP 200"):
            run_generative(items, lambda r: [PNG], be, progress=False)
    assert len(be.cache) == 0  # nothing unparseable is cached
    with ScriptedChatServer(fail=lambda n, body: "non_json" if n % 2 else None) as srv:  # half garbage: counted
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, max_concurrency=1)
        preds = run_generative(items, lambda r: [PNG], be, progress=False)
    assert be.stats.failed == 6 and preds["error"].notna().sum() == 6 and preds["error"].str.contains("<html>").sum() == 6


@pytest.mark.parametrize("outcome", [500, "hang", "non_json"])
def test_a_server_failing_every_request_stops_the_run_early(outcome):
    """A server answering 500 (or hanging) made a run retry every question for about a minute each
    (2.5 h for 1,952 questions). Before the first answer a request is retried at most once (a timeout not at all),
    and after fail_fast_after failures with no answer the run stops with one line."""
    import time

    from microbench.generative.backends import GenerativeBackendError

    with ScriptedChatServer(fail=lambda n, body: outcome, hang_s=3.0) as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, max_concurrency=4, timeout_s=0.5, backoff_s=0.05,
                                     max_retries=6, fail_fast_after=8)
        t = time.perf_counter()
        with pytest.raises(GenerativeBackendError, match="the first [0-9]+ requests all failed .* instead of trying all 1952"):
            be.generate(_requests(1952), progress=False)
        took = time.perf_counter() - t
    assert took < 10, took
    assert srv.requests <= 2 * (8 + 4)  # at most two attempts each of the first few requests


def test_a_healthy_run_keeps_retrying_transient_errors_after_its_first_answer():

    def fail(n, body):  # the first request answers; then every third attempt is a 503
        return 503 if n > 1 and n % 3 == 0 else None

    with ScriptedChatServer(fail=fail) as srv:
        be = OpenAICompatibleBackend("m", base_url=srv.base_url, max_concurrency=1, backoff_s=0.01, fail_fast_after=2)
        res = be.generate(_requests(30), progress=False)
    assert all(r.text == "A" for r in res) and be.stats.retries == srv.errors["503"] and be.stats.failed == 0


@pytest.mark.parametrize(("option", "value"), [("max_concurrency", 0), ("max_concurrency", -2),
                                               ("max_retries", -1), ("fail_fast_after", 0), ("timeout_s", 0)])
def test_impossible_client_options_are_one_line(option, value):
    from microbench.generative.backends import GenerativeBackendError, build_generative_backend

    with pytest.raises(GenerativeBackendError, match=f"model.{option} must be"):
        build_generative_backend("openai", model="m", **{option: value})


# --- data ---------------------------------------------------------------------------------------------------------

def test_sample_cognition_official_and_table_formats_agree():
    official = load_cognition("sample")
    table = load_cognition(str(official.source.location) + "/../cognition_questions.jsonl")
    assert len(official) == len(table) == 12 and official.frame["valid"].all()
    cols = ["question", "gold_idx", "answer", "subdomain", "modality", "scale"]
    a, b = official.frame.set_index("qid")[cols], table.frame.set_index("qid")[cols]
    assert a.sort_index().equals(b.sort_index())
    assert all(len(o) == 6 and o[-1] == "None of the above" for o in official.frame["options"])
    assert official.image_bytes(0)[0][:4] == b"\x89PNG"


def test_table_format_csv_and_problems(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(PNG)
    pd.DataFrame({"image": ["a.png", "a.png", "missing.png"], "question": ["q1", "q2", "q3"],
                  "options": [json.dumps(["x", "y"]), json.dumps(["x", "y"]), json.dumps(["x", "y"])],
                  "answer": ["y", "z", "x"], "subdomain": ["s", "s", "t"]}).to_csv(tmp_path / "q.csv", index=False)
    items = load_cognition(str(tmp_path / "q.csv")).frame
    assert items["gold_idx"].tolist() == [1, -1, -1]
    assert items["problem"].tolist() == ["", "answer 'z' is not one of the options", "no image"]


def _microvqa_fixture(path):
    import datasets
    from PIL import Image

    def png(v):
        return Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8))

    feats = datasets.Features({
        "key_question": datasets.Value("int64"), "key_image": datasets.Value("int64"),
        "images_list": datasets.Sequence(datasets.Image()), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "correct_index": datasets.Value("int64"),
        "correct_answer": datasets.Value("string"), "task": datasets.Value("int64"),
        "task_str": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({
        "key_question": [10, 11], "key_image": [1, 2], "images_list": [[png(10), png(20)], [png(30)]],
        "question": ["Which organelle is stained?", "What explains the phenotype?"],
        "choices": [["nucleus", "mitochondria", "golgi", "ER"], ["a", "b", "c"]], "correct_index": [1, 2],
        "correct_answer": ["mitochondria", "c"], "task": [1, 2],
        "task_str": ["expert_visual_understanding", "hypothesis_gen"]}, features=feats)
    ds.save_to_disk(str(path))
    return path


def test_microvqa_adapter_on_a_fixture(tmp_path):
    path = _microvqa_fixture(tmp_path / "microvqa")
    items = load_cognition(str(path), format="microvqa")
    f = items.frame
    assert f["gold_idx"].tolist() == [1, 2] and f["answer"].tolist() == ["mitochondria", "c"]
    assert f["subdomain"].tolist() == ["expert_visual_understanding", "hypothesis_gen"]
    assert len(items.image_bytes(0)) == 2 and len(items.image_bytes(1)) == 1  # multi-image
    assert f["qid"].tolist() == ["microvqa/10", "microvqa/11"]


# --- end to end: python src/eval.py task=cognition / generative perception, one leaderboard -------------------

def test_cognition_and_generative_perception_end_to_end_into_one_leaderboard(tmp_path, cfg_eval):
    from microbench.results.leaderboard import build_leaderboard
    from microbench.tasks.registry import evaluate

    def reply(body):  # answers the gold letter of cognition questions about pathology images, else "A"
        text = body["messages"][0]["content"][-1]["text"]
        return "B" if "Question:" in text else "The answer is (2)"

    common = ["bootstrap.n_resamples=199", "+trainer.enable_progress_bar=false"]
    with ScriptedChatServer(reply=reply) as srv:
        gen = ["model=openai_compatible", f"model.base_url={srv.base_url}", "model.model=scripted-vlm",
               f"model.cache_dir={tmp_path / 'cache'}"]
        cog, _ = evaluate(cfg_eval([*common, *gen, "task=cognition", f"paths.output_dir={tmp_path / 'gen_cog'}"]))
        per, objs = evaluate(cfg_eval([*common, *gen, f"paths.output_dir={tmp_path / 'gen_per'}",
                                       "data.datasets=[kather_et_al_2016,acevedo_et_al_2020]"]))
        sent = srv.requests
        evaluate(cfg_eval([*common, *gen, "task=cognition", "model.blind=true",
                           f"paths.output_dir={tmp_path / 'blind_cog'}"]))
        assert srv.requests - sent == 12  # blind questions are new questions
        evaluate(cfg_eval([*common, *gen, "task=cognition", f"paths.output_dir={tmp_path / 'again'}"]))
        assert srv.requests - sent == 12  # the repeated run came from the cache
    items = load_cognition("sample").frame
    expected = float((items["gold_idx"] == 1).mean())
    assert cog["headline"]["cognition"]["value"] == pytest.approx(expected) and cog["model"]["kind"] == "generative"
    assert cog["backend_stats"]["requests_sent"] == 12
    preds = objs["predictions"]
    assert (preds["correct"] == (preds["gold_idx"] == 1)).all() and per["task"] == "generative_perception"
    assert per["headline"]["questions"]["coarse"]["n"] > 0
    evaluate(cfg_eval([*common, "task=cognition", f"paths.output_dir={tmp_path / 'tiny_cog'}"]))
    evaluate(cfg_eval([*common, "data.datasets=[kather_et_al_2016]", f"paths.output_dir={tmp_path / 'tiny_per'}"]))
    evaluate(cfg_eval([*common, "task=cognition", "model=random", f"paths.output_dir={tmp_path / 'rand_cog'}"]))
    frame = build_leaderboard([tmp_path], tmp_path / "lb")
    rows = frame.set_index("model")
    assert set(rows.index) == {"scripted-vlm", "scripted-vlm+blind", "microbench-tiny", "random"}
    assert rows.loc["scripted-vlm", "cognition"] == pytest.approx(expected)
    assert rows.loc["scripted-vlm", "coarse"] is not None and rows.loc["microbench-tiny", "coarse"] is not None
    assert rows.loc["microbench-tiny", "kind"] == "open_clip" and rows.loc["scripted-vlm", "kind"] == "generative"
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "cognition" in md and "scripted-vlm+blind" in md


def test_cognition_contrastive_scores_question_plus_option():
    """The zero-shot scorer on cognition items equals a direct computation with the same backbone."""
    import io

    import lightning as L
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from microbench.models.backbones.open_clip_backbone import OpenClipBackbone
    from microbench.models.zero_shot import ZeroShotScorer

    backbone = OpenClipBackbone("microbench-tiny")
    dm = CognitionDataModule(transform=backbone.preprocess)
    dm.setup()
    holder = {}
    scorer = ZeroShotScorer(backbone, sources=("questions",), on_scored=lambda p, s, m: holder.update(p=p))
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        scorer, datamodule=dm, verbose=False)
    preds = holder["p"].sort_values("row_idx")
    items = dm.questions()
    assert len(preds) == 12
    with torch.no_grad():
        for row, pred in zip(preds["row_idx"], preds["pred_idx"], strict=True):
            img = Image.open(io.BytesIO(dm.items.image_bytes(row)[0])).convert("RGB")
            emb = F.normalize(backbone.encode_image(backbone.preprocess(img)[None]).float(), dim=-1)
            q, opts = items.at[row, "question"], items.at[row, "options"]
            t = F.normalize(backbone.encode_text(backbone.tokenize([f"{q} {o}" for o in opts])).float(), dim=-1)
            assert int((emb @ t.T).argmax()) == pred


def test_hf_backend_on_a_tiny_random_llava(tmp_path):
    """Batched greedy decoding with left padding equals one-by-one decoding; letters' log-probs; cache; blind."""
    import io

    from PIL import Image

    from microbench.generative.backends import HFVisionBackend
    from tiny_vlm import make_tiny_llava

    path = make_tiny_llava(tmp_path / "llava")
    images = []
    for color in ((200, 10, 10), (10, 200, 10), (10, 10, 200)):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buf, "PNG")
        images.append(buf.getvalue())
    reqs = [Request(str(i), official_prompt(f"question {'long ' * i}{i}", ["x", "y", "z"]), [images[i]])
            for i in range(3)]
    batched = HFVisionBackend(path, dtype="float32", batch_size=3, max_new_tokens=4, cache_dir=tmp_path / "c")
    out = batched.generate(reqs, progress=False)
    single = HFVisionBackend(path, dtype="float32", batch_size=1, max_new_tokens=4)
    ref = single.generate(reqs, progress=False)
    assert [r.text for r in out] == [r.text for r in ref] and all(isinstance(r.text, str) for r in out)
    for a, b in zip(out, ref, strict=True):
        assert set(a.letter_logprobs) >= {"A", "B", "C"}
        assert all(v <= 0 for v in a.letter_logprobs.values())
        assert a.letter_logprobs == pytest.approx(b.letter_logprobs, abs=1e-4)
    assert batched.stats.requests_sent == 3 and batched.describe()["backend"] == "hf"
    again = HFVisionBackend(path, dtype="float32", batch_size=3, max_new_tokens=4, cache_dir=tmp_path / "c")
    assert [r.text for r in again.generate(reqs, progress=False)] == [r.text for r in out]
    assert again.stats.cache_hits == 3 and again.stats.requests_sent == 0
    blind = HFVisionBackend(path, dtype="float32", batch_size=3, max_new_tokens=4, blind=True)
    assert all(isinstance(r.text, str) for r in blind.generate(reqs, progress=False)) and blind.stats.failed == 0


def test_microvqa_generative_with_its_own_prompt_and_all_images(tmp_path, cfg_eval):
    from microbench.tasks.registry import evaluate

    path = _microvqa_fixture(tmp_path / "microvqa")
    with ScriptedChatServer(reply=lambda body: "Step by step... so the answer is (2)") as srv:
        record, objs = evaluate(cfg_eval([
            "task=cognition", f"cognition.path={path}", "cognition.format=microvqa", "model=openai_compatible",
            f"model.base_url={srv.base_url}", "model.model=m", "model.prompt=microvqa", "model.cache_dir=null",
            f"paths.output_dir={tmp_path / 'run'}"]))
        n_images = sorted(sum(c["type"] == "image_url" for c in b["messages"][0]["content"]) for b in srv.bodies)
        prompts = [b["messages"][0]["content"][-1]["text"] for b in srv.bodies]
    assert n_images == [1, 2]  # every image of a multi-image question is sent
    assert all("Options:\n  (1):" in p and "The answer is (X)" in p for p in prompts)
    assert record["headline"]["cognition"]["value"] == 0.5  # answer (2) = index 1: right for the first question
    assert record["metrics"]["cognition/subdomain/expert_visual_understanding"]["value"] == 1.0
    assert objs["predictions"]["pred_idx"].tolist() == [1, 1]


def test_an_unknown_backend_is_one_clear_error():
    from microbench.generative.backends import GenerativeBackendError, build_generative_backend

    with pytest.raises(GenerativeBackendError, match="backend must be one of"):
        build_generative_backend("grpc", model="m")
    # a typo in model.<key> is caught before any work, with the other problems of the run
    # (tests/test_configs.py::test_every_typo_of_a_run_is_reported_at_once_with_its_fix_before_any_work)
