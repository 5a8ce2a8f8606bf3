"""The referral operating point on the device: disease (CNV, DME, DRUSEN) vs NORMAL.

The run chooses a threshold on P(disease) = 1 - P(NORMAL) on its validation split for a target sensitivity
(medrobust.evaluation.referral, Kermany et al. 2018's referral figures); the bundle's manifest carries it
("referral"), and medrobust-screen applies it here, the same rule as the training side's ``refer``.
"""

from __future__ import annotations

REFERRAL_COLUMNS = ("p_disease", "disease_screen")
SCREEN_POSITIVE, SCREEN_NEGATIVE = "positive", "negative"
REFERRAL_RULE = ("p_disease = 1 - P(NORMAL); disease_screen = 'positive' (refer to an ophthalmologist) if "
                 "p_disease >= referral.threshold, else 'negative'. The detector's verdict is separate: "
                 "'refer' means do not trust either on this scan")


def disease_screen(p_disease: float, threshold: float) -> dict:
    """{p_disease (6 decimals), disease_screen} at the referral threshold (REFERRAL_RULE)."""
    return {"p_disease": float(f"{p_disease:.6f}"),
            "disease_screen": SCREEN_POSITIVE if p_disease >= threshold else SCREEN_NEGATIVE}
