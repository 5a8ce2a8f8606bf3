"""System adversarial risk of a classify-or-detect system (Li, Pan & Zhu 2020).

Over the test images the classifier gets right when clean, the system risk at one attack and budget is
the fraction whose attacked version is BOTH misclassified AND not flagged by the detector: the cases where
the system silently gives a wrong diagnosis. The classifier-only risk drops the detector (the fraction
misclassified after attack), so the detector's contribution is the gap between the two. The price of the
detector is the clean false-referral rate: clean images flagged and sent to a human.
"""

from __future__ import annotations

import numpy as np


def system_risk(clean_correct: np.ndarray, attacked_wrong: np.ndarray, attacked_flagged: np.ndarray) -> dict:
    """Risk figures from per-image booleans (all the same length; one entry per test image)."""
    clean_correct = np.asarray(clean_correct, bool)
    attacked_wrong = np.asarray(attacked_wrong, bool)
    attacked_flagged = np.asarray(attacked_flagged, bool)
    n = int(clean_correct.sum())
    if n == 0:
        return {"system_risk": None, "classifier_only_risk": None, "n_clean_correct": 0}
    fooled = attacked_wrong & clean_correct
    silent = fooled & ~attacked_flagged
    return {
        "system_risk": float(silent.sum() / n),
        "classifier_only_risk": float(fooled.sum() / n),
        "n_clean_correct": n,
    }


def clean_false_referral_rate(clean_flagged: np.ndarray) -> float:
    """Fraction of clean images the detector flags (each one costs a human review)."""
    clean_flagged = np.asarray(clean_flagged, bool)
    return float(clean_flagged.mean()) if len(clean_flagged) else 0.0
