"""Keras -> TFLite (float32, float16, int8), and the TFLite models' op summary, I/O details and runner.

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
  with denylisted ops and nodes). The float32 layers' large weights (``tflite_compact.MIN_ELEMENTS``
  values or more: the whitening matrix, not the first convolution or the logits) are then stored as
  per-channel int8 with a DEQUANTIZE op in front (weight-only int8: float32 compute on float32
  activations, only the stored weights rounded; the channels, output or input, whose model outputs on
  ``COMPACT_IMAGES`` calibration images stay closest to the float32-weight model's; ``compact=False``
  keeps them float32).
* ``int8_scope="full"``: full-integer, ``TFLITE_BUILTINS_INT8`` only (conversion fails rather than
  leave a float op inside): for integer-only accelerators; scores and near-ties are then coarser.

Every int8 model is written again with each repeated quantization vector stored once (lossless;
export.tflite_compact), which removes most of the per-channel zero-point and scale bytes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings

import numpy as np

from export.model_io import INPUT_NAME, INT8_SCOPES, endpoint, image_size_of, image_spec, last_layers

TFLITE_QUANTIZATIONS = ("none", "float16", "int8")
PRECISION = {"none": "float32", "float16": "float16", "int8": "int8"}
# TFLite builtin op types left in float32 by int8_scope="mixed" (score and probability arithmetic).
FLOAT_OPS = ("SOFTMAX", "LOG_SOFTMAX", "ADD", "SUB", "MUL", "DIV", "NEG", "SQUARED_DIFFERENCE", "SQUARE", "SUM",
             "MEAN", "SQRT", "RSQRT", "EXP", "LOG", "POW", "ABS", "RELU", "MINIMUM", "MAXIMUM", "REDUCE_MIN",
             "REDUCE_MAX", "TOPK_V2", "ARG_MAX", "STRIDED_SLICE", "GATHER", "PACK", "CONCATENATION",
             "BATCH_MATMUL", "GREATER", "GREATER_EQUAL", "LESS", "LESS_EQUAL", "CAST", "SELECT", "SELECT_V2",
             "RESHAPE", "EXPAND_DIMS", "SQUEEZE")
SIGNATURE_KEY = "serving_default"
COMPACT_IMAGES = 256  # calibration images that choose each weight-only int8 weight's channel axis


def to_tflite(model, quantize: str = "none", calibration: np.ndarray | None = None,
              int8_scope: str = "mixed", compact: bool = True) -> bytes:
    """Convert a Keras model (image -> dict outputs) to a TFLite flatbuffer.

    quantize: 'none' (float32), 'float16' (float16 weights, float32 compute and I/O) or 'int8'
    (float32 I/O, int8 inside as `int8_scope` says; needs `calibration`, float32 images
    [n, s, s, 1] in [0, 1]). compact (int8): write the model smaller with export.tflite_compact
    (repeated vectors once; with scope mixed, the float32 layers' large weights as weight-only int8);
    False returns the converter's own bytes. Keras 3 models go through an ExportArchive SavedModel (the path
    TensorFlow documents for Keras 3): converting a tf.function that closes over Keras variables
    leaves READ_VARIABLE ops in the graph, which int8 calibration cannot run.
    """
    import keras
    import tensorflow as tf

    if quantize not in TFLITE_QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(TFLITE_QUANTIZATIONS)}, got {quantize!r}")
    if int8_scope not in INT8_SCOPES:
        raise ValueError(f"int8_scope must be one of {', '.join(INT8_SCOPES)}, got {int8_scope!r}")
    size = image_size_of(model)
    with tempfile.TemporaryDirectory(prefix="medrobust-export-") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", endpoint(model), input_signature=[image_spec(size)])
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)  # its "serving_default" = "serve"
        with warnings.catch_warnings(), _quiet_native_output():
            warnings.simplefilter("ignore")  # calibration uses the deprecated tf.lite.Interpreter
            if quantize == "float16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            elif quantize == "int8":
                from export import tflite_compact

                content = _int8(converter, calibration, int8_scope, tmp)
                if not compact:
                    return content
                return tflite_compact.compact(content, weight_only_int8=int8_scope == "mixed",
                                              calibration=np.asarray(calibration[:COMPACT_IMAGES], np.float32))
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
    layers = last_layers({d["index"] for d in interpreter.get_output_details()}, producer,
                          lambda op: op["op_name"] in _LAYER_OPS, lambda op: [int(i) for i in op["inputs"] if int(i) >= 0])
    return list(dict.fromkeys(tensors[int(o)] for op in layers for o in op["outputs"]))


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
