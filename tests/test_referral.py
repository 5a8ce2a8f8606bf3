"""The referral operating point (medrobust.evaluation.referral): disease vs NORMAL at a threshold chosen on val."""

from __future__ import annotations

import numpy as np
import pytest

from medrobust.evaluation.referral import (NORMAL, choose_threshold, disease_probability, fit_operating_point,
                                           is_disease, operating_points, refer, referral_metrics)


def _sensitivity(score, disease, t):
    return refer(score, t)[disease].mean()


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_threshold_is_the_highest_that_reaches_the_target(target):
    rng = np.random.default_rng(0)
    disease = rng.random(300) < 0.4
    score = np.clip(rng.normal(np.where(disease, 0.7, 0.3), 0.2), 0, 1)
    t = choose_threshold(score, disease, target)
    assert _sensitivity(score, disease, t) >= target
    higher = score[score > t]
    if len(higher):  # the next score up no longer reaches the target
        assert _sensitivity(score, disease, higher.min()) < target


def test_threshold_with_ties_and_errors():
    score = np.array([0.9, 0.9, 0.9, 0.1, 0.2])
    disease = np.array([True, True, True, False, True])
    assert choose_threshold(score, disease, 0.5) == 0.9
    assert choose_threshold(score, disease, 1.0) == 0.2
    with pytest.raises(ValueError, match="no diseased"):
        choose_threshold(score, np.zeros(5, bool), 0.9)
    for bad in (0.0, 1.2, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            choose_threshold(score, disease, bad)


def test_metrics_counts_intervals_and_the_argmax_decision():
    probs = np.array([[0.7, 0.1, 0.1, 0.1],    # CNV, right
                      [0.1, 0.1, 0.2, 0.6],    # DRUSEN read as NORMAL: missed at arg-max
                      [0.1, 0.1, 0.1, 0.7],    # NORMAL, right
                      [0.5, 0.0, 0.0, 0.5]])   # NORMAL, tie broken to CNV by arg-max: referred
    y = np.array([0, 2, 3, 3])
    assert NORMAL == 3
    np.testing.assert_allclose(disease_probability(probs), [0.9, 0.4, 0.3, 0.5])
    np.testing.assert_array_equal(is_disease(y), [True, True, False, False])
    out = operating_points(probs, y, threshold=0.35)
    assert out["argmax"]["sensitivity"] == 0.5 and out["argmax"]["specificity"] == 0.5
    op = out["operating_point"]
    assert op["threshold"] == 0.35 and op["sensitivity"] == 1.0 and op["specificity"] == 0.5 and op["referred"] == 3
    assert op["n_disease"] == 2 and op["n_normal"] == 2
    low, high = op["ci95"]["sensitivity"]
    assert 0 < low < 1.0 <= high + 1e-12
    assert "operating_point" not in operating_points(probs, y, None)
    empty = referral_metrics(np.zeros(2, bool), np.zeros(2, bool))
    assert empty["sensitivity"] is None and empty["ci95"]["sensitivity"] is None and empty["specificity"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        disease_probability(np.ones((3, 2)))


def test_fit_on_val_records_what_it_chose():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 2.0 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    point = fit_operating_point(probs, y, 0.95)
    assert point["chosen_on"] == "val" and point["target_sensitivity"] == 0.95
    assert point["val"]["sensitivity"] >= 0.95
    # At >= 0.95 sensitivity it refers more than the arg-max decision does.
    assert point["val"]["referred"] >= operating_points(probs, y, None)["argmax"]["referred"]
