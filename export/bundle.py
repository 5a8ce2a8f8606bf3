"""python -m export bundle: a trained run -> an edge bundle (TFLite, optional ONNX, manifest.json).

    python -m export bundle --run runs/NAME --out bundles/NAME [--quantize int8|float16|none] [--onnx true]

Writes into --out:

* ``screening.tflite``  image -> probabilities, anomaly_score, flag (detector and classifier fused,
  threshold baked in; see export.screening for the verdict rule) and, for a detector with parts,
  part_scores (each part's standardised score; manifest ``detector.parts`` names them in order),
* ``classifier.tflite`` image -> logits, probabilities,
* ``detector.tflite``   image -> anomaly_score,
* with --onnx true: ``screening.onnx``, ``classifier.onnx``, ``detector.onnx`` (float32, tf2onnx) and,
  with --quantize int8, ``*.int8.onnx`` (ONNX Runtime static int8),
* ``manifest.json``: classes, input spec, preprocessing rule, quantization, threshold, verdict rule,
  the sha256 and size of every file, package versions and the source run (and its training data),
* with --signing-key KEY: ``signature.json``, an Ed25519 signature over manifest.json (medrobust_screen.signing).

The tool writes only into a folder it owns: --out must be new, empty, or a bundle an earlier export
wrote (its manifest.json, or the ``export-in-progress.json`` an interrupted export leaves). It then
replaces or removes only the files that export wrote; any other file in the folder is left alone.
Every file is written to a temporary name and renamed into place; ``export-in-progress.json`` (the
files this export may write) comes first, the old manifest and signature are removed next, and the
new manifest and signature are written last, so an interrupted export leaves a folder the runtime
refuses (no manifest) rather than a bundle that mixes two exports.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path

from medrobust import cli
from medrobust.io import atomic_write_bytes, atomic_write_json, read_json, read_run_config

from medrobust_screen.classes import CLASSES
from medrobust_screen.manifest import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST
from medrobust_screen.screener import (OUTPUT_FLAG, OUTPUT_PART_SCORES, OUTPUT_PROBABILITIES, OUTPUT_SCORE,
                                       OUTPUT_THRESHOLD, VERDICT_RULE)
from medrobust_screen.referral import REFERRAL_RULE
from medrobust_screen.signing import SIGNATURE

QUANTIZE = ("int8", "float16", "none")
PREPROCESSING_RULE = ("medrobust.data.images.load_image: EXIF orientation; one grey channel (ITU-R 601-2 luma; "
                      "alpha composited on black; 16-bit images scaled by 1/65535); centred square crop of the "
                      "short edge; Pillow BOX (area) resize to image_size; 8-bit rounding, /255; float32 "
                      "[image_size, image_size, 1] in [0, 1]")
IN_PROGRESS = "export-in-progress.json"
PARITY = "parity.json"


def bundle(run: str, out: str, quantize: str = "int8", onnx="false", data: str | None = None,
           calibration: int = 1000, int8_scope: str = "mixed", opset: int = 17, recalibrate="true",
           signing_key: str | None = None, passphrase_env: str | None = None, progress="true") -> dict:
    """Export a trained run as an edge bundle.

    Args:
      run: run folder (classifier.keras, config.json, detector/).
      out: bundle folder to write: new, empty, or a bundle an earlier export wrote (its files are
        replaced; files the tool did not write are left alone; any other non-empty folder is refused).
      quantize: int8 (default; float32 I/O, int8 layers) | float16 | none (float32).
      onnx: true to also write ONNX models (float32; plus ONNX Runtime int8 with --quantize int8, same
        recipe as the TFLite int8 models).
      data: where the int8 calibration images come from (default: the data the run was trained on); the
        calibration set is a seeded sample of its train split.
      calibration: number of calibration images (int8 only).
      int8_scope: mixed (default: int8 layers, float32 for the first layer on the raw image, the last
        layer(s) before the outputs and the score/probability arithmetic) | full (full-integer, every op int8, for integer-only
        accelerators). Applies to TFLite and ONNX int8 alike.
      opset: ONNX opset (>= 17).
      recalibrate: for quantized models (TFLite and ONNX int8), set the detector threshold again on the
        exported model's own scores of the clean validation split (quantization shifts the scores, and
        with the Keras threshold the edge model would refer more clean scans than the target rate).
      signing_key: Ed25519 private key (from `python -m export keygen`) to sign the bundle with
        (writes signature.json); without it the bundle is unsigned and medrobust-screen needs
        --allow-unsigned.
      passphrase_env: name of the environment variable holding the signing key's passphrase.
      progress: true | false: print what is being converted.
    """
    quantize = str(quantize).lower()
    if quantize not in QUANTIZE:
        raise cli.UsageError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if str(int8_scope) not in ("mixed", "full"):
        raise cli.UsageError(f"--int8-scope must be mixed or full, got {int8_scope!r}")
    if int(calibration) < 1:
        raise cli.UsageError(f"--calibration must be a positive integer, got {calibration}")
    if int(opset) < 17:
        raise cli.UsageError(f"--opset must be >= 17, got {opset}")
    verbose = cli.parse_bool(progress, "progress")
    key = load_signing_key(signing_key, passphrase_env) if signing_key is not None else None
    if key is None and passphrase_env is not None:
        raise cli.UsageError("--passphrase-env is for --signing-key; no key was given")
    return export_bundle(run, out, quantize=quantize, onnx=cli.parse_bool(onnx, "onnx"), data=data,
                         calibration=int(calibration), int8_scope=str(int8_scope), opset=int(opset),
                         recalibrate=cli.parse_bool(recalibrate, "recalibrate"), signing_key=key,
                         log=(lambda msg: print(msg, flush=True)) if verbose else (lambda msg: None))


def load_signing_key(path, passphrase_env: str | None = None, option: str = "--signing-key"):
    """The Ed25519 private key at `path` (its passphrase from the environment variable `passphrase_env`);
    cli.UsageError with a one-line reason if it cannot be used."""
    from medrobust_screen import signing

    passphrase = None
    if passphrase_env is not None:
        value = os.environ.get(str(passphrase_env))
        if not value:
            raise cli.UsageError(f"--passphrase-env: environment variable {passphrase_env} is not set or empty")
        passphrase = value.encode("utf-8")
    try:
        return signing.load_private_key(str(path), passphrase)
    except signing.SignatureError as exc:
        raise cli.UsageError(f"{option} {exc}") from None


def sign_bundle(bundle_dir, key, log=print) -> dict:
    """Write signature.json for a bundle whose files match its manifest (a bundle whose files were changed
    is refused, not signed). `key` is a private key object or a key file. Returns the signature document."""
    from medrobust_screen import signing
    from medrobust_screen.manifest import BundleError, read_manifest, read_manifest_bytes, verify_files

    bundle_dir = Path(bundle_dir)
    if not hasattr(key, "sign"):
        key = load_signing_key(key)
    try:
        raw = read_manifest_bytes(bundle_dir)
        verify_files(bundle_dir, read_manifest(bundle_dir, raw))
    except BundleError as exc:
        raise cli.UsageError(f"not signing: {exc}") from None
    doc = signing.sign_manifest(raw, key)
    atomic_write_json(bundle_dir / SIGNATURE, doc)
    log(f"signed {bundle_dir / MANIFEST} with key {doc['key_fingerprint']}: wrote {bundle_dir / SIGNATURE}")
    return doc


def check_run(run_dir: Path, need_detector: bool = True) -> dict:
    """The run's config.json, after checking the files a bundle needs are there."""
    if not run_dir.is_dir():
        raise cli.UsageError(f"{run_dir}: no such run folder")
    for name in ("config.json", "classifier.keras"):
        if not (run_dir / name).exists():
            raise cli.UsageError(f"{run_dir}: no {name} (not a finished medrobust.train run)")
    if need_detector and not (run_dir / "detector").exists():
        raise cli.UsageError(f"{run_dir}: no detector/ (trained with --detector false?); the screening bundle "
                             "needs the detector: train with --detector true")
    return read_run_config(run_dir)


