"""The referral operating point: disease (CNV, DME or DRUSEN) vs NORMAL, as clinical screening reports it.

A screening programme asks one question first: does this scan need an ophthalmologist? Kermany et al.
(Cell 2018) report their classifier that way (sensitivity / specificity of referral at an operating point).
The referral score of a scan is P(disease) = 1 - P(NORMAL) from the classifier's softmax; a scan is referred
when the score is >= the threshold. The threshold is chosen on the VALIDATION split for a target
sensitivity (`choose_threshold`), carried by the run (metrics.json "referral") and the edge bundle
(manifest.json "referral"), and applied the same way everywhere (`refer`).

Without a chosen threshold the classifier's own decision (arg-max class != NORMAL) is the operating point.
"""

from __future__ import annotations

import math

import numpy as np

from medrobust.classes import CLASSES
from medrobust.evaluation.metrics import wilson_ci

NORMAL = CLASSES.index("NORMAL")


def disease_probability(probs: np.ndarray) -> np.ndarray:
    """float64 [n]: 1 - P(NORMAL) from softmax probabilities probs [n, 4] (CLASSES order)."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(CLASSES):
        raise ValueError(f"need probabilities of shape [n, {len(CLASSES)}], got {probs.shape}")
    return 1.0 - probs[:, NORMAL]


def is_disease(y: np.ndarray) -> np.ndarray:
    """bool [n]: true labels that are not NORMAL."""
    return np.asarray(y).reshape(-1) != NORMAL


def refer(score: np.ndarray, threshold: float) -> np.ndarray:
    """bool [n]: the scans referred at this threshold (score >= threshold)."""
    return np.asarray(score, np.float64) >= float(threshold)


def choose_threshold(score: np.ndarray, disease: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold whose referral sensitivity on (score, disease) is >= target_sensitivity.

    score: float [n] disease probabilities; disease: bool [n] truth. The highest such threshold refers the
    fewest healthy scans (best specificity) for the target. Raises ValueError if the target is outside
    (0, 1] or there is no diseased scan to choose on.
    """
    if not 0 < float(target_sensitivity) <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    positives = np.sort(np.asarray(score, np.float64)[np.asarray(disease, bool)])[::-1]
    if len(positives) == 0:
        raise ValueError("no diseased scans to choose a referral threshold on")
    needed = math.ceil(float(target_sensitivity) * len(positives) - 1e-9)  # scans that must be referred
    return float(positives[max(needed, 1) - 1])


def referral_metrics(referred: np.ndarray, disease: np.ndarray) -> dict:
    """Sensitivity (diseased scans referred) and specificity (NORMAL scans not referred), with counts and
    95% Wilson intervals (None where a side is empty)."""
    referred, disease = np.asarray(referred, bool), np.asarray(disease, bool)
    tp, pos = int(np.sum(referred & disease)), int(np.sum(disease))
    tn, neg = int(np.sum(~referred & ~disease)), int(np.sum(~disease))
    return {"sensitivity": tp / pos if pos else None, "specificity": tn / neg if neg else None,
            "n_disease": pos, "n_normal": neg, "referred": int(referred.sum()),
            "ci95": {"sensitivity": wilson_ci(tp, pos), "specificity": wilson_ci(tn, neg)}}


def operating_points(probs: np.ndarray, y: np.ndarray, threshold: float | None) -> dict:
    """Referral figures of one set of predictions: at the arg-max decision (predicted class != NORMAL) and,
    when a threshold is given, at the chosen operating point (P(disease) >= threshold)."""
    probs = np.asarray(probs, np.float64)
    disease = is_disease(y)
    out = {"argmax": referral_metrics(probs.argmax(1) != NORMAL, disease)}
    if threshold is not None:
        out["operating_point"] = {"threshold": float(threshold),
                                  **referral_metrics(refer(disease_probability(probs), threshold), disease)}
    return out


def fit_operating_point(val_probs: np.ndarray, y_val: np.ndarray, target_sensitivity: float) -> dict:
    """Choose the threshold on validation predictions; returns what a run records ("referral" in metrics.json):
    target, threshold, the validation figures at it, and how it was chosen."""
    score, disease = disease_probability(val_probs), is_disease(y_val)
    threshold = choose_threshold(score, disease, target_sensitivity)
    return {"target_sensitivity": float(target_sensitivity), "threshold": threshold,
            "score": "1 - P(NORMAL)", "chosen_on": "val", "val": referral_metrics(refer(score, threshold), disease)}
