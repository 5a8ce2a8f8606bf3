"""Keras -> TFLite (float32, float16, int8) and Keras -> ONNX (tf2onnx, + ONNX Runtime static int8).

Every converter takes a Keras model whose single input is the image batch (float32 [n, s, s, 1] in
[0, 1]) and whose outputs are a dict of named tensors; the names become the TFLite signature outputs
and the ONNX graph outputs. Converters return the serialized model as bytes (the caller writes it
atomically); nothing here writes into the bundle.

int8 TFLite keeps float32 at the edges: the model's input and outputs stay float32 (a QUANTIZE op
after the input, DEQUANTIZE before the outputs), so callers feed the same [0, 1] floats as to the
Keras model and read probabilities and scores as floats, with no scale / zero-point bookkeeping.
Inside, two scopes (calibrated with a representative dataset of training images, MinMax ranges,
per-channel int8 weights):

* ``int8_scope="mixed"`` (default): every convolution, transposed convolution, dense layer,
  pooling and activation runs on int8 kernels, except
  - the first layer that reads the raw image (the first convolution of the classifier and of the
    autoencoder: a few hundred weights and a small share of the compute): quantizing the image
    and that layer's output was the largest single source of error, about half of the logit error
    of the whole int8 network,
  - the last layers, whose outputs reach a model output through score arithmetic only (the
    logits' dense layer, the Mahalanobis whitening product): the anomaly parts (top-2 logit margin,
    squeezed-vs-plain prediction change) are small differences of logits that int8 rounding of the
    logits blurred (the usual first-and-last-layers-in-higher-precision recipe), and
  - the arithmetic that turns network outputs into the anomaly score and the class probabilities
    (differences, squares, sums and means, square roots, exp/log, softmax, min/max, comparisons:
    ``FLOAT_OPS``): a reconstruction error or a Mahalanobis distance computed on int8 tensors loses
    most of its precision (scores moved by ~20% of their range), and an int8 softmax ties
    near-equal probabilities at 1/256 steps.
  Implemented with TFLite selective quantization (``tf.lite.experimental.QuantizationDebugger``
  with denylisted ops and nodes).
* ``int8_scope="full"``: full-integer, ``TFLITE_BUILTINS_INT8`` only (conversion fails rather than
  leave a float op inside): for integer-only accelerators; scores and near-ties are then coarser.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
import weakref
from typing import Callable

import numpy as np

TFLITE_QUANTIZATIONS = ("none", "float16", "int8")
PRECISION = {"none": "float32", "float16": "float16", "int8": "int8"}
DEFAULT_OPSET = 17
INT8_SCOPES = ("mixed", "full")
# TFLite builtin op types left in float32 by int8_scope="mixed" (score and probability arithmetic).
FLOAT_OPS = ("SOFTMAX", "LOG_SOFTMAX", "ADD", "SUB", "MUL", "DIV", "NEG", "SQUARED_DIFFERENCE", "SQUARE", "SUM",
             "MEAN", "SQRT", "RSQRT", "EXP", "LOG", "POW", "ABS", "RELU", "MINIMUM", "MAXIMUM", "REDUCE_MIN",
             "REDUCE_MAX", "TOPK_V2", "ARG_MAX", "STRIDED_SLICE", "GATHER", "PACK", "CONCATENATION",
             "BATCH_MATMUL", "GREATER", "GREATER_EQUAL", "LESS", "LESS_EQUAL", "CAST", "SELECT", "SELECT_V2",
             "RESHAPE", "EXPAND_DIMS", "SQUEEZE")
SIGNATURE_KEY = "serving_default"
INPUT_NAME = "image"


def image_spec(image_size: int):
    import tensorflow as tf

    return tf.TensorSpec([None, image_size, image_size, 1], tf.float32, name=INPUT_NAME)


def _image_size(model) -> int:
    if getattr(model, "export_image_size", None):
        return int(model.export_image_size)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1 or shape[1] is None:
        raise ValueError(f"{model.name}: expected an input of shape [n, s, s, 1], got {shape}")
    return int(shape[1])


def _endpoint(model) -> Callable:
    """image -> dict of named float32 tensors (the model's own dict outputs, inference mode)."""
    names = _output_names(model)

    def serve(image):
        out = model(image, training=False)
        if isinstance(out, dict):
            return {k: out[k] for k in names}
        return {names[0]: out}

    return serve


def _output_names(model) -> list[str]:
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


def to_tflite(model, quantize: str = "none", calibration: np.ndarray | None = None,
              int8_scope: str = "mixed") -> bytes:
    """Convert a Keras model (image -> dict outputs) to a TFLite flatbuffer.

    quantize: 'none' (float32), 'float16' (float16 weights, float32 compute and I/O) or 'int8'
    (float32 I/O, int8 inside as `int8_scope` says; needs `calibration`, float32 images
    [n, s, s, 1] in [0, 1]). Keras 3 models go through an ExportArchive SavedModel (the path
    TensorFlow documents for Keras 3): converting a tf.function that closes over Keras variables
    leaves READ_VARIABLE ops in the graph, which int8 calibration cannot run.
    """
    import keras
    import tensorflow as tf

    if quantize not in TFLITE_QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(TFLITE_QUANTIZATIONS)}, got {quantize!r}")
    if int8_scope not in INT8_SCOPES:
        raise ValueError(f"int8_scope must be one of {', '.join(INT8_SCOPES)}, got {int8_scope!r}")
    size = _image_size(model)
    with tempfile.TemporaryDirectory(prefix="medrobust-export-") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", _endpoint(model), input_signature=[image_spec(size)])
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)  # its "serving_default" = "serve"
        with warnings.catch_warnings(), _quiet_native_output():
            warnings.simplefilter("ignore")  # calibration uses the deprecated tf.lite.Interpreter
            if quantize == "float16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            elif quantize == "int8":
                return _int8(converter, calibration, int8_scope, tmp)
            return converter.convert()


