"""System risk and clinical metrics on hand-made arrays, where the right answer is known."""

import numpy as np
import pytest

from medrobust.evaluation.metrics import clinical_metrics, detection_auroc, wilson_ci
from medrobust.evaluation.risk import clean_false_referral_rate, system_risk

rng = np.random.default_rng(0)
CORRECT = rng.random(200) < 0.8
WRONG = rng.random(200) < 0.5


def test_risk_is_zero_when_the_detector_flags_everything():
    r = system_risk(CORRECT, WRONG, np.ones(200, bool))
    assert r["system_risk"] == 0.0 and r["classifier_only_risk"] > 0


def test_risk_equals_classifier_only_risk_when_the_detector_flags_nothing():
    r = system_risk(CORRECT, WRONG, np.zeros(200, bool))
    assert r["system_risk"] == r["classifier_only_risk"] == pytest.approx(np.sum(CORRECT & WRONG) / CORRECT.sum())


def test_risk_counts_only_clean_correct_images_that_are_fooled_and_unflagged():
    correct = np.array([1, 1, 1, 1, 0], bool)
    wrong = np.array([1, 1, 0, 0, 1], bool)
    flagged = np.array([1, 0, 1, 0, 0], bool)
    r = system_risk(correct, wrong, flagged)
    assert r == {"system_risk": 0.25, "classifier_only_risk": 0.5, "n_clean_correct": 4}
    assert system_risk(np.zeros(3, bool), wrong[:3], flagged[:3])["system_risk"] is None
    assert clean_false_referral_rate(flagged) == 0.4


def test_clinical_metrics_on_a_known_confusion():
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 1, 1, 1, 2, 3, 3, 3])
    probs = np.eye(4)[pred] * 0.9 + 0.025
    m = clinical_metrics(y, probs)
    assert m["accuracy"] == 0.75
    cnv = m["per_class"]["CNV"]
    assert (cnv["sensitivity"], cnv["specificity"], cnv["support"]) == (0.5, 1.0, 2)
    assert cnv["ci95"]["sensitivity"] == pytest.approx(wilson_ci(1, 2))
    assert m["per_class"]["NORMAL"]["specificity"] == pytest.approx(5 / 6)
    # urgent = CNV/DME: all four urgent predicted urgent; of DRUSEN/NORMAL none predicted urgent
    assert (m["urgent_referral"]["sensitivity"], m["urgent_referral"]["specificity"]) == (1.0, 1.0)
    assert m["accuracy_ci95"] == pytest.approx(wilson_ci(6, 8))
    assert 0.5 < m["macro_auroc"] <= 1.0


def test_detection_auroc_orders_scores():
    assert detection_auroc(np.array([0.1, 0.2]), np.array([0.9, 0.8])) == 1.0
    assert detection_auroc(np.array([0.9]), np.array([0.1])) == 0.0
    assert detection_auroc(np.array([0.1]), np.array([])) is None


def test_wilson_interval_matches_known_values():
    """Wilson 95% interval (Brown, Cai & DasGupta 2001): 0 of 10 -> [0, 0.278]; 30 of 100 -> [0.219, 0.396]."""
    assert wilson_ci(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_ci(30, 100) == pytest.approx([0.2189, 0.3958], abs=1e-4)
    assert wilson_ci(5, 0) is None
    low, high = wilson_ci(199, 200)
    assert low < 0.995 < high <= 1.0
