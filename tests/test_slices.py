"""Test slices (warm / cold items, new users) and the vectorised bootstrap AUC intervals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from sklearn.metrics import roc_auc_score

from bahe_ray.config import EvalConfig
from bahe_ray.train.slices import CHUNK_ELEMENTS, bootstrap_auc, seed_mean_metrics, slice_masks, sliced_metrics


def test_bootstrap_equals_sklearn_on_the_same_resamples_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random(200) < 0.4).astype(float)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # many ties
    boot = bootstrap_auc(labels, [scores], resamples=50, seed=7)
    assert 50 * 200 <= CHUNK_ELEMENTS  # one chunk: the draws below are the function's
    draws = np.random.default_rng(7).integers(0, 200, (50, 200))
    expected = [roc_auc_score(labels[d], scores[d]) for d in draws]
    np.testing.assert_allclose(boot, expected, rtol=0, atol=1e-12)


def test_bootstrap_of_several_score_sets_is_the_mean_auc_on_shared_resamples() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.5).astype(float)
    a, b = rng.random(300) + labels, rng.random(300) + 0.2 * labels
    both = bootstrap_auc(labels, [a, b], resamples=40, seed=1)
    np.testing.assert_allclose(both, (bootstrap_auc(labels, [a], 40, 1) + bootstrap_auc(labels, [b], 40, 1)) / 2)


def test_slices_by_train_impressions_and_users() -> None:
    train = pa.table({"item_id": ["a", "a", "a", "b", "c", "c"], "user_id": ["u1", "u1", "u2", "u2", "u1", "u2"]})
    test = pa.table({"item_id": ["a", "b", "c", "d"], "user_id": ["u1", "u3", "u2", "u3"]})
    masks = slice_masks(test, train, cold_max_impressions=2)
    assert masks["overall"].tolist() == [True] * 4
    assert masks["cold_items"].tolist() == [False, True, True, True]  # a: 3 impressions, b: 1, c: 2, d: none
    assert masks["warm_items"].tolist() == [True, False, False, False]
    assert masks["new_users"].tolist() == [False, True, False, True]


def test_sliced_metrics_intervals_cover_the_auc_and_shrink_with_more_samples() -> None:
    rng = np.random.default_rng(5)
    n = 4000
    labels = (rng.random(n) < 0.5).astype(np.int8)
    scores = rng.random(n) + 0.5 * labels
    small = np.zeros(n, bool)
    small[:400] = True
    table = pa.table({"user_id": [str(i % 50) for i in range(n)], "label": labels, "score": scores})
    out = sliced_metrics(table, {"overall": np.ones(n, bool), "small": small}, EvalConfig(bootstrap_samples=200))
    for name in ("overall", "small"):
        low, high = out[name]["auc_ci95"]
        assert low < out[name]["auc"] < high
    width = {name: out[name]["auc_ci95"][1] - out[name]["auc_ci95"][0] for name in out}
    assert width["small"] > 2 * width["overall"] and out["small"]["samples"] == 400
    seeds = seed_mean_metrics(labels.astype(float), [scores, scores[::-1]], {"overall": np.ones(n, bool)},
                              EvalConfig(bootstrap_samples=100))["overall"]
    assert seeds["auc_seeds"][0] == out["overall"]["auc"] and seeds["auc_std"] > 0.1