@contextlib.contextmanager
def _quiet_native_output():
    """Keep the converter's C++ lines ("fully_quantize: 0, inference_type: 6, ...") off stdout/stderr;
    Python exceptions still carry the reason."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _int8(converter, calibration, scope: str, saved_model_dir: str) -> bytes:
    import tensorflow as tf

    if calibration is None or len(calibration) == 0:
        raise ValueError("int8 quantization needs calibration images")
    calib = np.asarray(calibration, np.float32)

    def representative():
        for i in range(len(calib)):
            yield {INPUT_NAME: calib[i:i + 1]}

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    if scope == "full":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return converter.convert()
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    float_model = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir).convert()
    keep_float = first_layer_tensors(float_model)
    keep_float += [name for name in last_layer_tensors(float_model) if name not in keep_float]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS),
                                                            denylisted_nodes=keep_float or None)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_options=options,
        debug_dataset=lambda: ([calib[i:i + 1]] for i in range(min(8, len(calib)))))
    return debugger.get_nondebug_quantized_model()


_LAYER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL")
# Padding and reshapes, and the element-wise ops and batch concatenation of the detector's input
# transforms (bit-depth squeezing runs the classifier on [x, squeeze(x)] in one batch).
_PASS_THROUGH_OPS = ("PAD", "PADV2", "RESHAPE", "CONCATENATION", "MUL", "DIV", "ADD", "SUB", "ROUND")


def first_layer_tensors(float_model: bytes) -> list[str]:
    """Output tensor names of the layers that read the model input (through padding, reshapes and the
    element-wise input transforms of _PASS_THROUGH_OPS)."""
    interpreter, _ = tflite_runner(float_model)
    tensors = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # no public API lists the operators
    frontier = {d["index"] for d in interpreter.get_input_details()}
    names: list[str] = []
    for _ in range(4):  # padding / reshape chains are short
        reached = set()
        for op in ops:
            if not frontier & {int(i) for i in op["inputs"]}:
                continue
            outs = [int(o) for o in op["outputs"]]
            if op["op_name"] in _LAYER_OPS:
                names += [tensors[o] for o in outs if tensors[o] not in names]
            elif op["op_name"] in _PASS_THROUGH_OPS:
                reached.update(outs)
        if not reached:
            break
        frontier = reached
    return names


def last_layer_tensors(float_model: bytes) -> list[str]:
    """Output tensor names of the layers whose outputs reach a model output without passing through
    another layer (only through score arithmetic): walked backwards from the outputs."""
    interpreter, _ = tflite_runner(float_model)
    tensors = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    producer = {int(o): op for op in interpreter._get_ops_details() for o in op["outputs"]}
    layers = _last_layers({d["index"] for d in interpreter.get_output_details()}, producer,
                          lambda op: op["op_name"] in _LAYER_OPS, lambda op: [int(i) for i in op["inputs"] if int(i) >= 0])
    return list(dict.fromkeys(tensors[int(o)] for op in layers for o in op["outputs"]))


def _last_layers(outputs, producer: dict, is_layer, inputs_of) -> list:
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


def tflite_op_summary(model_bytes: bytes) -> dict:
    """{'int8': sorted op types that run on int8 tensors, 'float32': ... on float} (for the manifest)."""
    interpreter, _ = tflite_runner(model_bytes)
    tensors = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    summary: dict[str, set] = {"int8": set(), "float32": set(), "float16": set()}
    try:
        ops = interpreter._get_ops_details()  # no public API lists the operators
    except Exception:  # pragma: no cover
        return {}
    for op in ops:
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        kinds = {tensors.get(int(i)) for i in list(op["outputs"])}
        for kind in ("int8", "float32", "float16"):
            if kind in kinds:
                summary[kind].add(op["op_name"])
    return {k: sorted(v) for k, v in summary.items() if v}


def tflite_runner(model_bytes: bytes, num_threads: int = 1):
    """(interpreter, signature runner) for a flatbuffer, from ai_edge_litert (or tflite_runtime)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - older devices
        from tflite_runtime.interpreter import Interpreter
    interpreter = Interpreter(model_content=model_bytes, num_threads=num_threads)
    keys = list(interpreter.get_signature_list())
    if len(keys) != 1:
        raise ValueError(f"expected one signature in the TFLite model, found {keys}")
    return interpreter, interpreter.get_signature_runner(keys[0])


