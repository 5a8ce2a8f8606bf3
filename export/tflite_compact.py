"""Make an int8 TFLite model smaller without changing what it computes in float: weight-only int8 for the
layers int8_scope="mixed" keeps in float32, and one copy of each repeated quantization vector.

Where the bytes of a width-32 int8 screening model went (export.tflite_size, benchmarks/edge.py): int8
weights 151 KiB, the float32 weight matrix of the Mahalanobis whitening product (a last layer, kept float
by int8_scope="mixed") 64 KiB, per-channel quantization parameters 15 KiB (each int8 weight and int32
bias tensor stores one float32 scale and one int64 zero point per channel; the zero points are all 0),
tensor names 6 KiB, the rest graph structure. Two rewrites, both after conversion:

* **weight-only int8** (``weight_only_int8``): a float32 constant weight of a layer op (FULLY_CONNECTED,
  CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV) with at least ``min_elements`` values is stored as
  per-channel symmetric int8 (scale = max |w| / 127 per channel) and a DEQUANTIZE op turns it back into
  float32 before the layer. The layer still computes in float32 on float32 activations; only the stored
  weights are rounded (at most half a step, max |w| / 254 per channel). The channels are the output or the
  input channels of the weight: with ``calibration`` images, the axis whose model outputs stay closest to
  the float32-weight model's on them (measured, one weight after the other); without, the output channels.
  The axis matters more than the weight error says: for the Mahalanobis whitening matrix of a width-32
  model both axes round the matrix by 0.8% (relative Frobenius norm), but per output channel the anomaly
  score's correlation with the float32 model's fell from 0.962 to 0.914 on 800 phantom test images and per
  input channel only to 0.956 (the column maxima differ by 20x; per input channel each column's step
  follows its feature's scale). The LiteRT DEQUANTIZE kernel dequantizes a constant input
  once, at the first run, and keeps the result. Per-channel int8 DEQUANTIZE is op version 5, so
  ``min_runtime_version`` is raised to 2.7.0 when it is lower.
* **shared vectors** (lossless): the flatbuffer is written again with each distinct numeric vector stored
  once (flatbuffers allow several tables to point at one vector): the repeated all-zero zero-point
  vectors, equal scales and shapes. Constant buffers keep their 16-byte alignment.

Tensor names, signature defs and metadata are kept. Reads and writes the flatbuffer with the schema
LiteRT ships (no TensorFlow).
"""

from __future__ import annotations

import numpy as np

from export.tflite_size import _schema

# Layer ops whose float32 constant weight may be stored as int8: (input index, (output-channel axis,
# input-channel axis) of the weight).
_WEIGHT_INPUTS = {"FULLY_CONNECTED": (1, (0, 1)), "CONV_2D": (1, (0, 3)), "DEPTHWISE_CONV_2D": (1, (3, 0)),
                  "TRANSPOSE_CONV": (1, (0, 3))}
MIN_ELEMENTS = 1024
# Outputs left out when choosing a weight's channel axis: the screening model's part scores are the inputs of
# its combined anomaly score (diagnostics for the report), so the axis is chosen on the outputs a bundle
# without them has, and adding them changes no other output.
IGNORED_OUTPUTS = ("part_scores",)
DEQUANTIZE_PER_CHANNEL_VERSION = 5
DEQUANTIZE_MIN_RUNTIME = "2.7.0"


def compact(content: bytes, weight_only_int8: bool = True, min_elements: int = MIN_ELEMENTS,
            calibration: np.ndarray | None = None) -> bytes:
    """The rewritten flatbuffer (see the module docstring); `calibration`: float32 images [n, s, s, 1] the
    model takes, to choose each weight's channel axis. ValueError for bytes that are not a TFLite model."""
    if not isinstance(content, (bytes, bytearray)) or len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    if int(min_elements) < 1:
        raise ValueError(f"min_elements must be a positive integer, got {min_elements}")
    if calibration is not None and (np.ndim(calibration) != 4 or len(calibration) == 0):
        raise ValueError(f"calibration must be images [n, s, s, 1], got shape {np.shape(calibration)}")
    schema = _schema()
    if not weight_only_int8:
        return pack(schema, schema.ModelT.InitFromPackedBuf(bytearray(content), 0))
    axes: dict[tuple[int, int], int] = {}
    if calibration is not None:
        reference = _outputs(content, calibration)
        for key, options in _candidates(schema, content, int(min_elements)).items():
            errors = {}
            for option in options:
                trial = _rewrite(schema, content, int(min_elements), {**axes, key: option}, only={*axes, key})
                errors[option] = _output_error(reference, _outputs(trial, calibration))
            axes[key] = min(options, key=lambda a: errors[a])
    return _rewrite(schema, content, int(min_elements), axes)


