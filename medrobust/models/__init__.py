"""Classifiers: image in [0, 1] -> logits, with a penultimate layer named "features"."""

from __future__ import annotations

import keras

from medrobust.models.resnet import resnet18
from medrobust.models.small_cnn import small_cnn

ARCHITECTURES = {"small_cnn": small_cnn, "resnet18": resnet18}
FEATURE_LAYER = "features"


def build_classifier(arch: str = "small_cnn", image_size: int = 28, width: int | None = None, **kwargs) -> keras.Model:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if width is not None:
        kwargs["width"] = width
    return ARCHITECTURES[arch](image_size=image_size, **kwargs)


def feature_model(classifier: keras.Model) -> keras.Model:
    """The same network with two outputs, (logits, features), sharing the classifier's weights."""
    return keras.Model(classifier.input, [classifier.output, classifier.get_layer(FEATURE_LAYER).output],
                       name=f"{classifier.name}_with_features")


def load_classifier(path) -> keras.Model:
    """Load a saved classifier with Keras safe_mode on (no arbitrary code from the file)."""
    return keras.models.load_model(path, compile=False, safe_mode=True)
