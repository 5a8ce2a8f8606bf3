"""A small, fast CNN: the default classifier on CPU and on edge devices."""

from __future__ import annotations

import keras
from keras import layers

from medrobust.classes import NUM_CLASSES

# Short CPU schedules change the weights fast; 0.99 leaves inference statistics lagging behind.
BN_MOMENTUM = 0.9


def small_cnn(image_size: int = 28, width: int = 32, num_classes: int = NUM_CLASSES, name: str = "small_cnn") -> keras.Model:
    """Two conv blocks (conv-BN-ReLU x2, max-pool), global average pool, a dense "features" layer, logits."""
    inputs = keras.Input((image_size, image_size, 1), name="image")
    h = inputs
    for filters in (width, 2 * width):
        for _ in range(2):
            h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
            h = layers.BatchNormalization(momentum=BN_MOMENTUM)(h)
            h = layers.ReLU()(h)
        h = layers.MaxPooling2D()(h)
    h = layers.Conv2D(4 * width, 3, padding="same", use_bias=False)(h)
    h = layers.BatchNormalization(momentum=BN_MOMENTUM)(h)
    h = layers.ReLU()(h)
    h = layers.GlobalAveragePooling2D()(h)
    features = layers.Dense(4 * width, activation="relu", name="features")(h)
    logits = layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs, logits, name=name)
