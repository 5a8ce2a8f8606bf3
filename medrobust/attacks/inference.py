"""A model's inference graph with its weights baked in as constants: what the attacks differentiate.

An attack evaluates the same fixed network thousands of times. Called through its variables, each step
re-reads every weight, and the inference-mode batch norms stay separate multiply/add passes over the
activations, forward and backward. With the weights as constants (TensorFlow's
`convert_variables_to_constants_v2`) and Grappler's constant folding and arithmetic passes run once over
that graph (the passes TFLite's converter runs), each batch norm becomes part of the convolution before
it. `python benchmarks/attacks.py --compare-inference [--model PATH]` times the forms side by side and
`--op-profile` shows what is left besides the convolutions. The frozen function computes
`model(x, training=False)` to float rounding, and gradients flow through it.

Each attack object owns one `ModelInference`. It fingerprints the weights at every run, freezes them
at the first run, and when they have changed since, drops the frozen copy and calls the model through
its variables, freezing again only weights it then sees unchanged in two consecutive runs: a loop that
trains a little and attacks once, over and over, pays for one freeze, not one per round. A model that cannot be
frozen (resources the converter does not handle) or whose frozen graph does not reproduce it is always
called through its variables, with one warning (it is only slower). Attacks compiled with XLA
(`jit_compile=True`) never freeze: XLA constant-folds every baked-in weight at compile time.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import warnings
from typing import Callable

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

FORMS = ("constant-folded", "frozen", "model")
_OUTPUT_TOLERANCE = 1e-4  # largest |difference| of outputs, relative to max(1, largest |output|)
_VERSIONS = itertools.count(1)


def weights_fingerprint(model) -> str:
    """A hash of every weight's current value (bytes, not just shapes): changes when any weight does."""
    digest = hashlib.blake2b(digest_size=16)
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()


def check_single_output(model, name: str) -> None:
    """Attacks need one logits output; raises ValueError naming the way out for a model with several."""
    outputs = getattr(model, "outputs", None)
    if outputs is not None and len(outputs) > 1:
        raise ValueError(f"{name}: the model has {len(outputs)} outputs; attacks need one (the logits): pass "
                         "keras.Model(model.inputs, model.outputs[i]) for the classifier's output")


class ModelInference:
    """The function an attack calls for `model(x, training=False)`, and its version.

    current(x_sample) -> (call, version), at the start of every attack run (x_sample: that run's images,
    float32 [n, ...]): call is traceable and differentiable with respect to x; its
    `kind` attribute says which form it is ("constant-folded", "frozen" or "model"). version changes
    whenever call does: a compiled caller that captured an older call must retrace. form caps the form
    ("model" never freezes; benchmarks compare the forms).
    """

    def __init__(self, model, form: str = "constant-folded"):
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        self.model, self.form = model, form
        self._plain = _plain_call(model)
        self._plain_version = next(_VERSIONS)
        self._frozen = None  # (fingerprint, shape, call, version)
        self._last = None  # (fingerprint, shape) of the previous run
        self._failed = False  # freezing failed or did not reproduce the model: do not try again

    def current(self, x_sample: np.ndarray):
        shape = tuple(int(d) for d in x_sample.shape[1:])
        if self.form == "model" or self._failed or not len(x_sample):
            return self._plain, self._plain_version
        fingerprint = weights_fingerprint(self.model)
        key = (fingerprint, shape)
        if self._frozen is not None and self._frozen[:2] == key:
            return self._frozen[2], self._frozen[3]
        if self._frozen is not None:  # the weights changed: drop the stale copy (its graphs are in cycles)
            self._frozen = None
            gc.collect()
        first, seen_twice, self._last = self._last is None, self._last == key, key
        if not (first or seen_twice):
            return self._plain, self._plain_version
        call = _freeze(self.model, shape, self.form)
        if call is None:
            self._failed = True
            return self._plain, self._plain_version
        self._frozen = (fingerprint, shape, call, next(_VERSIONS))
        return call, self._frozen[3]


def _plain_call(model) -> Callable:
    def plain(v):
        return model(v, training=False)

    plain.kind = "model"
    return plain


def _freeze(model, shape, form: str) -> Callable | None:
    """The constant-folded frozen graph (or the frozen one, with form="frozen") if it reproduces the
    model, else None after one warning."""
    plain = _plain_call(model)
    name = getattr(model, "name", "the model")
    try:
        concrete = tf.function(plain).get_concrete_function(tf.TensorSpec((None,) + shape, tf.float32))
        frozen = _single_output(convert_variables_to_constants_v2(concrete), "frozen")
    except Exception as error:  # the converter's failures are not one exception type
        warnings.warn(f"attacks: could not freeze {name} ({type(error).__name__}: {error}); calling it through "
                      "its variables (only slower)", stacklevel=5)
        return None
    sample = tf.random.stateless_uniform((2,) + shape, seed=[0, 0])
    expected = plain(sample)
    if form == "constant-folded":
        try:
            folded = _single_output(_constant_folded(frozen.function), "constant-folded")
            if _reproduces(folded, sample, expected):
                return folded
        except Exception:  # Grappler's failures are not one exception type; the frozen graph still serves
            pass
    if _reproduces(frozen, sample, expected):
        return frozen
    warnings.warn(f"attacks: the frozen graph of {name} does not reproduce its outputs; calling it through "
                  "its variables (only slower)", stacklevel=5)
    return None


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
