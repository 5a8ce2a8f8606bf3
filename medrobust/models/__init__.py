"""Classifiers: image in [0, 1] -> logits, with a penultimate layer named "features"."""

from __future__ import annotations

from pathlib import Path

import keras

from medrobust.models.mobilenet import mobilenet_v3_small
from medrobust.models.resnet import resnet18
from medrobust.models.small_cnn import small_cnn, strided_cnn

ARCHITECTURES = {"small_cnn": small_cnn, "strided_cnn": strided_cnn, "mobilenet_v3_small": mobilenet_v3_small,
                 "resnet18": resnet18}
FEATURE_LAYER = "features"


def build_classifier(arch: str = "small_cnn", image_size: int = 28, width: int | None = None,
                     weights: str | None = None, **kwargs) -> keras.Model:
    """A fresh classifier; `weights` optionally initialises it from a local file (see `load_initial_weights`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if width is not None:
        kwargs["width"] = width
    backbone_file = weights is not None and _is_backbone_file(weights)
    if backbone_file:
        if arch != "mobilenet_v3_small":
            raise ValueError(f"{weights}: a keras.applications backbone file (.h5) fits only mobilenet_v3_small; "
                             f"for {arch} pass a classifier .keras or .weights.h5 file")
        kwargs["weights"] = str(weights)
    model = ARCHITECTURES[arch](image_size=image_size, **kwargs)
    if weights is not None and not backbone_file:
        load_initial_weights(model, weights)
    return model


def _is_backbone_file(path) -> bool:
    name = Path(path).name.lower()
    return name.endswith((".h5", ".hdf5")) and not name.endswith(".weights.h5")


def load_initial_weights(model: keras.Model, path) -> None:
    """Copy weights into `model` from a classifier file of the same architecture and input size.

    path: a saved classifier (`.keras`, e.g. another run's classifier.keras) or a `.weights.h5` file.
    Raises ValueError naming the file if it is missing or does not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such weights file")
    try:
        if path.name.endswith(".keras"):
            source = load_classifier(path)
            if len(source.weights) != len(model.weights):
                raise ValueError(f"it has {len(source.weights)} weight tensors, the model {len(model.weights)}")
            for target, value in zip(model.weights, source.weights):
                if tuple(target.shape) != tuple(value.shape):
                    raise ValueError(f"{target.path} has shape {tuple(target.shape)} in the model, "
                                     f"{tuple(value.shape)} in the file")
                target.assign(value)
        elif path.name.endswith(".weights.h5"):
            model.load_weights(path)
        else:
            raise ValueError("expected a .keras classifier or a .weights.h5 file")
    except ValueError as exc:
        raise ValueError(f"{path}: does not fit {model.name} at {model.input_shape[1]} px ({exc})") from None


def feature_model(classifier: keras.Model) -> keras.Model:
    """The same network with two outputs, (logits, features), sharing the classifier's weights."""
    return keras.Model(classifier.input, [classifier.output, classifier.get_layer(FEATURE_LAYER).output],
                       name=f"{classifier.name}_with_features")


def load_classifier(path) -> keras.Model:
    """Load a saved classifier with Keras safe_mode on (no arbitrary code from the file)."""
    return keras.models.load_model(path, compile=False, safe_mode=True)


class ProbabilityAverage(keras.Model):
    """A probability-averaging ensemble (Lakshminarayanan et al. 2017, "deep ensembles") as one model.

    members: classifiers with the same input shape, each float32 images [batch, H, W, C] in [0, 1] ->
    logits [batch, classes]. Called on the same images it returns float32 [batch, classes], the log of the
    members' mean probability, so its softmax is their average prediction and its arg-max their vote by
    probability. Raises ValueError for no members or members with different input shapes.
    """

    def __init__(self, members: list[keras.Model], name: str = "ensemble"):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        shapes = {tuple(m.input_shape[1:]) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"ensemble members take different inputs: {sorted(shapes)}")
        super().__init__(name=name)
        self.members = list(members)

    def call(self, x, training=False):
        probs = [keras.ops.softmax(m(x, training=training), axis=-1) for m in self.members]
        return keras.ops.log(keras.ops.maximum(keras.ops.mean(keras.ops.stack(probs), axis=0), 1e-12))
