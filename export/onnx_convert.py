"""Keras -> ONNX (tf2onnx) and ONNX Runtime static int8 quantization with the TFLite int8 recipe (see
export.tflite_convert): the same layers stay float32, and every output is float32."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings

import numpy as np

from export.model_io import INPUT_NAME, INT8_SCOPES, endpoint, image_size_of, image_spec, last_layers, output_names

DEFAULT_OPSET = 17


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
    spec = image_spec(image_size_of(model))
    names = output_names(model)
    fn = tf.function(endpoint(model), input_signature=[spec], autograph=False)
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
    layers = last_layers({o.name for o in proto.graph.output}, producer, lambda n: n.op_type in _ONNX_LAYER_OPS,
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
