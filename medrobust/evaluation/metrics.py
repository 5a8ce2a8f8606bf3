"""Clinical and detection metrics on arrays (sklearn underneath)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from medrobust.classes import CLASSES, URGENT_LABELS


SMALL_SAMPLE = 200  # below this many images, a report warns that its proportions are imprecise


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval [low, high] for a proportion successes / n (scipy.stats.binomtest), or None
    when n is 0. Wilson rather than the normal approximation: it stays inside [0, 1] and is sound for
    proportions near 0 or 1 and for small n (Brown, Cai & DasGupta 2001)."""
    from scipy.stats import binomtest

    n, successes = int(n), int(successes)
    if n <= 0:
        return None
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def clinical_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy, per-class sensitivity/specificity (one-vs-rest), urgent-referral sensitivity/specificity
    (CNV+DME vs DRUSEN+NORMAL, as in Kermany et al. 2018) and macro one-vs-rest AUROC."""
    y_true = np.asarray(y_true)
    y_pred = np.argmax(probs, axis=1)
    cm = confusion_matrix(y_true, y_pred, labels=range(len(CLASSES)))
    per_class = {}
    for i, name in enumerate(CLASSES):
        tp, fn = cm[i, i], cm[i].sum() - cm[i, i]
        fp, tn = cm[:, i].sum() - cm[i, i], cm.sum() - cm[i].sum() - cm[:, i].sum() + cm[i, i]
        per_class[name] = {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                           "support": int(cm[i].sum()),
                           "ci95": {"sensitivity": wilson_ci(tp, tp + fn), "specificity": wilson_ci(tn, tn + fp)}}
    urgent_true, urgent_pred = np.isin(y_true, URGENT_LABELS), np.isin(y_pred, URGENT_LABELS)
    present = np.unique(y_true)
    try:
        auroc = float(roc_auc_score(y_true, probs[:, present] / probs[:, present].sum(1, keepdims=True),
                                    multi_class="ovr", average="macro", labels=present)) if len(present) > 2 else None
    except ValueError:
        auroc = None
    tp_u, pos_u = np.sum(urgent_true & urgent_pred), np.sum(urgent_true)
    tn_u, neg_u = np.sum(~urgent_true & ~urgent_pred), np.sum(~urgent_true)
    return {
        "accuracy": float(np.mean(y_pred == y_true)) if len(y_true) else None,
        "accuracy_ci95": wilson_ci(np.sum(y_pred == y_true), len(y_true)),
        "per_class": per_class,
        "urgent_referral": {
            "sensitivity": _ratio(tp_u, pos_u),
            "specificity": _ratio(tn_u, neg_u),
            "ci95": {"sensitivity": wilson_ci(tp_u, pos_u), "specificity": wilson_ci(tn_u, neg_u)},
        },
        "macro_auroc": auroc,
        "confusion_matrix": cm.tolist(),
    }


def balanced_accuracy(per_class: dict) -> float | None:
    """Balanced accuracy: the mean sensitivity over the classes present (clinical_metrics' per_class), or None."""
    values = [v["sensitivity"] for v in per_class.values() if v["sensitivity"] is not None]
    return float(np.mean(values)) if values else None


def detection_auroc(clean_scores: np.ndarray, attacked_scores: np.ndarray) -> float | None:
    """AUROC of separating attacked from clean inputs by anomaly score (None if either side is empty)."""
    if len(clean_scores) == 0 or len(attacked_scores) == 0:
        return None
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(attacked_scores))]
    return float(roc_auc_score(labels, np.r_[clean_scores, attacked_scores]))


def roc_points(clean_scores: np.ndarray, attacked_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(attacked_scores))]
    fpr, tpr, _ = roc_curve(labels, np.r_[clean_scores, attacked_scores])
    return fpr, tpr
