"""A model's inference graph with its weights baked in as constants: what the attacks differentiate.

An attack evaluates the same fixed network thousands of times. Called through its variables, each step
re-reads every weight, and the inference-mode batch norms stay separate multiply/add passes over the
activations, forward and backward. With the weights as constants (TensorFlow's
`convert_variables_to_constants_v2`) and Grappler's constant folding and arithmetic passes run once over
that graph (the passes TFLite's converter runs), each batch norm becomes part of the convolution before
it. `python benchmarks/attacks.py --compare-inference [--model PATH]` times the three forms side by side
(on the 2-core CPU, APGD-100 through the model's variables took 1.26-1.27x as long, on the benchmark's
small CNN and on a trained 64-px strided_cnn) and `--op-profile` shows what is left besides the
convolutions. The function computes `model(x, training=False)` to float rounding, and gradients flow
through it.

The constants are a snapshot. `inference_function` fingerprints the weights on every call and freezes
again when they changed (e.g. the model was trained further between two attack runs), and returns a
version number so an attack knows to retrace its compiled steps. Every candidate must reproduce the
model's outputs on a random batch and have an input gradient; a model none of the faster forms fits
(several inputs or outputs, resources the converter cannot freeze) is called through its variables,
with one warning (it is only slower).
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
import weakref
from typing import Callable

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_VERSIONS = itertools.count(1)
_OUTPUT_TOLERANCE = 1e-4  # largest |difference| of outputs, relative to max(1, largest |output|)


def weights_fingerprint(model) -> str:
    """A hash of every weight's current value (bytes, not just shapes): changes when any weight does."""
    digest = hashlib.blake2b(digest_size=16)
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()


FORMS = ("constant-folded", "frozen", "model")


def inference_function(model, input_shape=None, form: str = "constant-folded") -> tuple[Callable, int]:
    """(call, version): call(x) computes model(x, training=False) with the model's current weights frozen.

    x: float32 [n, *input_shape], any n (input_shape: one image's shape; default the model's input).
    call is traceable (usable inside tf.function), differentiable with respect to x, and has a `kind`
    attribute: "constant-folded", "frozen" or "model" (the plain call, when neither faster form
    reproduced the model). `version` changes whenever the returned function does (the weights changed
    since the last call, another input shape, or a new model): a compiled caller that captured an older
    function must retrace. `form` caps how far the graph is transformed (benchmarks compare the forms);
    the first form built for a model and shape is kept until its weights change.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    shape = _image_shape(model, input_shape)
    fingerprint = weights_fingerprint(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[:2] == (fingerprint, shape):
        return cached[2], cached[3]
    call = _freeze(model, shape, FORMS.index(form))
    version = next(_VERSIONS)
    _CACHE[model] = (fingerprint, shape, call, version)
    return call, version


def _image_shape(model, input_shape) -> tuple | None:
    if input_shape is not None:
        return tuple(int(d) for d in input_shape)
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model that was never built on an input
        return None
    if inputs is None or len(inputs) != 1 or any(d is None for d in inputs[0].shape[1:]):
        return None
    return tuple(int(d) for d in inputs[0].shape[1:])


def _freeze(model, shape, first: int = 0) -> Callable:
    """The fastest of: the constant-folded frozen graph, the frozen graph, the model's own call (FORMS,
    from FORMS[first] on)."""
    def plain(v):
        return model(v, training=False)

    plain.kind = "model"
    name = getattr(model, "name", "the model")
    if FORMS[first] == "model":
        return plain
    if shape is None:
        warnings.warn(f"attacks: the input shape of {name} is unknown (several inputs, or not built); calling it "
                      "through its variables (correct, only slower)", stacklevel=4)
        return plain
    try:
        concrete = tf.function(plain).get_concrete_function(tf.TensorSpec((None,) + shape, tf.float32))
        frozen = _single_output(convert_variables_to_constants_v2(concrete), "frozen")
    except Exception as error:  # the converter's failures are not one exception type
        warnings.warn(f"attacks: could not freeze {name} ({type(error).__name__}: {error}); calling it through "
                      "its variables (correct, only slower)", stacklevel=4)
        return plain
    sample = tf.random.stateless_uniform((2,) + shape, seed=[0, 0])
    expected = plain(sample)
    try:
        folded = _single_output(_constant_folded(frozen.function), "constant-folded") if first == 0 else None
        if folded is not None and _reproduces(folded, sample, expected):
            return folded
    except Exception:  # Grappler's failures are not one exception type; the frozen graph still serves
        pass
    if _reproduces(frozen, sample, expected):
        return frozen
    warnings.warn(f"attacks: the frozen graph of {name} does not reproduce its outputs; calling it through "
                  "its variables (correct, only slower)", stacklevel=4)
    return plain


def _constant_folded(function):
    """`function` (a frozen graph) after Grappler's constant folding and arithmetic simplification.
    Only these passes run: they emit standard ops, which keep their gradients (the layout and fusion
    passes would emit CPU-specific ops that have none)."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import tf_optimizer

    graph_def = function.graph.as_graph_def()
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph_def, graph=function.graph)
    meta.collection_def["train_op"].node_list.value.extend(t.name.split(":")[0] for t in function.outputs)
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.optimizers.extend(["constfold", "arithmetic", "dependency"])
    config.graph_options.rewrite_options.min_graph_nodes = -1
    optimized = tf_optimizer.OptimizeGraph(config, meta)
    wrapped = tf.compat.v1.wrap_function(lambda: tf.graph_util.import_graph_def(optimized, name=""), [])
    return wrapped.prune(feeds=[wrapped.graph.get_tensor_by_name(function.inputs[0].name)],
                         fetches=[wrapped.graph.get_tensor_by_name(t.name) for t in function.outputs])


def _single_output(function, kind: str):
    if len(function.outputs) != 1:
        raise ValueError(f"{len(function.outputs)} outputs")

    def call(v):
        out = function(v)
        return out[0] if isinstance(out, (list, tuple)) else out

    call.function, call.kind = function, kind
    return call


def _reproduces(call, sample, expected) -> bool:
    """call(sample) equals expected to float rounding, and has a gradient with respect to its input."""
    with tf.GradientTape() as tape:
        tape.watch(sample)
        out = call(sample)
        total = tf.reduce_sum(out)
    if not tf.is_tensor(out) or out.shape != expected.shape:
        return False
    grad = tape.gradient(total, sample)
    scale = max(1.0, float(tf.reduce_max(tf.abs(expected))))
    return grad is not None and float(tf.reduce_max(tf.abs(out - expected))) <= _OUTPUT_TOLERANCE * scale
