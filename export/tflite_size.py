"""Where the bytes of a TFLite flatbuffer go: constant buffers by tensor type, the largest constants,
duplicated buffers, metadata entries, and the rest (graph structure: tensor names, shapes,
quantization parameters, operators).

    python -m export.tflite_size MODEL.tflite [MODEL.tflite ...]

Reads the flatbuffer with the schema LiteRT ships (ai_edge_litert.schema_py_generated); imports no
TensorFlow. Used by benchmarks/edge.py for the per-file size breakdown.
"""

from __future__ import annotations

import hashlib
import sys
from collections import defaultdict

import numpy as np


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - without LiteRT
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _type_names(schema) -> dict[int, str]:
    return {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_") and isinstance(v, int)}


def _name(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def breakdown(content: bytes, top: int = 8) -> dict:
    """{'bytes', 'constants': {tensor type: bytes}, 'constant_bytes', 'largest': [(name, type, shape, bytes)],
    'duplicate_bytes' (bytes of buffers whose content another buffer already holds), 'metadata': {name: bytes},
    'signature_defs', 'tensors', 'operators', 'other_bytes' (structure: everything else), 'tensor_name_bytes'
    and 'quantization_vector_bytes' (scales, zero points, min/max, as numbers: vectors stored once for
    several tensors count once per tensor)} for a TFLite flatbuffer."""
    if not isinstance(content, (bytes, bytearray)) or len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    types = _type_names(schema)
    buffers = model.buffers or []

    def buffer_bytes(index: int) -> int:
        if index <= 0 or index >= len(buffers):
            return 0
        buf = buffers[index]
        if buf.data is not None:
            return len(buf.data)
        return int(getattr(buf, "size", 0) or 0)  # data stored outside the flatbuffer tables

    owner: dict[int, tuple] = {}
    n_tensors = n_ops = names = quantization = 0
    for subgraph in model.subgraphs or []:
        n_ops += len(subgraph.operators or [])
        for tensor in subgraph.tensors or []:
            n_tensors += 1
            names += len(tensor.name or b"")
            q = tensor.quantization
            for field in ("scale", "zeroPoint", "min", "max") if q is not None else ():
                values = getattr(q, field)
                quantization += 0 if values is None else int(np.asarray(values).nbytes)
            if buffer_bytes(tensor.buffer) and tensor.buffer not in owner:
                owner[tensor.buffer] = (_name(tensor.name), types.get(tensor.type, str(tensor.type)),
                                        [int(d) for d in (tensor.shape if tensor.shape is not None else [])])
    metadata_buffers = {m.buffer: _name(m.name) for m in model.metadata or []}
    constants: dict[str, int] = defaultdict(int)
    largest, seen, duplicate = [], set(), 0
    for index, (name, kind, shape) in owner.items():
        size = buffer_bytes(index)
        constants[kind] += size
        largest.append((name, kind, shape, size))
        digest = hashlib.sha256(bytes(buffers[index].data)).digest() if buffers[index].data is not None else None
        if digest is not None:
            duplicate += size if digest in seen else 0
            seen.add(digest)
    metadata = {name: buffer_bytes(index) for index, name in metadata_buffers.items()}
    constant_bytes = sum(constants.values())
    largest.sort(key=lambda row: -row[3])
    return {"bytes": len(content), "constants": dict(sorted(constants.items(), key=lambda kv: -kv[1])),
            "constant_bytes": constant_bytes, "largest": largest[:top], "duplicate_bytes": duplicate,
            "metadata": metadata, "signature_defs": len(model.signatureDefs or []), "tensors": n_tensors,
            "tensor_name_bytes": names, "quantization_vector_bytes": quantization,
            "operators": n_ops, "other_bytes": len(content) - constant_bytes - sum(metadata.values())}


def format_breakdown(name: str, b: dict, top: int = 5) -> list[str]:
    """Printable lines for one breakdown()."""
    kib = lambda n: f"{n / 1024:.1f} KiB"  # noqa: E731
    constants = ", ".join(f"{k} {kib(v)}" for k, v in b["constants"].items())
    metadata = ", ".join(f"{k} {v} B" for k, v in b["metadata"].items()) or "none"
    lines = [f"{name}: {kib(b['bytes'])}; constants {kib(b['constant_bytes'])} ({constants}); "
             f"structure {kib(b['other_bytes'])} ({b['tensors']} tensors, {b['operators']} ops; names "
             f"{kib(b['tensor_name_bytes'])}, quantization vectors {kib(b['quantization_vector_bytes'])}); "
             f"metadata {metadata}; duplicated constants {kib(b['duplicate_bytes'])}"]
    for tensor, kind, shape, size in b["largest"][:top]:
        lines.append(f"    {kib(size):>10s}  {kind:8s} {str(shape):18s} {tensor[:90]}")
    return lines


def main(argv=None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for path in paths:
        with open(path, "rb") as f:
            content = f.read()
        try:
            b = breakdown(content, top=12)
        except ValueError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
        print("\n".join(format_breakdown(path, b, top=12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
