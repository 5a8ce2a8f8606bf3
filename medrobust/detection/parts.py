"""The detector's parts: their names, which need the autoencoder or a log scale, the combination rules,
the part settings, and the two rules the score graph and its numpy twin share (which parts a rule pools,
the scale a part is standardised on). numpy only."""

from __future__ import annotations

import numpy as np

ALL_PARTS = ("reconstruction", "feature", "mahalanobis", "mahalanobis_early", "mahalanobis_middle", "residual",
             "squeeze_bits", "squeeze_median", "boundary")
LEGACY_PARTS = ("reconstruction", "feature", "mahalanobis", "boundary")  # what a medrobust-uad/1 detector has
# Default of Detector.fit (and so of `python -m medrobust.train`), chosen on kermany/val by
# benchmarks/detector_quality.py --run (lowest adaptive system risk at 1/255 and 2/255 while flagging every
# kind of non-OCT input): the autoencoder parts were at chance on real scans, bit-depth squeezing and the
# boundary margin carry the detection.
DEFAULT_PARTS = ("mahalanobis", "squeeze_bits", "boundary")
PARTS = DEFAULT_PARTS
SCORE_NAMES = ("combined",) + DEFAULT_PARTS
AE_PARTS = ("reconstruction", "feature")
LOG_PARTS = ("reconstruction", "feature", "mahalanobis", "mahalanobis_early", "mahalanobis_middle", "residual",
             "squeeze_bits", "squeeze_median")  # positive, heavy-tailed: standardised as log(score + floor)
# An L1 change of the softmax below 0.001 carries no information (and its log would dominate the spread).
LOG_FLOORS = {"squeeze_bits": 1e-3, "squeeze_median": 1e-3}
COMBINATIONS = ("max", "sum", "max_all", "sum_positive")
SQUEEZE_BITS = 5  # Xu et al. 2018's choice for 8-bit natural images (CIFAR-10, ImageNet)
MEDIAN_SQUEEZERS = ("median2", "median3")
RESIDUAL_DEFAULTS = {"dark_fraction": 0.5, "softness": 0.02, "background": 5}
BOUNDARY_DELTA = 0.01
GAUSSIAN_ARRAYS = ("means", "precision", "whitening")
# stats.npz keys: penultimate Gaussians as in format /1, the tapped layers' with a prefix ("early_means", ...)
STAT_PREFIX = {"mahalanobis": "", "mahalanobis_early": "early_", "mahalanobis_middle": "middle_"}


def pooled_parts(parts, rule: str) -> list[str]:
    """The parts whose positive z-scores are summed into the pooled anomaly score of rule "max" (all but
    boundary) or "sum_positive" (all)."""
    if rule == "max":
        return [p for p in parts if p != "boundary"]
    return list(parts) if rule == "sum_positive" else []


def log_np(name: str, v: np.ndarray) -> np.ndarray:
    """The scale a part is standardised on (numpy twin of the graph's transform)."""
    if name not in LOG_PARTS:
        return np.asarray(v, np.float64)
    return np.log(np.maximum(np.asarray(v, np.float64) + LOG_FLOORS.get(name, 0.0), 1e-12))
