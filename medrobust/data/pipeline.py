"""tf.data pipelines over in-memory arrays.

Batches are gathered by shuffled index (one gather per batch instead of one slice per image), so
the input side costs a few microseconds per step and never starves a CPU train step.

Epoch convention (all methods alike, so equal epochs mean equal optimizer steps): one epoch is
ceil(n_train / batch_size) steps, where n_train counts labeled and unlabeled images together. The
labeled stream repeats and reshuffles as often as needed; the unlabeled stream (SSAT) passes once
per epoch, also reshuffled.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def _shuffled_batches(x: np.ndarray, batch_size: int, seed: int, y: np.ndarray | None = None) -> tf.data.Dataset:
    if len(x) < batch_size:
        raise ValueError(f"{len(x)} images is fewer than one batch of {batch_size}; lower --batch-size")
    x = tf.constant(x)
    y = None if y is None else tf.constant(y)
    indices = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    indices = indices.repeat().batch(batch_size, drop_remainder=True)
    if y is None:
        return indices.map(lambda i: tf.gather(x, i), num_parallel_calls=AUTOTUNE)
    return indices.map(lambda i: (tf.gather(x, i), tf.gather(y, i)), num_parallel_calls=AUTOTUNE)


def train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                  x_unlabeled: np.ndarray | None = None, unlabeled_batch_size: int | None = None) -> tf.data.Dataset:
    """An endless dataset of (x, y) batches, or ((x, x_u), y) when an unlabeled pool is given.

    Pass steps_per_epoch(...) to fit(); batches are global (tf.distribute splits them per replica).
    """
    labeled = _shuffled_batches(x, batch_size, seed, y)
    if x_unlabeled is None:
        return labeled.prefetch(AUTOTUNE)
    unlabeled = _shuffled_batches(x_unlabeled, unlabeled_batch_size or batch_size, seed + 1)
    zipped = tf.data.Dataset.zip((labeled, unlabeled)).map(lambda xy, xu: ((xy[0], xu), xy[1]))
    return zipped.prefetch(AUTOTUNE)


def eval_dataset(x: np.ndarray, y: np.ndarray | None = None, batch_size: int = 256) -> tf.data.Dataset:
    """Ordered batches for evaluation and prediction (keeps the last partial batch)."""
    data = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    return data.batch(batch_size).prefetch(AUTOTUNE)
