"""medrobust_screen: the TensorFlow-free device side of medrobust -- everything `medrobust-screen` runs.

    medrobust-screen --bundle bundles/NAME --trusted-key publisher.pub IMAGE_OR_FOLDER... [--out results.csv]
    pip install ./edge        # this package alone, on a device (numpy, Pillow, LiteRT, cryptography, pydicom)

One module per idea; imports flow down this list, and nothing here imports TensorFlow, ``medrobust`` or
``export`` (tests/test_runtime.py checks both). The TensorFlow side imports from here: the class names,
the image preprocessing, the manifest and model contract, signing.

- ``cli``: the command (options, progress, summary, exit status); ``python -m medrobust_screen``.
- ``output``: result rows to CSV on standard output, or to a .csv / .json file written atomically.
- ``screener``: ``Screener``, a checked bundle's LiteRT screening model, one row per image.
- ``volume``: DICOM OCT volumes (one eye; a multi-frame file or a series of files): the worst-class verdict.
- ``report``: the self-contained HTML report (--report); thumbnails.
- ``inputs``: which files a run screens (named files, folders searched recursively).
- ``manifest``: the checks made before a model is loaded (signature, fields, sha256 of every file).
- ``signing``: Ed25519 keys and bundle signatures.
- ``dicom``: DICOM OCT files to model inputs, one B-scan at a time.
- ``dicom_pixels``: a DICOM frame's stored values to the grey levels a display shows.
- ``images``: an image file to the model input (the training preprocessing).
- ``classes``, ``errors``, ``arguments``, ``tempfiles``: class names; the two one-line errors; argparse
  that names the closest option; a temporary file beside an output.
"""
