"""Small, fast CNNs: the default classifiers on CPU and on edge devices."""

from __future__ import annotations

import keras
from keras import layers

from medrobust.classes import NUM_CLASSES

# Short CPU schedules change the weights fast; 0.99 leaves inference statistics lagging behind.
BN_MOMENTUM = 0.9


def _conv_bn_relu(h, filters: int, strides: int = 1):
    h = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(h)
    h = layers.BatchNormalization(momentum=BN_MOMENTUM)(h)
    return layers.ReLU()(h)


def small_cnn(image_size: int = 28, width: int = 32, num_classes: int = NUM_CLASSES, name: str = "small_cnn",
              stem_stride: int = 1) -> keras.Model:
    """Two conv blocks (conv-BN-ReLU x2, max-pool), global average pool, a dense "features" layer, logits.

    stem_stride 2 makes the first convolution strided, which quarters the cost of every later layer
    (`strided_cnn`); use it for inputs of 64 px and more.
    """
    inputs = keras.Input((image_size, image_size, 1), name="image")
    h = inputs
    for block, filters in enumerate((width, 2 * width)):
        for conv in range(2):
            h = _conv_bn_relu(h, filters, strides=stem_stride if block == conv == 0 else 1)
        h = layers.MaxPooling2D()(h)
    h = _conv_bn_relu(h, 4 * width)
    h = layers.GlobalAveragePooling2D()(h)
    features = layers.Dense(4 * width, activation="relu", name="features")(h)
    logits = layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs, logits, name=name)


def strided_cnn(image_size: int = 64, width: int = 32, num_classes: int = NUM_CLASSES,
                name: str = "strided_cnn") -> keras.Model:
    """`small_cnn` with a stride-2 first convolution: ~4x fewer multiply-adds at the same width."""
    return small_cnn(image_size, width, num_classes, name=name, stem_stride=2)
