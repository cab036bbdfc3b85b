"""Bootstrap CIs (against scipy) and the closed-VQA slices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from microbench.metrics.bootstrap import (
    bootstrap_accuracy,
    bootstrap_macro,
    paired_bootstrap_delta,
    scipy_bootstrap,
)
from microbench.metrics.closed_vqa import closed_vqa_metrics, headline_coverage, headline_table


@pytest.mark.parametrize(("n", "p"), [(1000, 0.37), (200, 0.9), (5000, 0.5)])
def test_fast_bootstrap_agrees_with_scipy(n, p):
    correct = (np.random.default_rng(1).random(n) < p).astype(float)
    fast = bootstrap_accuracy(correct, seed=0)
    ref = scipy_bootstrap(correct, seed=0)
    assert fast.value == ref.value == correct.mean() and fast.n == ref.n == n
    tol = 3.5 / np.sqrt(9999) * np.sqrt(p * (1 - p) / n) * 4 + 1.0 / n  # Monte-Carlo error of the quantiles
    assert abs(fast.low - ref.low) < tol and abs(fast.high - ref.high) < tol
    assert fast.ci == pytest.approx(abs(fast.high - fast.value))
    # the normal approximation is a sanity check on the width
    assert fast.ci == pytest.approx(1.96 * np.sqrt(p * (1 - p) / n), rel=0.2, abs=1.0 / n)


def test_scipy_path_is_the_official_call():
    correct = (np.random.default_rng(2).random(300) < 0.4).astype(float)
    res = stats.bootstrap((correct,), np.mean, confidence_level=0.95, vectorized=True, batch=100, method="basic",
                          rng=np.random.default_rng(7))
    est = scipy_bootstrap(correct, seed=7)
    assert est.low == res.confidence_interval.low and est.high == res.confidence_interval.high
    assert est.ci == abs(res.confidence_interval.high - correct.mean())


def test_seeded_and_edge_cases():
    c = np.r_[np.ones(30), np.zeros(70)]
    assert bootstrap_accuracy(c, seed=3) == bootstrap_accuracy(c, seed=3)
    assert np.isnan(bootstrap_accuracy([]).value) and bootstrap_accuracy([]).n == 0
    allright = bootstrap_accuracy(np.ones(50))
    assert (allright.value, allright.low, allright.high, allright.ci) == (1.0, 1.0, 1.0, 0.0)


def test_macro_bootstrap_matches_brute_force():
    rng = np.random.default_rng(4)
    groups = [(rng.random(n) < p).astype(float) for n, p in ((40, 0.2), (300, 0.7), (90, 0.5))]
    fast = bootstrap_macro(groups, n_resamples=4000, seed=0)
    assert fast.value == pytest.approx(np.mean([g.mean() for g in groups]))
    brute = np.array([np.mean([rng.choice(g, g.size).mean() for g in groups]) for _ in range(4000)])
    lo, hi = 2 * fast.value - np.percentile(brute, 97.5), 2 * fast.value - np.percentile(brute, 2.5)
    assert fast.low == pytest.approx(lo, abs=0.012) and fast.high == pytest.approx(hi, abs=0.012)


def _frame() -> pd.DataFrame:
    """Hand-built predictions: 4 datasets x (classification + stain) x variants 0/1, 10 items each."""
    rows = []
    correct_rate = {"kather_et_al_2016": 0.9, "acevedo_et_al_2020": 0.6, "eulenberg_et_al_2017_darkfield": 0.1,
                    "opencell": 0.5}
    for ds, rate in correct_rate.items():
        for qtype in ("classification", "stain"):
            for variant in (0, 1):
                k = int(rate * 10) if variant == 1 else 10 - int(rate * 10)
                for i in range(10):
                    rows.append({"source": "captions", "dataset": ds, "question_type": qtype,
                                 "key": f"{qtype}_{variant}", "variant": variant, "correct": i < k})
    return pd.DataFrame(rows)


def test_slices_and_headline():
    p = _frame()
    m = closed_vqa_metrics(p, n_resamples=999)
    # headline fine: classification_1 over official datasets (kather .9, acevedo .6, eulenberg DF .1)
    assert m["captions/official/fine"]["value"] == pytest.approx((9 + 6 + 1) / 30)
    assert m["captions/official/fine"]["n"] == 30
    assert m["captions/official_excl_eulenberg/fine"]["value"] == pytest.approx((9 + 6) / 20)
    assert m["captions/official/coarse"]["value"] == pytest.approx((9 + 6 + 1) / 30)  # stain_1
    # all variants, all datasets
    assert m["captions/all/fine"]["value"] == pytest.approx(0.5) and m["captions/all/fine"]["n"] == 80
    # official slices and tables use the _1 variant only (eVLLM matches {<type>, <type>_1} exactly)
    assert m["captions/slice/pathology/fine"]["value"] == pytest.approx((9 + 6) / 20)
    assert m["captions/slice/he/fine"]["value"] == pytest.approx(9 / 10)
    assert m["captions/slice/non_official/fine"]["n"] == 10
    assert m["captions/official/type/stain"]["value"] == pytest.approx((9 + 6 + 1) / 30)
    assert m["captions/official_excl_eulenberg/type/stain"]["value"] == pytest.approx((9 + 6) / 20)
    assert m["captions/dataset/kather_et_al_2016/fine"]["value"] == pytest.approx(0.9)
    assert m["captions/dataset/kather_et_al_2016/fine"]["n"] == 10
    # pooled numbers say what they pool
    assert m["captions/all_variants/slice/pathology/fine"]["value"] == pytest.approx(0.5)  # (9+1+6+4)/40
    assert m["captions/all_variants/slice/he/fine"]["value"] == pytest.approx(0.5)  # (9 + 1)/20
    assert m["captions/all_variants/slice/non_official/fine"]["n"] == 20
    assert m["captions/all_variants/type/stain"]["n"] == 80
    assert m["captions/all_variants/dataset/kather_et_al_2016/fine"]["value"] == pytest.approx(0.5)
    assert not any(k.startswith("captions/type/") for k in m)  # the old ambiguous name is gone
    assert m["captions/key/classification_1"]["value"] == pytest.approx((9 + 6 + 1 + 5) / 40)
    assert m["captions/variant/0"]["n"] == 80
    assert m["captions/macro_dataset/fine"]["datasets"] == 4
    assert m["captions/macro_dataset/fine"]["value"] == pytest.approx((0.9 + 0.6 + 0.1 + 0.5) / 4)
    h = headline_table(m)
    assert set(h) == {"coarse", "fine", "coarse_excl_eulenberg", "fine_excl_eulenberg"}
    for v in m.values():
        assert v["low"] <= v["value"] <= v["high"] or v["ci"] == 0


def test_headline_coverage_says_why_a_headline_shrinks_or_vanishes():
    p = _frame()
    assert all(not g["note"] for g in headline_coverage(p)["captions"].values())
    # one official dataset without classification_1: the fine headline drops it, and says so with the counts
    drop = (p["dataset"] == "acevedo_et_al_2020") & (p["key"] == "classification_1")
    cov = headline_coverage(p[~drop])["captions"]
    assert cov["fine"]["n"] == 20 and cov["fine"]["missing_datasets"] == ["acevedo_et_al_2020"]
    assert "1 official dataset(s)" in cov["fine"]["note"] and "acevedo_et_al_2020" in cov["fine"]["note"]
    assert not cov["coarse"]["note"]
    # no _1 variant at all: n/a, with the number of items that exist
    only0 = p[p["variant"] == 0]
    cov = headline_coverage(only0)["captions"]
    assert cov["fine"]["n"] == 0 and "n/a" in cov["fine"]["note"] and "30 fine items" in cov["fine"]["note"]
    assert "captions/official/fine" not in closed_vqa_metrics(only0, n_resamples=99)
    # no official dataset: n/a, naming what the copy holds
    cov = headline_coverage(p[p["dataset"] == "opencell"])["captions"]
    assert "none of the 20 fine items" in cov["fine"]["note"] and "opencell" in cov["fine"]["note"]


# --- image-clustered intervals and exact paired bounds -------------------------------------------------------------

def test_clustered_interval_widens_by_sqrt_k_when_items_are_duplicated_per_image():
    from microbench.metrics.bootstrap import bootstrap_accuracy, clustered_bootstrap

    rng = np.random.default_rng(0)
    per_image = rng.random(400) < 0.6  # one answer per image
    one = clustered_bootstrap(per_image, np.arange(400), 4000, seed=1)
    for k in (4, 9):  # every question of an image answered alike, k questions per image
        values, images = np.repeat(per_image, k), np.repeat(np.arange(400), k)
        clustered = clustered_bootstrap(values, images, 4000, seed=1)
        iid = bootstrap_accuracy(values, 4000, seed=1)
        assert clustered.value == pytest.approx(per_image.mean())
        width, iid_width, one_width = (e.high - e.low for e in (clustered, iid, one))
        assert width == pytest.approx(one_width, rel=0.15)  # duplicated answers carry no extra information
        assert width / iid_width == pytest.approx(np.sqrt(k), rel=0.15)  # ... which the i.i.d. interval ignores


def test_a_model_against_itself_is_exactly_zero_and_bounds_stay_in_range():
    from microbench.metrics.bootstrap import clustered_bootstrap, clustered_paired_delta

    rng = np.random.default_rng(2)
    correct = rng.random(300) < 0.5
    images = rng.integers(0, 60, 300)
    d = clustered_paired_delta(correct, correct, images, 999)
    assert (d.value, d.low, d.high, d.ci) == (0.0, 0.0, 0.0, 0.0)
    near_one = np.ones(40, dtype=bool)
    near_one[0] = False
    e = clustered_bootstrap(near_one, np.arange(40), 9999)
    assert 0 <= e.low <= e.value <= e.high <= 1.0  # the official basic bootstrap gives a high above 1 here


def _slow_clustered(values, clusters, n_resamples, seed):
    """The obvious implementation: draw images with replacement, concatenate their items, take the mean."""
    rng = np.random.default_rng(seed)
    ids = np.unique(clusters)
    items = {c: values[clusters == c] for c in ids}
    stats = [np.concatenate([items[c] for c in rng.choice(ids, size=len(ids))]).mean() for _ in range(n_resamples)]
    return np.percentile(stats, [2.5, 97.5])


def test_the_clustered_bootstrap_agrees_with_a_direct_implementation():
    from microbench.metrics.bootstrap import clustered_bootstrap

    rng = np.random.default_rng(3)
    clusters = rng.integers(0, 80, 500)
    values = (rng.random(500) < 0.3 + 0.4 * (clusters % 2)).astype(float)  # images differ in difficulty
    fast = clustered_bootstrap(values, clusters, 4000, seed=0)
    lo, hi = _slow_clustered(values, clusters, 4000, seed=5)
    assert fast.low == pytest.approx(lo, abs=0.012) and fast.high == pytest.approx(hi, abs=0.012)


def test_a_paired_bound_that_is_exactly_zero_is_not_significant():
    """n = 100 items, 7 gained, 1 lost, 999 resamples: the lower bound is exactly 0 (2·6 − 12 counts); computed in
    fractions it came out +1.4e-17 and the delta was flagged significant."""
    a, b = np.zeros(100, dtype=bool), np.zeros(100, dtype=bool)
    b[:7] = True
    a[7] = True
    d = paired_bootstrap_delta(a, b, 999, seed=0)
    assert d.value == pytest.approx(0.06) and d.low == 0.0  # exactly, on the 1/n lattice
    assert not (d.low > 0 or d.high < 0)


def test_every_metric_carries_an_image_clustered_interval_beside_the_official_one():
    """The official interval (and every official number) is unchanged; `clustered` is added beside it, wider where
    an image's questions agree, inside [0, 1]."""
    p = _frame()
    p["image_id"] = [f"{r.dataset}-{i % 10}" for i, r in enumerate(p.itertuples())]  # one image: 4 questions
    with_c = closed_vqa_metrics(p, n_resamples=1999)
    without = closed_vqa_metrics(p, n_resamples=1999, clustered=False)
    assert set(with_c) == set(without)
    for name, e in with_c.items():
        assert {k: v for k, v in e.items() if k != "clustered"} == without[name], name
        if "clustered" in e:
            c = e["clustered"]
            assert c["interval"] == "image-clustered percentile bootstrap"
            assert 0 <= c["low"] <= e["value"] <= c["high"] <= 1, name
    # the same answer to every question of an image: the clustered interval is wider than the official one
    agree = p.assign(correct=p["image_id"].map(lambda s: int(s.rsplit("-", 1)[1]) % 2 == 0))
    m = closed_vqa_metrics(agree, n_resamples=1999)["captions/all/all"]
    assert m["clustered"]["high"] - m["clustered"]["low"] > 1.5 * (m["high"] - m["low"])


