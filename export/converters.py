"""Keras -> TFLite (float32, float16, int8) and Keras -> ONNX (tf2onnx, + ONNX Runtime static int8), under
one name: export.bundle and export.verify call the converters through this module.

Every converter takes a Keras model whose single input is the image batch (float32 [n, s, s, 1] in
[0, 1]) and whose outputs are a dict of named tensors; the names become the TFLite signature outputs
and the ONNX graph outputs. Converters return the serialized model as bytes (the caller writes it
atomically); nothing here writes into the bundle.

- export.model_io: what both share (the traced endpoint, the int8 calibration sample and scopes, the walk
  from a graph's outputs back to its last layers, running the Keras original);
- export.tflite_convert: TFLite, with the int8 recipe (float32 at the edges, ``int8_scope`` "mixed" or
  "full") and the TFLite models' op summary, I/O details and runner;
- export.onnx_convert: ONNX and ONNX Runtime int8 with the same recipe.
"""

from export.model_io import INPUT_NAME, INT8_SCOPES, image_spec, representative_batches, run_keras  # noqa: F401
from export.onnx_convert import (DEFAULT_OPSET, ONNX_INT8_OPS, onnx_first_layer_nodes,  # noqa: F401
                                 onnx_last_layer_nodes, onnx_session, quantize_onnx_int8, run_onnx, to_onnx)
from export.tflite_convert import (FLOAT_OPS, PRECISION, SIGNATURE_KEY, TFLITE_QUANTIZATIONS,  # noqa: F401
                                   first_layer_tensors, last_layer_tensors, run_tflite, tflite_io_details,
                                   tflite_op_summary, tflite_runner, to_tflite)