def _rewrite(schema, content: bytes, min_elements: int, axes: dict, only: set | None = None) -> bytes:
    """content with weight-only int8 applied to the candidate weights (all, or those in `only`), each along
    axes[(subgraph, tensor)] (default: its output channels), written with shared vectors."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    if _weights_to_int8(schema, model, min_elements, axes, only):
        _raise_min_runtime(model, DEQUANTIZE_MIN_RUNTIME)
    return pack(schema, model)


def _candidates(schema, content: bytes, min_elements: int) -> dict[tuple[int, int], tuple[int, ...]]:
    """{(subgraph, tensor): channel axes to try} for the weights weight-only int8 would rewrite."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    found: dict[tuple[int, int], tuple[int, ...]] = {}
    for g, subgraph in enumerate(model.subgraphs or []):
        for op in subgraph.operators or []:
            t, axes = _weight_of(schema, model, subgraph, op, min_elements)
            if t is not None:
                shape = [int(d) for d in subgraph.tensors[t].shape]
                found[(g, t)] = tuple(dict.fromkeys(a % len(shape) for a in axes if shape[a % len(shape)] > 1)) or (0,)
    return found


def _outputs(content: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - older devices
        from tflite_runtime.interpreter import Interpreter
    runner = Interpreter(model_content=content, num_threads=1).get_signature_runner()
    (name,) = runner.get_input_details()
    outs: dict[str, list] = {}
    for start in range(0, len(x), 64):
        for k, v in runner(**{name: np.ascontiguousarray(x[start:start + 64], np.float32)}).items():
            outs.setdefault(k, []).append(np.array(v, np.float64))
    return {k: np.concatenate(v) for k, v in outs.items()}


def _output_error(reference: dict, trial: dict) -> float:
    """Sum over the outputs that vary of the RMS difference relative to the output's own spread."""
    total = 0.0
    for k, ref in reference.items():
        if k in IGNORED_OUTPUTS:
            continue
        spread = float(np.std(ref))
        if spread > 0:
            total += float(np.sqrt(np.mean((trial[k] - ref) ** 2))) / spread
    return total


def _op_name(schema, model, op) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    value = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    for name, v in vars(schema.BuiltinOperator).items():
        if v == value and not name.startswith("_"):
            return name
    return str(value)


def _constant(model, tensor) -> np.ndarray | None:
    if tensor.buffer <= 0 or tensor.buffer >= len(model.buffers):
        return None
    data = model.buffers[tensor.buffer].data
    return None if data is None or len(data) == 0 else np.asarray(data, np.uint8)


def _weight_of(schema, model, subgraph, op, min_elements: int) -> tuple[int | None, tuple[int, ...]]:
    """(tensor index, channel axes) of op's float32 constant weight if weight-only int8 applies to it."""
    rule = _WEIGHT_INPUTS.get(_op_name(schema, model, op))
    if rule is None or op.inputs is None or len(op.inputs) <= rule[0] or int(op.inputs[rule[0]]) < 0:
        return None, ()
    t = int(op.inputs[rule[0]])
    tensor = subgraph.tensors[t]
    raw = _constant(model, tensor)
    q = tensor.quantization
    quantized = q is not None and q.scale is not None and len(q.scale) > 0
    if tensor.type != schema.TensorType.FLOAT32 or raw is None or quantized or tensor.shape is None:
        return None, ()
    w = raw.view(np.float32)
    if w.size < min_elements or w.size != int(np.prod(tensor.shape)) or not np.all(np.isfinite(w)):
        return None, ()
    return t, rule[1]


def _weights_to_int8(schema, model, min_elements: int, axes: dict | None = None, only: set | None = None) -> int:
    """Rewrite the large float32 constant weights of layer ops in place (those in `only`, default all), each
    along axes[(subgraph, tensor)] (default its output channels); returns how many were rewritten."""
    int8 = schema.TensorType.INT8
    opcode = None
    rewritten = 0
    for g, subgraph in enumerate(model.subgraphs or []):
        new_ops = []
        for op in subgraph.operators or []:
            t, options = _weight_of(schema, model, subgraph, op, min_elements)  # None once rewritten
            if t is None or (only is not None and (g, t) not in only):
                continue
            tensor = subgraph.tensors[t]
            shape = [int(d) for d in tensor.shape]
            w = _constant(model, tensor).view(np.float32).reshape(shape)
            axis = (axes or {}).get((g, t), options[0]) % w.ndim
            reduce = tuple(i for i in range(w.ndim) if i != axis)
            peak = np.max(np.abs(w), axis=reduce)
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
            bshape = [1] * w.ndim
            bshape[axis] = -1
            q8 = np.clip(np.rint(w / scale.reshape(bshape)), -127, 127).astype(np.int8)

            buffer = schema.BufferT()
            buffer.data = np.frombuffer(q8.tobytes(), np.uint8)
            model.buffers.append(buffer)
            packed = schema.TensorT()
            packed.shape = np.asarray(shape, np.int32)
            packed.type = int8
            packed.buffer = len(model.buffers) - 1
            packed.name = (tensor.name or b"") + b"/int8"
            packed.quantization = schema.QuantizationParametersT()
            packed.quantization.scale = scale
            packed.quantization.zeroPoint = np.zeros(len(scale), np.int64)
            packed.quantization.quantizedDimension = axis
            subgraph.tensors.append(packed)
            # The float tensor becomes the DEQUANTIZE output (no constant data); every op that read it still does.
            old, tensor.buffer = tensor.buffer, _empty_buffer(schema, model)
            if not any(other.buffer == old for sg in model.subgraphs for other in sg.tensors or []):
                model.buffers[old].data = None  # no other tensor holds this float32 copy
            if opcode is None:
                opcode = _dequantize_opcode(schema, model)
            dq = schema.OperatorT()
            dq.opcodeIndex = opcode
            dq.inputs = np.asarray([len(subgraph.tensors) - 1], np.int32)
            dq.outputs = np.asarray([t], np.int32)
            new_ops.append(dq)
            rewritten += 1
        if new_ops:
            subgraph.operators = new_ops + list(subgraph.operators)  # constants: ahead of every reader
    return rewritten


def _empty_buffer(schema, model) -> int:
    model.buffers.append(schema.BufferT())
    return len(model.buffers) - 1


def _dequantize_opcode(schema, model) -> int:
    code = schema.BuiltinOperator.DEQUANTIZE
    for i, c in enumerate(model.operatorCodes):
        if max(int(c.builtinCode), int(c.deprecatedBuiltinCode)) == code and c.version == DEQUANTIZE_PER_CHANNEL_VERSION:
            return i
    opcode = schema.OperatorCodeT()
    opcode.builtinCode = code
    opcode.deprecatedBuiltinCode = min(code, 127)
    opcode.version = DEQUANTIZE_PER_CHANNEL_VERSION
    model.operatorCodes.append(opcode)
    return len(model.operatorCodes) - 1


def _version(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("."))


def _raise_min_runtime(model, needed: str) -> None:
    for entry in model.metadata or []:
        if entry.name == b"min_runtime_version":
            data = model.buffers[entry.buffer].data
            current = bytes(data).split(b"\x00")[0].decode("ascii", "replace") if data is not None else ""
            if _version(current) < _version(needed):
                raw = needed.encode("ascii")
                width = max(len(data) if data is not None else 0, len(raw))  # the converter pads to 16 bytes
                model.buffers[entry.buffer].data = np.frombuffer(raw.ljust(width, b"\x00"), np.uint8)


def pack(schema, model) -> bytes:
    """Serialize a ModelT with each distinct numeric vector written once and constant data 16-byte aligned."""
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        def __init__(self, size):
            super().__init__(size)
            self._vectors = {}

        def CreateNumpyVector(self, x):  # noqa: N802 - the flatbuffers API name
            x = np.ascontiguousarray(x)
            if x.dtype.str[0] == ">":
                x = x.astype(x.dtype.newbyteorder("<"))
            payload = x.tobytes()
            key = (x.dtype.str, payload)
            if key in self._vectors:
                return self._vectors[key]
            alignment = 16 if x.dtype == np.uint8 and x.size >= 16 else x.dtype.alignment
            self.StartVector(x.itemsize, x.size, alignment)
            self.head = self.head - len(payload)
            self.Bytes[self.head:self.head + len(payload)] = payload
            self.vectorNumElems = x.size
            offset = self.EndVector()
            self._vectors[key] = offset
            return offset

    builder = SharingBuilder(1 << 16)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
