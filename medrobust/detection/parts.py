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


# One line per part for people reading a bundle's manifest or the device report (what a high score means).
PART_DESCRIPTIONS = {
    "reconstruction": "autoencoder reconstruction error (the scan does not look like the clean training scans)",
    "feature": "the classifier disagrees with itself on the scan and on its autoencoder reconstruction",
    "mahalanobis": "penultimate classifier features far from every class's clean features (Mahalanobis)",
    "mahalanobis_early": "early-layer classifier features far from every class's clean features (pixel noise)",
    "mahalanobis_middle": "middle-layer classifier features far from every class's clean features",
    "residual": "high-frequency energy in the scan's dark regions (noise or a perturbation where clean OCT "
                "has only speckle)",
    "squeeze_bits": "the prediction changes when the scan is reduced to fewer grey levels (feature squeezing)",
    "squeeze_median": "the prediction changes under median smoothing (feature squeezing)",
    "boundary": "the scan sits close to a decision boundary of the classifier (small top-2 logit margin)",
}
PART_SCALE = ("standardised score z = (v - mean) / sd of the part v (log(v + floor) for positive, heavy-tailed "
              "parts) over clean validation scans: 0 = a typical clean scan, higher = more unusual; the "
              "combined anomaly score is computed from these z by the detector's combination rule")


def combine_np(z: dict, parts, rule: str, anomaly=(0.0, 1.0)) -> np.ndarray:
    """numpy twin of the score graph's combination: the combined score from the part z-scores {name: [n]}
    (rule and anomaly standardisation as in the detector's config)."""
    if rule not in COMBINATIONS:
        raise ValueError(f"combination must be one of {', '.join(COMBINATIONS)}, got {rule!r}")
    zs = {name: np.asarray(z[name], np.float64) for name in parts}
    if rule == "sum":
        return sum(zs[name] for name in parts)
    if rule == "max_all":
        return np.max(np.stack([zs[name] for name in parts], axis=1), axis=1)
    pooled = pooled_parts(parts, rule)
    score = None
    if pooled:
        score = (sum(np.maximum(zs[name], 0.0) for name in pooled) - anomaly[0]) / anomaly[1]
    if rule == "max" and "boundary" in parts:
        score = zs["boundary"] if score is None else np.maximum(zs["boundary"], score)
    return score


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