def run_tflite(model_bytes: bytes, x: np.ndarray, batch_size: int = 64, num_threads: int = 1) -> dict[str, np.ndarray]:
    """Run a TFLite model over x in batches; returns {output name: array}."""
    _, runner = tflite_runner(model_bytes, num_threads)
    outs: dict[str, list] = {}
    for start in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[start:start + batch_size], np.float32)
        for k, v in runner(**{INPUT_NAME: batch}).items():
            outs.setdefault(k, []).append(np.array(v))
    return {k: np.concatenate(v) for k, v in outs.items()}


def tflite_io_details(model_bytes: bytes) -> dict:
    """Input/output names, dtypes, shapes and quantization (scale, zero point) for the manifest."""
    interpreter, runner = tflite_runner(model_bytes)

    def describe(details: dict) -> dict:
        out = {}
        for name, d in details.items():
            scale, zero = d.get("quantization", (0.0, 0))
            out[name] = {"dtype": np.dtype(d["dtype"]).name, "shape": [int(v) for v in d["shape_signature"]],
                         "quantization": {"scale": float(scale), "zero_point": int(zero)}}
        return out

    tensor_types = sorted({np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()})
    return {"signature": list(interpreter.get_signature_list())[0], "inputs": describe(runner.get_input_details()),
            "outputs": describe(runner.get_output_details()), "tensor_dtypes": tensor_types}


# --------------------------------------------------------------------------------------------- ONNX