def owned_files(out_dir: Path) -> set[str]:
    """The files in out_dir that an earlier export wrote (this one may replace or remove them).

    Raises cli.UsageError when out_dir is a file, or a non-empty folder that holds no bundle of ours
    (no medrobust manifest.json and no export-in-progress.json): the export never removes or
    overwrites a file it did not write."""
    from medrobust_screen.manifest import plain_name

    if not out_dir.exists():
        return set()
    if not out_dir.is_dir():
        raise cli.UsageError(f"--out {out_dir} is a file, not a folder")
    present = {p.name for p in out_dir.iterdir()}
    if not present:
        return set()
    listed: set[str] = set()
    ours = False
    for name in (MANIFEST, IN_PROGRESS):
        if name not in present:
            continue
        try:
            doc = json.loads((out_dir / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            doc = None
        if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
            raise cli.UsageError(f"--out {out_dir}: its {name} is not from a medrobust export; refusing to write "
                                 "into a folder this tool did not make (choose a new or empty folder)")
        files = doc.get("files")
        listed |= {n for n in (files if isinstance(files, (dict, list)) else []) if plain_name(n)}
        ours = True
    if not ours:
        shown = ", ".join(sorted(present)[:5]) + (", ..." if len(present) > 5 else "")
        raise cli.UsageError(f"--out {out_dir} is not empty and holds no medrobust bundle ({shown}); choose a new "
                             "or empty folder (the export never removes files it did not write)")
    return (listed | {MANIFEST, IN_PROGRESS, PARITY, SIGNATURE}) & present


def load_detector(run_dir: Path, classifier):
    """The run's detector (medrobust.detection.Detector)."""
    try:
        from medrobust.detection import Detector
    except ImportError as exc:
        raise cli.UsageError(f"cannot load the detector: medrobust.detection is not available ({exc})") from None
    return Detector.load(run_dir / "detector", classifier)


def export_bundle(run, out, quantize: str = "int8", onnx: bool = False, data=None, calibration: int = 1000,
                  int8_scope: str = "mixed", opset: int = 17, recalibrate: bool = True, detector=None,
                  signing_key=None, log=print) -> dict:
    """The work behind `bundle`; returns the manifest. `detector` may be given (an object with
    `.threshold` and `.score_model()`) instead of loading run/detector/; `data` may be a data name
    or path, an OCTData, or an array of calibration images (then there is no validation split and
    the Keras threshold is kept); `signing_key` (a private key object or key file) signs the bundle."""
    run_dir, out_dir = Path(run), Path(out)
    config = check_run(run_dir, need_detector=detector is None)
    if out_dir.resolve() == run_dir.resolve():
        raise cli.UsageError("--out must not be the run folder")
    old_files = owned_files(out_dir)  # refuses a folder that is not ours, before any work
    if old_files:  # said, not silent: the earlier bundle (and its signature) is about to be replaced
        signed = SIGNATURE in old_files
        log(f"note: {out_dir} holds an earlier export; its {len(old_files)} files "
            + ("(signature.json included: sign the new bundle again) " if signed and signing_key is None else "")
            + "are replaced by this one (files the export did not write are left alone)")
    if signing_key is not None and not hasattr(signing_key, "sign"):
        signing_key = load_signing_key(signing_key)

    cli.import_tensorflow()  # quietly, before anything else imports it
    from medrobust.models import load_classifier
    from export import converters, screening

    image_size = int(config["image_size"])
    started = time.time()
    log(f"loading {run_dir}")
    classifier = load_classifier(run_dir / "classifier.keras")
    if tuple(classifier.inputs[0].shape)[1:] != (image_size, image_size, 1):
        raise cli.UsageError(f"{run_dir}: classifier input {tuple(classifier.inputs[0].shape)} does not match "
                             f"image_size {image_size} in config.json")
    if detector is None:
        detector = load_detector(run_dir, classifier)
    threshold = screening.float32(detector.threshold)
    score_source = screening.score_function(detector, image_size,
                                            part_scores=screening.detector_parts(detector) is not None)[2]
    log(f"detector: threshold {threshold:.6g}; score graph from {score_source}")

    calib, calib_source, x_val = None, None, None
    recalibrating = recalibrate and quantize != "none"
    if quantize == "int8" or recalibrating:
        dataset = _dataset(data, config, image_size, log)
        if quantize == "int8":
            calib, calib_source = _calibration_images(dataset, calibration, int(config.get("seed", 0)))
        if recalibrating:
            x_val = _validation_images(dataset, log)
    target_fpr = float(getattr(detector, "target_fpr", 0.05))
    thresholds = {}
    probe = next((x for x in (x_val, calib) if x is not None), None)
    if probe is None:
        import numpy as np

        probe = np.random.default_rng(0).uniform(0, 1, (16, image_size, image_size, 1)).astype(np.float32)

    models = {
        "screening": screening.screening_model(classifier, detector, threshold),
        "classifier": screening.classifier_model(classifier),
        "detector": screening.detector_model(detector, image_size),
    }
    plan = [(name, "tflite") for name in models]
    if onnx:
        plan += [(name, "onnx") for name in models]
        if quantize == "int8":
            plan += [(name, "onnx-int8") for name in models]
    files = {_file_name(name, kind): (name, kind) for name, kind in plan}

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / IN_PROGRESS, {
        "format": BUNDLE_FORMAT, "note": "python -m export bundle was writing this folder and did not finish; "
                                         "run it again (it replaces only the files listed here)",
        "files": sorted(old_files | set(files) | {MANIFEST, SIGNATURE, PARITY})})
    for name in (MANIFEST, SIGNATURE, PARITY):  # the folder is no bundle until the new manifest is written
        (out_dir / name).unlink(missing_ok=True)
    for name in sorted(old_files - set(files) - {IN_PROGRESS}):  # files of the earlier export this one drops
        (out_dir / name).unlink(missing_ok=True)
    entries: dict[str, dict] = {}
    onnx_float: dict[str, bytes] = {}
    for i, (file_name, (name, kind)) in enumerate(files.items(), 1):
        t0 = time.time()
        precision = converters.PRECISION[quantize] if kind == "tflite" else ("int8" if kind == "onnx-int8"
                                                                              else "float32")
        log(f"[{i}/{len(files)}] {file_name}: converting ({precision})...")
        calibrated = {}
        if kind == "tflite":
            content = converters.to_tflite(models[name], quantize, calib, int8_scope)
            if x_val is not None and name in ("screening", "detector"):
                content, calibrated = _recalibrate(content, name, "tflite", classifier, detector, threshold, x_val,
                                                   target_fpr, quantize, calib, int8_scope, opset, log)
            details = {"format": "tflite", "precision": precision, **converters.tflite_io_details(content),
                       "op_types": converters.tflite_op_summary(content)}
        elif kind == "onnx":
            content = onnx_float[name] = converters.to_onnx(models[name], opset)
            details = {"format": "onnx", "precision": precision, "opset": opset, **_onnx_io(content)}
        else:
            content = converters.quantize_onnx_int8(onnx_float[name], calib, int8_scope)
            if x_val is not None and name in ("screening", "detector"):
                content, calibrated = _recalibrate(content, name, "onnx-int8", classifier, detector, threshold,
                                                   x_val, target_fpr, quantize, calib, int8_scope, opset, log)
            details = {"format": "onnx", "precision": precision, "opset": opset, **_onnx_io(content),
                       "int8_scope": int8_scope, "quantized_op_types": list(converters.ONNX_INT8_OPS)}
        if name in ("screening", "detector"):
            details["threshold"] = calibrated.get("threshold", threshold)
            if name == "screening":
                details["threshold"] = _baked_threshold(content, file_name, details["threshold"], probe, log)
        if file_name == "screening.tflite":
            thresholds["screening"] = details["threshold"]
        atomic_write_bytes(out_dir / file_name, content)
        entries[file_name] = {"model": name, **details, **{k: v for k, v in calibrated.items() if k != "threshold"}}
        log(f"[{i}/{len(files)}] {file_name}: {len(content) / 1024:.1f} KiB in {time.time() - t0:.1f} s")

    manifest = _manifest(run_dir, out_dir, config, quantize, int8_scope, calib, calib_source,
                         thresholds["screening"], entries, onnx, opset)
    manifest["detector"]["keras_threshold"] = threshold
    manifest["detector"]["threshold_source"] = (
        f"recalibrated on screening.tflite's own scores of {len(x_val)} clean validation images, "
        f"target false-alarm rate {target_fpr:g}" if "threshold_calibration" in entries["screening.tflite"]
        else "the Keras detector's threshold (clean validation split of the run)")
    manifest["detector"]["score_graph"] = score_source
    parts = screening.detector_parts(detector)
    if parts is not None:  # the screening model's part_scores output, column by column
        manifest["detector"]["parts"] = parts
        if hasattr(detector, "combination_rule"):
            manifest["detector"]["combination"] = detector.combination_rule()
        manifest["outputs"][OUTPUT_PART_SCORES] = (
            f"[n, {len(parts)}] standardised score of each detector part, in the order of detector.parts "
            "(detector.combination says how they make anomaly_score); the highest names the part that scored high")
    atomic_write_json(out_dir / MANIFEST, manifest)
    if signing_key is not None:
        sign_bundle(out_dir, signing_key, log)
    (out_dir / IN_PROGRESS).unlink()
    log(f"wrote {out_dir} ({len(files)} models + {MANIFEST}" + (f" + {SIGNATURE}" if signing_key is not None else
                                                               "; unsigned: sign it with python -m export sign")
        + f") in {time.time() - started:.1f} s")
    return manifest


def _file_name(name: str, kind: str) -> str:
    return {"tflite": f"{name}.tflite", "onnx": f"{name}.onnx", "onnx-int8": f"{name}.int8.onnx"}[kind]


def _run_model(content: bytes, kind: str, x):
    from export import converters

    return converters.run_tflite(content, x) if kind == "tflite" else converters.run_onnx(content, x)


def _baked_threshold(content: bytes, file_name: str, threshold: float, x, log) -> float:
    """The threshold a screening model really compares its scores with (its own `threshold` output):
    `threshold` as a float32, or as the float16 constant of a float16 model. RuntimeError if the output
    is not one constant, is far from `threshold`, or the model's flags do not follow it."""
    import numpy as np

    out = _run_model(content, "tflite" if file_name.endswith(".tflite") else "onnx", x[:64])
    baked = np.asarray(out[OUTPUT_THRESHOLD], np.float32).reshape(-1)
    value = float(baked[0])
    if not np.all(baked == baked[0]) or not abs(value - threshold) <= 1e-3 * max(1.0, abs(threshold)):
        raise RuntimeError(f"{file_name}: the baked-in threshold {baked[:3]} is not the threshold {threshold!r}")
    if not np.array_equal(out[OUTPUT_FLAG] > 0.5, out[OUTPUT_SCORE] > np.float32(value)):
        raise RuntimeError(f"{file_name}: its flags do not follow its own threshold {value!r}")
    if np.float32(value) != np.float32(threshold):
        log(f"{file_name}: the model stores its threshold as {value!r} ({threshold!r} rounded to the model's "
            "precision); the manifest states that value")
    return value


def _dataset(data, config: dict, image_size: int, log):
    """An OCTData (loaded from a name or path, default the run's own --data) or a given image array."""
    import numpy as np

    if isinstance(data, np.ndarray):
        return data
    if data is None or isinstance(data, str):
        from medrobust.data import load_run_data, run_data_argument

        log(f"export data: {data or run_data_argument(config)} (int8 calibration: train split; "
            "threshold: validation split)")
        data = load_run_data(config, data, image_size=image_size)
    x = data["train"][0]
    if x.shape[1:] != (image_size, image_size, 1):
        raise cli.UsageError(f"export images are {x.shape[1:]}, the model takes ({image_size}, {image_size}, 1)")
    return data


def _calibration_images(dataset, n: int, seed: int):
    import numpy as np

    from export.converters import representative_batches

    if isinstance(dataset, np.ndarray):
        return representative_batches(dataset, n, seed), "given images"
    source = f"train split of {dataset.source}" + (" (SYNTHETIC phantom)" if dataset.synthetic else "")
    return representative_batches(dataset["train"][0], n, seed), source


def _validation_images(dataset, log):
    import numpy as np

    if isinstance(dataset, np.ndarray) or "val" not in dataset.splits or len(dataset["val"][1]) < 20:
        log("threshold: no validation split of 20+ images; the exported models keep the Keras threshold")
        return None
    return dataset["val"][0]


def _recalibrate(content: bytes, name: str, kind: str, classifier, detector, keras_threshold: float, x_val,
                 target_fpr: float, quantize: str, calib, int8_scope: str, opset: int, log) -> tuple[bytes, dict]:
    """The exported model's own threshold at target_fpr on clean validation scores; a screening model is
    converted again with it baked in. kind: 'tflite' or 'onnx-int8'. Returns (model bytes, manifest
    details)."""
    import numpy as np

    from medrobust.detection.scores import threshold_at_fpr
    from export import converters, screening

    scores = _run_model(content, kind, x_val)[OUTPUT_SCORE]
    threshold = screening.float32(threshold_at_fpr(scores, target_fpr))
    keras_fpr = float(np.mean(scores > keras_threshold))
    if name == "screening" and threshold != keras_threshold:
        model = screening.screening_model(classifier, detector, threshold)
        content = (converters.to_tflite(model, quantize, calib, int8_scope) if kind == "tflite"
                   else converters.quantize_onnx_int8(converters.to_onnx(model, opset), calib, int8_scope))
        out = _run_model(content, kind, x_val)
        if not np.array_equal(out[OUTPUT_FLAG] > 0.5, out[OUTPUT_SCORE] > out[OUTPUT_THRESHOLD]):
            raise RuntimeError(f"{name}: the re-exported flag does not match its own threshold")
        scores = out[OUTPUT_SCORE]
    file_name = _file_name(name, kind)
    log(f"{file_name}: threshold {threshold:.6g} on its own scores of {len(x_val)} clean validation images "
        f"(Keras {keras_threshold:.6g}: would flag {keras_fpr:.3f} of them; target {target_fpr:g})")
    return content, {"threshold": threshold, "threshold_calibration": {
        "images": int(len(x_val)), "target_fpr": target_fpr, "val_fpr": float(np.mean(scores > threshold)),
        "val_fpr_with_keras_threshold": keras_fpr}}


def _onnx_io(content: bytes) -> dict:
    import onnx

    proto = onnx.load_from_string(content)

    def dims(value):
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    init = {i.name for i in proto.graph.initializer}
    return {"inputs": {v.name: {"shape": dims(v)} for v in proto.graph.input if v.name not in init},
            "outputs": {v.name: {"shape": dims(v)} for v in proto.graph.output}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _referral(point: dict) -> dict:
    """The run's referral operating point (metrics.json "referral", medrobust.evaluation.referral) as the
    bundle states it; medrobust-screen applies it to the screening model's probabilities."""
    return {"threshold": float(point["threshold"]), "score": "p_disease = 1 - P(NORMAL)",
            "rule": REFERRAL_RULE, "target_sensitivity": point.get("target_sensitivity"),
            "chosen_on": f"{point.get('chosen_on', 'val')} split, float Keras classifier",
            "val": {k: point.get("val", {}).get(k) for k in ("sensitivity", "specificity", "n_disease", "n_normal")},
            "test": {k: point.get("test", {}).get(k) for k in ("sensitivity", "specificity", "n_disease", "n_normal")}
            if point.get("test") else None}


def _manifest(run_dir, out_dir, config, quantize, int8_scope, calib, calib_source, threshold, entries, onnx,
              opset) -> dict:
    from medrobust.io import package_versions
    from export import converters, tflite_compact

    image_size = int(config["image_size"])
    classifier_hash = _sha256(run_dir / "classifier.keras")
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
    quantization = {"mode": quantize, "tflite_precision": converters.PRECISION[quantize]}
    if quantize == "int8":
        quantization.update({
            "tflite": {
                "scheme": "post-training int8 (TFLiteConverter, Optimize.DEFAULT, representative dataset); "
                          "float32 input and outputs (QUANTIZE/DEQUANTIZE inside the model)",
                "int8_scope": int8_scope,
                "float_op_types": [] if int8_scope == "full" else list(converters.FLOAT_OPS),
                "float_layers": "none" if int8_scope == "full" else "the first layer(s) reading the raw image and the last layer(s) before the outputs",
                "float_layer_weights": "none" if int8_scope == "full" else (
                    f"weights of {tflite_compact.MIN_ELEMENTS}+ values stored as per-channel symmetric int8 (output "
                    "or input channels, whichever keeps the outputs on calibration images closer to the float32 "
                    "weights) and dequantized to float32 in the model (weight-only int8, float32 compute); smaller "
                    "ones float32"),
                "io_dtype": "float32",
            },
            "calibration": {"images": int(len(calib)), "source": calib_source, "seed": int(config.get("seed", 0))},
        })
        if onnx:
            quantization["onnx"] = {
                "scheme": "onnxruntime.quantization.quantize_static, QDQ, MinMax, per-channel symmetric int8 "
                          "weights, int8 activations; the same recipe as TFLite: float32 input and outputs (no "
                          "quantize/dequantize pair on any output)",
                "int8_scope": int8_scope,
                "quantized_op_types": list(converters.ONNX_INT8_OPS),
                "float_layers": "none" if int8_scope == "full" else "the first layer(s) reading the raw image and the last layer(s) before the outputs",
                "io_dtype": "float32"}
    elif quantize == "float16":
        quantization["tflite"] = {"scheme": "float16 weights (Optimize.DEFAULT, supported_types float16), float32 "
                                            "compute and I/O", "io_dtype": "float32"}
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(CLASSES),
        "input": {"name": "image", "shape": [None, image_size, image_size, 1], "dtype": "float32",
                  "range": [0.0, 1.0], "layout": "NHWC, one grey channel"},
        "preprocessing": {"image_size": image_size, "module": "medrobust.data.images", "function": "load_image",
                          "rule": PREPROCESSING_RULE},
        "threshold": threshold,
        "detector": {"score": "combined anomaly score of medrobust.detection (higher = more suspicious)",
                     "flag": f"anomaly_score > {threshold!r}",
                     "clean_fpr": metrics.get("detector_clean_fpr")},
        "verdict_rule": VERDICT_RULE,
        **({"referral": _referral(metrics["referral"])} if metrics.get("referral") else {}),
        "clinical_reading": "refer = the detector flags the scan as unlike the clean scans the models were built on "
                            "(adversarial, artefact, other device or disease): do not trust the AI on this scan, a "
                            "human reads it. classify = the predicted class is a screening result, not a diagnosis.",
        "outputs": {OUTPUT_PROBABILITIES: f"[n, {len(CLASSES)}] softmax over classes",
                    OUTPUT_SCORE: "[n] combined anomaly score", OUTPUT_FLAG: "[n] 1.0 if anomaly_score > threshold"},
        "quantization": quantization,
        "models": {
            name: {"file": f"{name}.tflite", **({"onnx": f"{name}.onnx"} if onnx else {}),
                   **({"onnx_int8": f"{name}.int8.onnx"} if onnx and quantize == "int8" else {}),
                   "precision": converters.PRECISION[quantize]}
            for name in ("screening", "classifier", "detector")
        },
        "files": {name: {"sha256": _sha256(out_dir / name), "bytes": (out_dir / name).stat().st_size, **entry}
                  for name, entry in entries.items()},
        "versions": package_versions(),
        "source_run": {
            "path": str(run_dir.resolve()),
            "classifier_sha256": classifier_hash,
            "data": config.get("data"), "data_source": config.get("data_source"),
            "synthetic_data": config.get("synthetic_data"), "method": config.get("method"),
            "arch": config.get("arch"), "width": config.get("width"), "image_size": image_size,
            "seed": config.get("seed"), "clean_accuracy": metrics.get("clean_accuracy"),
        },
    }


def main() -> None:
    cli.run(bundle)


if __name__ == "__main__":
    main()
