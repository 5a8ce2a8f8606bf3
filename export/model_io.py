"""What every converter shares: the traced endpoint of a Keras model (image batch in, named outputs out),
the int8 calibration sample and scopes, the walk back from a converted graph's outputs to its last layers
(the TFLite and ONNX int8 recipes keep the same layers in float32), and running the Keras original."""

from __future__ import annotations

import weakref
from typing import Callable

import numpy as np

INT8_SCOPES = ("mixed", "full")
INPUT_NAME = "image"


def image_spec(image_size: int):
    """The traced input: float32 images [None, s, s, 1] named INPUT_NAME."""
    import tensorflow as tf

    return tf.TensorSpec([None, image_size, image_size, 1], tf.float32, name=INPUT_NAME)


def image_size_of(model) -> int:
    """The side s of a model's square grey input [n, s, s, 1] (ValueError for another shape)."""
    if getattr(model, "export_image_size", None):
        return int(model.export_image_size)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1 or shape[1] is None:
        raise ValueError(f"{model.name}: expected an input of shape [n, s, s, 1], got {shape}")
    return int(shape[1])


def endpoint(model) -> Callable:
    """image -> dict of named float32 tensors (the model's own dict outputs, inference mode)."""
    names = output_names(model)

    def serve(image):
        out = model(image, training=False)
        if isinstance(out, dict):
            return {k: out[k] for k in names}
        return {names[0]: out}

    return serve


def output_names(model) -> list[str]:
    """The names of a model's outputs, in the order they are traced (a single unnamed output is 'output')."""
    if getattr(model, "export_outputs", None):
        return list(model.export_outputs)
    out = model.output
    if isinstance(out, dict):
        return list(out.keys())
    if isinstance(out, (list, tuple)):
        raise ValueError(f"{model.name}: give the model dict outputs (named), not a list")
    return ["output"]


def representative_batches(x: np.ndarray, n: int = 200, seed: int = 0) -> np.ndarray:
    """A seeded random sample of up to n images (the int8 calibration set)."""
    x = np.asarray(x, np.float32)
    if len(x) == 0:
        raise ValueError("no images to calibrate int8 quantization with")
    idx = np.random.default_rng(seed).permutation(len(x))[: min(n, len(x))]
    return x[np.sort(idx)]


def last_layers(outputs, producer: dict, is_layer, inputs_of) -> list:
    """The layer ops met first when walking back from `outputs` through `producer` (tensor -> op): a
    layer stops the walk, any other op passes it on to its inputs. Shared by the TFLite and ONNX recipes."""
    frontier, seen, layers = set(outputs), set(), []
    while frontier:
        reached = set()
        for t in frontier - seen:
            seen.add(t)
            op = producer.get(t)
            if op is None:
                continue
            if is_layer(op):
                if not any(op is known for known in layers):
                    layers.append(op)
            else:
                reached.update(inputs_of(op))
        frontier = reached
    return layers


_KERAS_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def run_keras(model, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The Keras model's dict outputs over x in batches (compiled inference call, training=False)."""
    import tensorflow as tf

    fn = _KERAS_CALLS.get(model)
    if fn is None:
        fn = _KERAS_CALLS[model] = tf.function(endpoint(model), reduce_retracing=True)
    outs: dict[str, list] = {}
    for start in range(0, len(x), batch_size):
        for k, v in fn(tf.constant(x[start:start + batch_size], tf.float32)).items():
            outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}

