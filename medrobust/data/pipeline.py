"""tf.data pipelines over in-memory arrays.

Batches are gathered by shuffled index (one gather per batch instead of one slice per image), so
the input side costs a few microseconds per step and never starves a CPU train step.

Epoch convention (all methods alike, so equal epochs mean equal optimizer steps): one epoch is
ceil(n_train / batch_size) steps, where n_train counts labeled and unlabeled images together. The
labeled stream repeats and reshuffles as often as needed; the unlabeled stream (SSAT) passes once
per epoch, also reshuffled.

Class-balanced sampling (`sampling="balanced"`): the labeled stream draws every class with equal
probability (one endless shuffled stream per class, mixed by `tf.data.Dataset.sample_from_datasets`), so
each batch holds the rare classes (DRUSEN, DME) as often as the common ones and every adversarial batch
attacks them too; the epoch length is unchanged. Rare images are seen more often, not weighted more.

Augmentation (`augment=AUGMENTATION`) happens here, in the training input path only, with Keras
preprocessing layers applied per batch (each image draws its own transform); the model itself, and so
every attack, evaluation and export, never sees an augmentation layer.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE

# Mild, label-preserving changes for OCT B-scans: left/right eyes are mirror images, the retina sits a
# little higher or lower and larger or smaller in the frame, and scanners differ in gain and contrast.
# translate and zoom are fractions of the image side, rotate is in degrees, brightness a shift in
# [0, 1] pixel units, contrast a factor range 1 +- value.
AUGMENTATION = {"flip": "horizontal", "translate": 0.05, "zoom": 0.1, "rotate": 0.0, "brightness": 0.1,
                "contrast": 0.2}


def augmenter(spec: dict = AUGMENTATION, seed: int = 0):
    """A keras.Sequential of preprocessing layers for `spec` (keys as in AUGMENTATION); [n,s,s,1] in [0, 1] in
    and out. Raises ValueError for an unknown key."""
    import keras
    from keras import layers

    unknown = set(spec) - set(AUGMENTATION)
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(sorted(unknown))}; known: {', '.join(AUGMENTATION)}")
    steps = []
    if spec.get("flip"):
        steps.append(layers.RandomFlip(spec["flip"], seed=seed))
    if spec.get("translate"):
        steps.append(layers.RandomTranslation(spec["translate"], spec["translate"], fill_mode="reflect", seed=seed + 1))
    if spec.get("zoom"):
        steps.append(layers.RandomZoom(spec["zoom"], spec["zoom"], fill_mode="reflect", seed=seed + 2))
    if spec.get("rotate"):
        steps.append(layers.RandomRotation(spec["rotate"] / 360.0, fill_mode="reflect", seed=seed + 5))
    if spec.get("brightness"):
        steps.append(layers.RandomBrightness(spec["brightness"], value_range=(0.0, 1.0), seed=seed + 3))
    if spec.get("contrast"):
        steps.append(layers.RandomContrast(spec["contrast"], value_range=(0.0, 1.0), seed=seed + 4))
    steps.append(layers.Lambda(lambda x: tf.clip_by_value(x, 0.0, 1.0), name="clip_to_unit_range"))
    return keras.Sequential(steps, name="augmentation")


SAMPLINGS = ("natural", "balanced")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def _balanced_indices(y: np.ndarray, seed: int) -> tf.data.Dataset:
    """An endless stream of indices into y, each class drawn with probability 1 / (classes present)."""
    y = np.asarray(y).reshape(-1)
    streams = []
    for k, c in enumerate(np.unique(y)):
        members = np.flatnonzero(y == c).astype(np.int64)
        streams.append(tf.data.Dataset.from_tensor_slices(members)
                       .shuffle(len(members), seed=seed + 7 * (k + 1), reshuffle_each_iteration=True).repeat())
    return tf.data.Dataset.sample_from_datasets(streams, weights=[1.0 / len(streams)] * len(streams), seed=seed)


def _shuffled_batches(x: np.ndarray, batch_size: int, seed: int, y: np.ndarray | None = None,
                      augment: dict | None = None, sampling: str = "natural") -> tf.data.Dataset:
    if len(x) < batch_size:
        raise ValueError(f"{len(x)} images is fewer than one batch of {batch_size}; lower --batch-size")
    if sampling not in SAMPLINGS or (sampling == "balanced" and y is None):
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)} (balanced needs labels), got {sampling!r}")
    if sampling == "balanced":
        indices = _balanced_indices(y, seed).batch(batch_size, drop_remainder=True)
    else:
        indices = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        indices = indices.repeat().batch(batch_size, drop_remainder=True)
    x = tf.constant(x)
    y = None if y is None else tf.constant(y)
    transform = augmenter(augment, seed) if augment else (lambda images, training: images)
    if y is None:
        return indices.map(lambda i: transform(tf.gather(x, i), training=True), num_parallel_calls=AUTOTUNE)
    return indices.map(lambda i: (transform(tf.gather(x, i), training=True), tf.gather(y, i)),
                       num_parallel_calls=AUTOTUNE)


def train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                  x_unlabeled: np.ndarray | None = None, unlabeled_batch_size: int | None = None,
                  augment: dict | None = None, sampling: str = "natural") -> tf.data.Dataset:
    """An endless dataset of (x, y) batches, or ((x, x_u), y) when an unlabeled pool is given.

    augment: None, or a spec like AUGMENTATION applied to every training image (labeled and unlabeled).
    sampling: natural (shuffled passes over the labeled images) | balanced (each class equally often in
    the labeled stream; see the module doc). The unlabeled stream is always natural (it has no labels).
    Raises ValueError for an unknown sampling or fewer images than one batch.
    Pass steps_per_epoch(...) to fit(); batches are global (tf.distribute splits them per replica).
    """
    labeled = _shuffled_batches(x, batch_size, seed, y, augment, sampling)
    if x_unlabeled is None:
        return labeled.prefetch(AUTOTUNE)
    unlabeled = _shuffled_batches(x_unlabeled, unlabeled_batch_size or batch_size, seed + 1, augment=augment)
    zipped = tf.data.Dataset.zip((labeled, unlabeled)).map(lambda xy, xu: ((xy[0], xu), xy[1]))
    return zipped.prefetch(AUTOTUNE)


def eval_dataset(x: np.ndarray, y: np.ndarray | None = None, batch_size: int = 256) -> tf.data.Dataset:
    """Ordered batches for evaluation and prediction (keeps the last partial batch)."""
    data = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    return data.batch(batch_size).prefetch(AUTOTUNE)