def _patch_tf2onnx() -> None:
    """tf2onnx 1.17 still uses numpy aliases removed in numpy 2; Keras ships the same fix it uses."""
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
    except ImportError:  # pragma: no cover - Keras moved it
        if not hasattr(np, "object"):
            np.object = object  # type: ignore[attr-defined]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        patch_tf2onnx()


def to_onnx(model, opset: int = DEFAULT_OPSET) -> bytes:
    """Convert a Keras model (image -> dict outputs) to ONNX with tf2onnx; outputs keep their names.

    The traced function is frozen first (variables *and* captured eager constants become graph
    constants): tf2onnx's own from_function freezes only variables, and leaves a constant that Keras
    captured (e.g. a standardisation mean) as an extra graph input.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    if opset < 17:
        raise ValueError(f"ONNX opset must be >= 17, got {opset}")
    import tf2onnx

    _patch_tf2onnx()
    spec = image_spec(_image_size(model))
    names = _output_names(model)
    fn = tf.function(_endpoint(model), input_signature=[spec], autograph=False)
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
    flat = tf.nest.flatten(frozen.structured_outputs)
    keys = sorted(names)  # tf.nest flattens a dict in sorted key order
    if len(flat) != len(keys):
        raise ValueError(f"{model.name}: expected outputs {keys}, traced {len(flat)}")
    inputs = [t.name for t in frozen.inputs if t.dtype != tf.resource]
    tf2onnx_logger, tf_logger = logging.getLogger("tf2onnx"), tf.get_logger()
    levels = tf2onnx_logger.level, tf_logger.level
    tf2onnx_logger.setLevel(logging.CRITICAL)  # it logs Log1p as unsupported; _replace_unsupported fixes it
    tf_logger.setLevel(logging.ERROR)  # TF1-API deprecation notices from inside tf2onnx
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto, _ = tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=inputs,
                                                      output_names=[t.name for t in flat], opset=opset)
    finally:
        tf2onnx_logger.setLevel(levels[0])
        tf_logger.setLevel(levels[1])
    _rename_onnx(proto, {inputs[0]: INPUT_NAME, **{t.name: k for t, k in zip(flat, keys)}})
    _replace_unsupported(proto)
    import onnx

    onnx.checker.check_model(proto)
    unknown = sorted({n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")
                      and not onnx.defs.has(n.op_type, n.domain)})
    if unknown:
        raise ValueError(f"tf2onnx left operators ONNX does not define: {', '.join(unknown)}")
    return proto.SerializeToString()


def _replace_unsupported(proto) -> None:
    """tf2onnx 1.17 passes TensorFlow's Log1p through unconverted (ONNX has no Log1p; keras.ops.logaddexp
    uses it): rewrite log1p(x) as log(x + 1). Float32 exact enough here (x = exp(-|d|) in (0, 1])."""
    import onnx
    from onnx import helper, numpy_helper

    nodes, changed = [], False
    for node in proto.graph.node:
        if node.op_type == "Log1p" and node.domain in ("", "ai.onnx"):
            one = f"{node.name}__one"
            plus = f"{node.name}__plus_one"
            proto.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
            nodes.append(helper.make_node("Add", [node.input[0], one], [plus], name=f"{node.name}__add"))
            nodes.append(helper.make_node("Log", [plus], list(node.output), name=f"{node.name}__log"))
            changed = True
        else:
            nodes.append(node)
    if changed:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        onnx.checker.check_model(proto)


def _rename_onnx(proto, mapping: dict[str, str]) -> None:
    """Rename graph inputs/outputs (e.g. 'Identity_1:0' -> 'probabilities') everywhere they occur."""
    mapping = {old: new for old, new in mapping.items() if old != new}
    for node in proto.graph.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        node.output[:] = [mapping.get(o, o) for o in node.output]
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.name = mapping.get(value.name, value.name)


class _ImageReader:
    """onnxruntime.quantization CalibrationDataReader over an image array, one image per call."""

    def __init__(self, x: np.ndarray, input_name: str):
        self.x, self.input_name, self.i = np.asarray(x, np.float32), input_name, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.input_name: self.x[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


# ONNX op types ONNX Runtime quantizes: the network layers TFLite's mixed scope runs in int8 (CONV_2D,
# TRANSPOSE_CONV, FULLY_CONNECTED, pooling) and the ReLU after them (ONNX Runtime folds it into the layer's
# output range, as TFLite fuses it into the layer). What TFLite keeps in float32 (FLOAT_OPS: the score and
# probability arithmetic, means such as global average pooling, softmax, reshapes) stays float32 here too.
ONNX_INT8_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "MaxPool", "AveragePool", "Relu")
_ONNX_LAYER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops between the image and the first layer that only move or reshape it (tf2onnx's NHWC -> NCHW).
_ONNX_PASS_THROUGH_OPS = ("Reshape", "Transpose", "Pad", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten",
                          "Concat", "Mul", "Div", "Add", "Sub", "Round")


def onnx_first_layer_nodes(proto) -> list[str]:
    """Names of the layer nodes (ONNX_INT8_OPS) that read the graph's image input, directly or through
    reshapes / transposes / padding / element-wise input transforms: the ONNX counterpart of
    `first_layer_tensors`."""
    init = {i.name for i in proto.graph.initializer}
    frontier = {i.name for i in proto.graph.input if i.name not in init}
    names: list[str] = []
    for _ in range(6):  # pass-through chains are short
        reached = set()
        for node in proto.graph.node:
            if not frontier & set(node.input):
                continue
            if node.op_type in ONNX_INT8_OPS and node.name not in names:
                names.append(node.name)
            elif node.op_type in _ONNX_PASS_THROUGH_OPS:
                reached.update(node.output)
        if not reached:
            break
        frontier = reached
    return names


def onnx_last_layer_nodes(proto) -> list[str]:
    """Names of the layer nodes (Conv, ConvTranspose, MatMul, Gemm) whose outputs reach a graph output
    without passing through another layer: the ONNX counterpart of `last_layer_tensors`."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    layers = _last_layers({o.name for o in proto.graph.output}, producer, lambda n: n.op_type in _ONNX_LAYER_OPS,
                          lambda n: [i for i in n.input if i])
    return list(dict.fromkeys(n.name for n in layers))


