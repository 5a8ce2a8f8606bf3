"""Edge export of a trained medrobust run: TFLite/ONNX converters, the fused screening model, signed
bundles with a sha256 manifest, parity checks with pass/fail verdicts, and the TensorFlow-free
screening runtime.

    python -m export keygen --out keys/publisher
    python -m export bundle --run runs/NAME --out bundles/NAME [--quantize int8|float16|none] [--onnx true]
                            [--signing-key keys/publisher]
    python -m export sign --bundle bundles/NAME --key keys/publisher
    python -m export verify --bundle bundles/NAME [--data ...] [--limit N]
    medrobust-screen --bundle bundles/NAME --trusted-key keys/publisher.pub IMAGE_OR_FOLDER... [--out results.csv]

Importing this package imports nothing heavy (no TensorFlow, no ONNX): the edge runtime
(`export.runtime`, with `export.signing`) must run on devices that have only numpy, Pillow, the
LiteRT interpreter, cryptography and pydicom (`pip install ./edge`). The modules that need TensorFlow
(`converters`, `screening`, `bundle`, `verify`) import it inside their functions.
"""
