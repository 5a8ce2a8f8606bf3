"""Stratified labeled/unlabeled split for the label-scarce protocol."""

from __future__ import annotations

import numpy as np


def labeled_unlabeled_split(y: np.ndarray, label_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (labeled, unlabeled) of a split that keeps each class's share of labels.

    Every class keeps round(fraction * count) labels, at least one; label_fraction 1.0 labels all.
    Deterministic for a given seed; both index arrays are sorted.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    labeled = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        k = max(1, int(round(label_fraction * len(members))))
        labeled.append(rng.choice(members, size=k, replace=False))
    labeled = np.sort(np.concatenate(labeled))
    unlabeled = np.setdiff1d(np.arange(len(y)), labeled)
    return labeled, unlabeled