def _own_weights(proto, node_names: list[str]) -> int:
    """Give the named nodes their own copy of every initializer they share with another node. A weight
    shared with a quantized node would be quantized for both (the fused screening graph runs the
    classifier on the image and on the reconstruction with the same weights), and the float32 first
    layer would read int8-rounded weights. Returns how many initializers were copied."""
    from onnx import TensorProto

    initializers = {i.name: i for i in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    copied = 0
    for node in proto.graph.node:
        if node.name not in node_names:
            continue
        for k, name in enumerate(node.input):
            if name in initializers and uses.get(name, 0) > 1:
                clone = TensorProto()
                clone.CopyFrom(initializers[name])
                clone.name = f"{name}__{node.name}"
                proto.graph.initializer.append(clone)
                node.input[k] = clone.name
                uses[name] -= 1
                copied += 1
    return copied


def _float_graph_outputs(proto, reference) -> int:
    """Replace every QuantizeLinear -> DequantizeLinear pair that ends in a graph output by an Identity of the
    float tensor before it: the model's outputs are then the float32 values of the last layer, not values
    rounded to an int8 grid. A pair is kept when the op before it is not the op that produced the output in
    `reference` (the graph before quantization): then the quantizer folded an activation (e.g. a ReLU) into
    that pair's range, and removing it would remove the activation. Returns how many pairs were removed."""
    from onnx import helper

    outputs = {o.name for o in proto.graph.output}
    producer = {out: node for node in proto.graph.node for out in node.output}
    reference_producer = {out: node.op_type for node in reference.graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    drop, nodes, removed = set(), [], 0
    for node in proto.graph.node:
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if node.output[0] in outputs and source is not None \
                and source.op_type == reference_producer.get(node.output[0]):
            nodes.append(helper.make_node("Identity", [q.input[0]], [node.output[0]], name=f"{node.name}__float"))
            if uses.get(q.output[0], 0) == 1 and q.output[0] not in outputs:
                drop.add(id(q))
            removed += 1
            continue
        nodes.append(node)
    nodes = [n for n in nodes if id(n) not in drop]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in proto.graph.node for name in node.input}
    unused = [init for init in proto.graph.initializer if init.name not in used]
    for init in unused:  # the removed pairs' scales and zero points
        proto.graph.initializer.remove(init)
    return removed


def quantize_onnx_int8(model_bytes: bytes, calibration: np.ndarray, int8_scope: str = "mixed") -> bytes:
    """ONNX Runtime static int8 quantization with the TFLite recipe (QDQ, MinMax calibration on
    `calibration`, per-channel symmetric int8 weights, int8 activations).

    int8_scope "mixed" (default) matches the TFLite mixed scope: the layers in ONNX_INT8_OPS run in int8
    except the first layer(s) reading the raw image (`onnx_first_layer_nodes`) and the last layer(s) before
    the outputs (`onnx_last_layer_nodes`), which stay float32 like TFLite's; the score and probability arithmetic stays float32; and no graph output passes through a
    quantize/dequantize pair (the outputs are the float32 values of the last layer). "full" quantizes
    the first layers too (outputs stay float32). Input and outputs are float32 in both.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if int8_scope not in INT8_SCOPES:
        raise ValueError(f"int8_scope must be one of {', '.join(INT8_SCOPES)}, got {int8_scope!r}")
    reader_cls = type("ImageReader", (_ImageReader, CalibrationDataReader), {})
    with tempfile.TemporaryDirectory(prefix="medrobust-onnxq-") as tmp:
        src, pre, dst = (os.path.join(tmp, n) for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as f:
            f.write(model_bytes)
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantize the model as it is
            pre = src
        proto = onnx.load(pre)
        for i, node in enumerate(proto.graph.node):  # nodes_to_exclude works on names
            if not node.name:
                node.name = f"{node.op_type}__{i}"
        onnx.save(proto, pre)
        input_name = proto.graph.input[0].name
        exclude = onnx_first_layer_nodes(proto) if int8_scope == "mixed" else []
        if int8_scope == "mixed":
            exclude += [n for n in onnx_last_layer_nodes(proto) if n not in exclude]
        if _own_weights(proto, exclude):
            onnx.save(proto, pre)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(pre, dst, reader_cls(calibration, input_name), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(ONNX_INT8_OPS), nodes_to_exclude=exclude, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        quantized = onnx.load(dst)
    _float_graph_outputs(quantized, proto)
    onnx.checker.check_model(quantized)
    return quantized.SerializeToString()


def onnx_session(model_bytes: bytes, num_threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(model_bytes: bytes, x: np.ndarray, batch_size: int = 256, num_threads: int = 1) -> dict[str, np.ndarray]:
    session = onnx_session(model_bytes, num_threads)
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    outs: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(x), batch_size):
        for n, v in zip(names, session.run(names, {input_name: np.ascontiguousarray(x[start:start + batch_size],
                                                                                     np.float32)})):
            outs[n].append(v)
    return {n: np.concatenate(v) for n, v in outs.items()}


_KERAS_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def run_keras(model, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The Keras model's dict outputs over x in batches (compiled inference call, training=False)."""
    import tensorflow as tf

    fn = _KERAS_CALLS.get(model)
    if fn is None:
        fn = _KERAS_CALLS[model] = tf.function(_endpoint(model), reduce_retracing=True)
    outs: dict[str, list] = {}
    for start in range(0, len(x), batch_size):
        for k, v in fn(tf.constant(x[start:start + batch_size], tf.float32)).items():
            outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}

