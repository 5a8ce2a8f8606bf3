"""Intermediate-layer taps of a classifier, for multi-layer Mahalanobis scores (Lee et al. 2018).

Lee, Lee, Lee & Shin (NeurIPS 2018), "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks", fit class-conditional Gaussians to the (spatially averaged) outputs of
several layers, early to late, and find the early ones most telling for adversarial inputs: a small
L-inf perturbation barely moves the penultimate features of an image it has not yet fooled, but it
changes the statistics of the first feature maps, which still see the pixel noise.

Which layers, for any medrobust architecture (small_cnn, strided_cnn, resnet18, mobilenet_v3_small with
its keras.applications backbone nested as a sub-model): the **stage ends**. Walking the layers in order
(nested functional models expanded), every 4-D layer output has a spatial resolution; a resolution counts
as a stage once a convolution (Conv2D, DepthwiseConv2D, SeparableConv2D) has produced it, and its stage end
is the last layer with that resolution (for small_cnn the ReLU before each max-pool; for a ResNet the ReLU
after the last residual addition of a stage; for MobileNet the last activation before the stride-2
depthwise convolution). Pre-processing at the input resolution (rescaling, grey-to-RGB) is never a stage,
nor is a padding layer's odd size. The last stage (the one that feeds global pooling and the head) is left
to the penultimate "features" Mahalanobis part; of the others,

    early  = the first stage end (full or half resolution: sees the pixel noise most directly),
    middle = the stage end in the middle of the remaining list (index len // 2).

A model with a single stage has no early/middle taps (ValueError). `Detector.fit(taps=...)` overrides the
choice with explicit layer names.
"""

from __future__ import annotations

import keras

from medrobust.models import FEATURE_LAYER

CONV_TYPES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
TAP_NAMES = ("early", "middle")


def _is_functional(layer) -> bool:
    return isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth") and hasattr(layer, "inputs")


def flat_layers(model: keras.Model) -> list:
    """Layers of `model` in order, with nested functional models replaced by their own layers."""
    out = []
    for layer in model.layers:
        if _is_functional(layer):
            out.extend(flat_layers(layer))
        else:
            out.append(layer)
    return out


def stage_ends(model: keras.Model) -> list[str]:
    """Names of the stage-end layers (see the module docstring), early to late."""
    last: dict[int, str] = {}
    order: list[int] = []
    for layer in flat_layers(model):
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):  # a layer used more than once has no single output
            continue
        if len(shape) != 4 or type(layer).__name__ == "InputLayer":
            continue
        r = shape[1]
        if type(layer).__name__ in CONV_TYPES and r not in order:
            order.append(r)
        if r in order:
            last[r] = layer.name
    return [last[r] for r in order]


def default_taps(model: keras.Model) -> dict[str, str]:
    """{'early': layer name, 'middle': layer name}, chosen by `stage_ends`."""
    ends = stage_ends(model)[:-1]
    if len(ends) < 1:
        raise ValueError(f"{model.name}: fewer than two convolutional stages, no early/middle layers to tap "
                         f"(stage ends: {stage_ends(model)}); pass taps= explicitly")
    early, middle = ends[0], ends[len(ends) // 2]
    if middle == early and len(ends) > 1:
        middle = ends[1]
    return {"early": early, "middle": middle}


def tap_model(classifier: keras.Model, taps: dict[str, str]) -> keras.Model:
    """A model x -> [logits, features, tap_1, ...] (taps in the order of `taps`, 4-D maps) that shares
    every weight with `classifier` (the layers themselves are reused, nested models included).

    Raises ValueError naming a tap layer that is not in the classifier.
    """
    wanted = {FEATURE_LAYER: FEATURE_LAYER, **{v: v for v in taps.values()}}
    known = {layer.name for layer in flat_layers(classifier)}
    missing = [name for name in wanted if name not in known]
    if missing:
        raise ValueError(f"{classifier.name}: no layer named {', '.join(missing)} to tap")
    model = _replay(classifier, wanted)
    found = dict(zip(model.output_names_wanted, model.outputs[1:]))
    outputs = [model.outputs[0], found[FEATURE_LAYER], *[found[name] for name in taps.values()]]
    return keras.Model(model.inputs[0], outputs, name=f"{classifier.name}_taps")


def _replay(model: keras.Model, wanted: dict) -> keras.Model:
    """A model fresh input -> [model's output, recorded tap outputs...] built from model's own layers (shared
    weights); nested functional models holding a wanted layer are replayed the same way and called as one
    multi-output layer. `.output_names_wanted` lists the names of the recorded taps, in output order."""
    captured: dict[str, object] = {}

    def call(layer, *args, **kwargs):
        if _is_functional(layer) and any(lay.name in wanted for lay in flat_layers(layer)):
            inner = _replay(layer, wanted)
            outs = inner(*args, **kwargs)
            captured.update(zip(inner.output_names_wanted, outs[1:]))
            out = outs[0]
        else:
            out = layer(*args, **kwargs)
        if layer.name in wanted:
            captured[layer.name] = out
        return out

    clone = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    names = list(captured)
    replayed = keras.Model(clone.inputs, [clone.outputs[0], *[captured[n] for n in names]], name=f"{model.name}_replay")
    replayed.output_names_wanted = names
    return replayed
