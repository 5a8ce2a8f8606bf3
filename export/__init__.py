"""Edge export of a trained medrobust run: TFLite/ONNX converters, the fused screening model, bundles
with a sha256 manifest, parity checks, and the TensorFlow-free screening runtime.

    python -m export bundle --run runs/NAME --out bundles/NAME [--quantize int8|float16|none] [--onnx true]
    python -m export verify --bundle bundles/NAME [--data ...] [--limit N]
    medrobust-screen --bundle bundles/NAME IMAGE_OR_FOLDER... [--out results.csv|results.json]

Importing this package imports nothing heavy (no TensorFlow, no ONNX): the edge runtime
(`export.runtime`) must run on devices that have only numpy, Pillow and the LiteRT interpreter.
The modules that need TensorFlow (`converters`, `screening`, `bundle`, `verify`) import it inside
their functions.
"""
