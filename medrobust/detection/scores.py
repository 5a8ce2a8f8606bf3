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


def pooled_mahalanobis(feature_map, means, whitening):
    """`mahalanobis_distance` of a layer's feature map [n, h, w, c] averaged over space to [n, c]
    (the "mean of each channel" features of Lee et al. 2018 for intermediate layers)."""
    return mahalanobis_distance(ops.mean(feature_map, axis=(1, 2)), means, whitening)


# -- image filters (min/max networks: no sort, no padding op; TFLite MINIMUM/MAXIMUM/SLICE/CONCATENATION) --

def _edge_pad(x, before: int, after: int):
    """Replicate the border rows/columns of x [n, h, w, c] (concatenation of slices, no PAD op)."""
    for axis in (1, 2):
        size = x.shape[axis]
        first = ops.take(x, [0] * before, axis=axis) if before else None
        last = ops.take(x, [size - 1] * after, axis=axis) if after else None
        x = ops.concatenate([t for t in (first, x, last) if t is not None], axis=axis)
    return x


def _windows(x, k: int):
    """The k*k shifted views of x [n, h, w, c] ('valid' positions), row by row."""
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    return [x[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)]


def median3x3(x):
    """3x3 median filter of x [n, h, w, c] (borders replicated), same shape.

    Median of 9 by the 19 compare-exchanges of the classic optimal network (Paeth 1990, "Median finding
    on a 3x3 grid", Graphics Gems; as in N. Devillard's opt_med9): differentiable almost everywhere (the
    gradient flows to the median pixel), and only MINIMUM/MAXIMUM ops in TFLite.
    """
    p = _windows(_edge_pad(x, 1, 1), 3)

    def sort(a, b):
        p[a], p[b] = ops.minimum(p[a], p[b]), ops.maximum(p[a], p[b])

    for a, b in ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
                 (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2)):
        sort(a, b)
    return p[4]


def median2x2(x):
    """2x2 median filter (mean of the two middle values of each 2x2 window; the window reaches one pixel up
    and left, borders replicated), same shape: the "median smoothing 2x2" squeezer of Xu et al. 2018."""
    a, b, c, d = _windows(_edge_pad(x, 1, 0), 2)
    lo = ops.minimum(ops.minimum(a, b), ops.minimum(c, d))
    hi = ops.maximum(ops.maximum(a, b), ops.maximum(c, d))
    return (a + b + c + d - lo - hi) * 0.5


def box_filter(x, k: int):
    """k x k moving average of x [n, h, w, c] (borders replicated), same shape."""
    before = (k - 1) // 2
    return ops.average_pool(_edge_pad(x, before, k - 1 - before), k, strides=1, padding="valid")


def bit_depth(x, bits: int, bpda: bool = True):
    """Reduce [0, 1] images to 2**bits grey levels: round(x * L) / L with L = 2**bits - 1 (Xu et al. 2018).

    Rounding has zero gradient almost everywhere, which would mask the detector from a gradient attacker;
    with bpda=True the backward pass is the identity (BPDA, Athalye, Carlini & Wagner 2018, straight-
    through estimator): forward value round(x L) / L, gradient 1. stop_gradient is an identity in the
    exported graph, so the TFLite value is the same.
    """
    levels = float(2 ** int(bits) - 1)
    squeezed = ops.round(x * levels) / levels
    return x + ops.stop_gradient(squeezed - x) if bpda else squeezed


SQUEEZERS = {"median2": median2x2, "median3": median3x3,
             **{f"bits{b}": (lambda x, b=b: bit_depth(x, b)) for b in range(1, 8)}}


def squeeze_distance(logits, logits_squeezed):
    """L1 distance between softmax(logits) and softmax(logits_squeezed), in [0, 2] (Xu et al. 2018)."""
    return ops.sum(ops.abs(ops.softmax(logits, axis=-1) - ops.softmax(logits_squeezed, axis=-1)), axis=-1)


def dark_residual_energy(x, dark_fraction: float = 0.5, softness: float = 0.02, background: int = 5):
    """Mean squared high-pass residual x - median3x3(x) over the image's dark (low-signal) region.

    The dark region is estimated per image, not a fixed mask: pixels whose 5x5 local mean b is below
    dark_fraction times the image's mean intensity m (the vitreous above the retina and the deep
    choroid/sclera below it, where clean OCT has only speckle). The mask is soft, w = sigmoid((dark_fraction
    m - b) / (softness m)), so the score is differentiable in the mask too. Score = sum(w r^2) / sum(w), r the
    residual. An L-inf perturbation that covers the whole image adds about its own energy there; natural
    anatomy, which is bright, contributes little. x [n, h, w, 1] in [0, 1]; returns [n].
    """
    r = x - median3x3(x)
    b = box_filter(x, background)
    m = ops.mean(x, axis=(1, 2, 3), keepdims=True) + 1e-6
    w = ops.sigmoid((dark_fraction * m - b) / (softness * m))
    return ops.sum(w * ops.square(r), axis=(1, 2, 3)) / (ops.sum(w, axis=(1, 2, 3)) + 1e-6)


def dark_mask(x, dark_fraction: float = 0.5, background: int = 5):
    """The hard version of the dark-region mask of `dark_residual_energy` (bool [n, h, w, 1], numpy)."""
    x = np.asarray(x, np.float32)
    b = np.asarray(box_filter(x, background))
    return b < dark_fraction * x.mean(axis=(1, 2, 3), keepdims=True)


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
