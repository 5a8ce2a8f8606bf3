"""A ResNet-18-style network (basic blocks, [2, 2, 2, 2]) with configurable width and input size."""

from __future__ import annotations

import keras
from keras import layers

from medrobust.classes import NUM_CLASSES
from medrobust.models.small_cnn import BN_MOMENTUM


def _conv_bn(h, filters: int, stride: int = 1, relu: bool = True):
    h = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(h)
    h = layers.BatchNormalization(momentum=BN_MOMENTUM)(h)
    return layers.ReLU()(h) if relu else h


def _basic_block(h, filters: int, stride: int):
    shortcut = h
    if stride != 1 or h.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(h)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM)(shortcut)
    h = _conv_bn(h, filters, stride)
    h = _conv_bn(h, filters, relu=False)
    return layers.ReLU()(layers.Add()([h, shortcut]))


def resnet18(image_size: int = 28, width: int = 16, num_classes: int = NUM_CLASSES, name: str = "resnet18") -> keras.Model:
    """ResNet-18 layout; width 64 is the ImageNet original. Small inputs (< 64 px) get a 3x3 stem and no
    stem pooling, as in CIFAR ResNets; larger inputs get the 7x7/2 stem with max-pooling."""
    inputs = keras.Input((image_size, image_size, 1), name="image")
    if image_size < 64:
        h = _conv_bn(inputs, width)
    else:
        h = layers.Conv2D(width, 7, strides=2, padding="same", use_bias=False)(inputs)
        h = layers.ReLU()(layers.BatchNormalization(momentum=BN_MOMENTUM)(h))
        h = layers.MaxPooling2D(3, strides=2, padding="same")(h)
    for stage, mult in enumerate((1, 2, 4, 8)):
        for block in range(2):
            h = _basic_block(h, width * mult, stride=2 if (stage > 0 and block == 0) else 1)
    features = layers.GlobalAveragePooling2D(name="features")(h)
    logits = layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs, logits, name=name)
