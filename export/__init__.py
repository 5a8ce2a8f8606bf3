"""Edge export of a trained medrobust run: TFLite/ONNX converters, the fused screening model, signed
bundles with a sha256 manifest and parity checks with pass/fail verdicts, for the TensorFlow-free
screening runtime (medrobust_screen).

    python -m export keygen --out keys/publisher
    python -m export bundle --run runs/NAME --out bundles/NAME [--quantize int8|float16|none] [--onnx true]
                            [--signing-key keys/publisher]
    python -m export sign --bundle bundles/NAME --key keys/publisher
    python -m export verify --bundle bundles/NAME [--data ...] [--limit N]
    medrobust-screen --bundle bundles/NAME --trusted-key keys/publisher.pub IMAGE_OR_FOLDER... [--out results.csv]

The TensorFlow-free screening runtime is its own package, ``medrobust_screen`` (``pip install ./edge``
on a device: numpy, Pillow, the LiteRT interpreter, cryptography and pydicom); this package imports
from it (the manifest and model contract, signing, class names), never the reverse. ``export.runtime``
is kept as another name of the command. Importing this package imports nothing heavy (no TensorFlow,
no ONNX): the modules that need TensorFlow (`converters`, `screening`, `bundle`, `verify`) import it
inside their functions.
"""
