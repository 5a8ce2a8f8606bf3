"""Differentiable anomaly scores (higher = more suspicious), written with keras.ops only.

Every function here works on TensorFlow tensors (inside a GradientTape, so an adaptive attacker can
backpropagate through the detector) and on symbolic Keras tensors (so `Detector.score_model()` is a
plain Keras graph that converts to TFLite). Each returns one value per image, shape [n].

The statistics they use (class means, whitening matrix, standardisation) are fitted in numpy by the
helpers at the bottom and stored as plain arrays.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

_LOG2 = float(np.log(2.0))
_TINY = 1e-12


def _flat_mean(v):
    return ops.mean(v, axis=tuple(range(1, len(v.shape))))


def reconstruction_error(x, x_rec):
    """Per-image mean squared error between x and its reconstruction."""
    return _flat_mean(ops.square(x - x_rec))


def js_divergence(logits_a, logits_b):
    """Jensen-Shannon divergence (nats, in [0, log 2]) between softmax(logits_a) and softmax(logits_b)."""
    log_p = ops.log_softmax(logits_a, axis=-1)
    log_q = ops.log_softmax(logits_b, axis=-1)
    log_m = ops.logaddexp(log_p, log_q) - _LOG2
    p, q = ops.exp(log_p), ops.exp(log_q)
    return 0.5 * ops.sum(p * (log_p - log_m) + q * (log_q - log_m), axis=-1)


def l2_distance(a, b):
    """Euclidean distance between two batches of vectors (smooth at 0)."""
    return ops.sqrt(ops.sum(ops.square(a - b), axis=-1) + _TINY)


def mahalanobis_distance(features, means, whitening):
    """min over classes c of sqrt((f - mu_c)^T P (f - mu_c)), with P = whitening @ whitening^T.

    features [n, d]; means [k, d]; whitening [d, d]. Computed as ||f W - mu_c W|| so it stays
    numerically stable in float32.
    """
    fw = ops.matmul(features, whitening)  # [n, d]
    mw = ops.matmul(ops.convert_to_tensor(means), whitening)  # [k, d]
    d2 = ops.sum(ops.square(ops.expand_dims(fw, 1) - ops.expand_dims(mw, 0)), axis=-1)  # [n, k]
    return ops.sqrt(ops.min(d2, axis=-1) + _TINY)


def boundary_closeness(logits, delta: float = 0.01):
    """-log(top-1 logit - top-2 logit + delta): high when x sits near a decision boundary.

    The logit margin is the distance of the penultimate features to the nearest decision hyperplane
    of the last layer, up to that hyperplane's weight norm; a minimal-perturbation attack (PGD that
    stops at the first misclassified iterate) leaves its adversaries just across a boundary.
    """
    top2 = ops.top_k(logits, 2)[0]
    return -ops.log(top2[:, 0] - top2[:, 1] + delta)


def log_score(s):
    """Log of a non-negative score (floored), the scale on which positive parts are standardised."""
    return ops.log(ops.maximum(s, _TINY))


# -- fitting the statistics (numpy) -----------------------------------------------------------------

def fit_class_gaussians(features: np.ndarray, labels: np.ndarray, num_classes: int,
                        ridge: float = 1e-6) -> dict[str, np.ndarray]:
    """Class means and one shared (tied) covariance, as in Lee et al. 2018.

    The covariance of the class-centred features is Ledoit-Wolf shrunk (so it is well conditioned
    even with fewer images than feature dimensions) plus `ridge * mean variance` on the diagonal (so
    dead, always-zero feature units cannot make it singular). Classes with no sample get the overall
    mean. Returns float32 arrays: means [k, d], precision [d, d], whitening [d, d] with
    precision = whitening @ whitening.T, and the Ledoit-Wolf shrinkage as a 0-d array.
    """
    from sklearn.covariance import ledoit_wolf

    f = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors [n, d], got shape {f.shape}")
    overall = f.mean(axis=0)
    means = np.stack([f[labels == c].mean(axis=0) if np.any(labels == c) else overall
                      for c in range(num_classes)])
    centred = f - means[labels]
    cov, shrinkage = ledoit_wolf(centred, assume_centered=True)
    cov = cov + np.eye(len(cov)) * ridge * max(float(np.trace(cov)) / len(cov), 1e-12)
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    whitening = np.linalg.cholesky(precision)
    return {"means": means.astype(np.float32), "precision": precision.astype(np.float32),
            "whitening": whitening.astype(np.float32), "shrinkage": np.asarray(shrinkage, np.float32)}


def threshold_at_fpr(clean_scores: np.ndarray, target_fpr: float) -> float:
    """The threshold that flags (score > threshold) at most target_fpr of clean scans, as a guarantee.

    It is the ceil((n + 1)(1 - target_fpr))-th smallest of n clean calibration scores (the split-
    conformal quantile, Vovk et al. 2005): for a new clean scan exchangeable with them,
    P(flagged) <= target_fpr over calibration set and scan. The plain empirical quantile can miss it by
    up to 1/n. With too few scores (n + 1 < 1 / target_fpr) it is the largest score, and misses it.
    """
    scores = np.sort(np.asarray(clean_scores, np.float64).ravel())
    if len(scores) == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("need at least one finite clean score to set a threshold")
    k = math.ceil((len(scores) + 1) * (1.0 - float(target_fpr)))
    return float(scores[min(k, len(scores)) - 1])


def location_scale(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (floored so a constant score cannot divide by zero)."""
    v = np.asarray(values, np.float64)
    mean, std = float(v.mean()), float(v.std())
    return mean, max(std, 1e-6 * max(abs(mean), 1.0), 1e-12)
