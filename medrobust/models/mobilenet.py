"""A MobileNetV3-Small backbone (Howard et al. 2019, keras.applications) for grey OCT scans.

Depthwise-separable blocks with a stride-2 stem: about 4.4 M multiply-adds per 64 px image (small_cnn: 115 M). The
"minimalistic" variant (the default here) has no squeeze-and-excite and no hard-swish, only ReLU
and 3x3 kernels, which quantizes to int8 cleanly and runs on every TFLite delegate.
"""

from __future__ import annotations

import keras
from keras import layers

from medrobust.classes import NUM_CLASSES
from medrobust.models.small_cnn import BN_MOMENTUM

MIN_SIZE = 32  # five stride-2 stages


def mobilenet_v3_small(image_size: int = 64, width: int = 128, num_classes: int = NUM_CLASSES,
                       alpha: float = 1.0, minimalistic: bool = True, weights: str | None = None,
                       name: str = "mobilenet_v3_small") -> keras.Model:
    """Image [n, s, s, 1] in [0, 1] -> logits, with a dense "features" layer of `width` units.

    The grey image is scaled to [-1, 1] and repeated to 3 channels, so keras.applications' own
    ImageNet weight files (no-top, matching alpha/minimalistic) can be loaded into the backbone with
    `weights=PATH`; None trains from scratch. Raises ValueError for image_size < 32.
    """
    if image_size < MIN_SIZE:
        raise ValueError(f"mobilenet_v3_small needs image_size >= {MIN_SIZE}, got {image_size}")
    inputs = keras.Input((image_size, image_size, 1), name="image")
    h = layers.Rescaling(2.0, offset=-1.0, name="to_unit_range")(inputs)
    h = layers.Concatenate(name="grey_to_rgb")([h, h, h])
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(image_size, image_size, 3), alpha=alpha, minimalistic=minimalistic, include_top=False,
        weights=weights, include_preprocessing=False, pooling="avg")
    for layer in backbone.layers:  # keras.applications uses 0.999: far too slow for short CPU schedules
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    h = backbone(h)
    features = layers.Dense(width, activation="relu", name="features")(h)
    logits = layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs, logits, name=name)