def test_cognition_metrics_carry_the_image_clustered_interval_wider_when_questions_share_images():
    """Cognition keeps its official (basic) interval and gets the clustered one beside it; questions asked k times
    of one image (all answered alike) leave it that of the images, √k wider than the i.i.d. one, which shrinks."""
    from microbench.metrics.cognition import cognition_metrics

    rng = np.random.default_rng(0)
    n_img = 200
    right = rng.uniform(size=n_img) < 0.6
    boot = {"n_resamples": 1999, "confidence": 0.95, "seed": 0}
    widths = {}
    for k in (1, 4):
        items = pd.DataFrame({"row_idx": np.arange(n_img * k), "image_id": np.repeat([f"im{i}" for i in range(n_img)], k),
                              "subdomain": "s", "modality": "m", "domain": "d", "scale": "x"})
        preds = pd.DataFrame({"row_idx": items["row_idx"], "dataset": "ds", "correct": np.repeat(right, k)})
        m = cognition_metrics(preds, items, boot)
        e = m["cognition/all"]
        assert e["value"] == pytest.approx(right.mean()) and 0 <= e["clustered"]["low"] <= e["value"] <= e[
            "clustered"]["high"] <= 1
        assert m["cognition/dataset/ds"]["clustered"] == e["clustered"]
        widths[k] = (e["clustered"]["high"] - e["clustered"]["low"], e["high"] - e["low"])
    assert widths[4][0] == pytest.approx(widths[1][0], rel=0.15)  # the same 200 independent images ...
    assert widths[4][1] == pytest.approx(widths[1][1] / 2, rel=0.15)  # ... which the i.i.d. interval counts as 800
