"""medrobust-screen: screen OCT scans with an exported bundle, on a device without TensorFlow.

    medrobust-screen --bundle bundles/NAME --trusted-key publisher.pub IMAGE_OR_FOLDER... [--out results.csv|.json]
    medrobust-screen --bundle bundles/NAME --allow-unsigned IMAGE_OR_FOLDER...      (unsigned: said in every output)
    python -m export.runtime --bundle bundles/NAME ...

Imports only the standard library, numpy, Pillow (through ``medrobust.data.images``), the LiteRT
interpreter (``ai_edge_litert``, else ``tflite_runtime``), ``medrobust.classes`` and, to check a
signature, ``cryptography`` (and ``pydicom`` for DICOM input, export.dicom) -- never TensorFlow.
``pip install ./edge`` installs exactly that.

Before loading anything it checks, in order, and refuses the bundle with a one-line reason (exit
status 2) at the first failure:

1. the signature (``signature.json``, Ed25519 over the exact bytes of ``manifest.json``) against the
   public key the operator passes with ``--trusted-key`` (see export.signing); ``--allow-unsigned``
   skips this check, and every output then says the bundle is NOT VERIFIED;
2. that the manifest has every field the runtime relies on;
3. the sha256 of every file the manifest lists;
4. that the threshold the manifest states is the one baked into ``screening.tflite`` (read back from
   the model's ``threshold`` output).

Each image is decoded with ``medrobust.data.images.load_image`` (the training preprocessing: EXIF
orientation, grey -- alpha composited on black, 16-bit scaled by 1/65535 -- centre square crop, BOX
resize, /255) and run through ``screening.tflite``. One row per image:

    file, verdict, class, confidence, anomaly_score, error, training_data, bundle_signature

verdict is ``refer`` when the detector flags the scan (anomaly_score > threshold: do not trust the
AI on this scan, a human reads it), else ``classify`` (class = the most probable class, confidence
its probability). A file that cannot be screened (corrupt, empty, not an image, too small, an
unsupported pixel mode) gets verdict ``error`` and the reason in ``error``; the run goes on.
``training_data`` says what data the model was trained on (``SYNTHETIC data (phantom) ...``) and
``bundle_signature`` whether the bundle's signature was verified; the JSON output carries both in
its header instead.

DICOM OCT files (``.dcm``/``.dicom``, or any file starting with a DICOM preamble; single- or
multi-frame, 8/16-bit, MONOCHROME1/2, rescale/window applied) are read by ``export.dicom`` and
reported per volume by ``export.volume``: one row per volume (one eye) with the worst-class verdict
over its B-scans, plus one row per B-scan with --per-frame; patient identifiers are written only
with --keep-identifiers.  When any DICOM file is among the inputs the rows gain the columns
``export.volume.DICOM_COLUMNS`` (level, frame, frames, counts, reason, sop_instance_uid, laterality).

Folders are searched recursively for files with an image extension or DICOM files (hidden files
and folders are skipped); files named explicitly are always screened. Images are processed one at a
time (bounded memory); with --out the results are streamed to a temporary file (created with the
umask's permissions) that is renamed into place at the end; nothing is written before the first row.

Exit status: 0 when every file found was processed (error rows included); 2 for a bad bundle, a
signature that does not verify, bad arguments, an input path that does not exist, or when no image
file was found; 130 when interrupted; 141 when the reader of standard output went away (``| head``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Iterable, Iterator

import numpy as np

from medrobust import cli
from medrobust.data.images import IMAGE_EXTENSIONS, ImageError, is_image_filename, load_image
from medrobust.io import mkstemp_beside

from export import dicom as dicom_files
from export import volume as volumes

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "medrobust-bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: screening models expose their baked-in threshold; bundles may be signed
MIN_FORMAT_VERSION = 2

OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_SCORE = "anomaly_score"
OUTPUT_FLAG = "flag"
OUTPUT_THRESHOLD = "threshold"  # screening models: the threshold baked into the graph, [n] (same value)

VERDICT_CLASSIFY = "classify"
VERDICT_REFER = "refer"
VERDICT_ERROR = "error"
VERDICT_RULE = ("flag = anomaly_score > threshold; verdict = 'refer' (human review, do not trust the AI "
                "on this scan) if flag, else 'classify' (the most probable class stands)")

COLUMNS = ("file", "verdict", "class", "confidence", "anomaly_score", "error", "training_data", "bundle_signature")
# Columns that describe the run rather than the image: in the JSON output they live in the header.
RUN_COLUMNS = ("training_data", "bundle_signature")
UNVERIFIED = "NOT VERIFIED (--allow-unsigned)"
TRUSTED_KEY_ENV = "MEDROBUST_TRUSTED_KEY"  # a provisioned device's publisher key, used when --trusted-key is absent

# Fields the runtime relies on; a manifest without one of them is refused.
REQUIRED_FIELDS = ("format", "format_version", "classes", "input", "preprocessing", "threshold", "models", "files")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    """A bundle that cannot be used (one-line reason)."""



class UsageError(BundleError):
    """Bad arguments (a missing input path, a bad --out): one line, exit status 2."""


# ------------------------------------------------------------------------------------------ bundle

def read_manifest_bytes(bundle_dir) -> bytes:
    """The exact bytes of manifest.json (what a signature covers)."""
    bundle_dir = os.fspath(bundle_dir)
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    try:
        with open(os.path.join(bundle_dir, MANIFEST), "rb") as f:
            return f.read()
    except FileNotFoundError:
        partial = " (export-in-progress.json is there: the export was interrupted)" if os.path.exists(
            os.path.join(bundle_dir, "export-in-progress.json")) else ""
        raise BundleError(f"{bundle_dir}: no {MANIFEST}{partial}; not a bundle, or the export did not finish: "
                          "run python -m export bundle again") from None


def read_manifest(bundle_dir, raw: bytes | None = None) -> dict:
    """Parse and check manifest.json, or the given bytes of it (fields and types only; see `verify_files`
    for the files)."""
    bundle_dir = os.fspath(bundle_dir)
    raw = read_manifest_bytes(bundle_dir) if raw is None else raw
    path = os.path.join(bundle_dir, MANIFEST)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise BundleError(f"{path}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                          "the bundle is incomplete or from another tool")
    if manifest["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format is {manifest['format']!r}, expected {BUNDLE_FORMAT!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r} is not supported (this runtime reads "
                          f"{MIN_FORMAT_VERSION}..{BUNDLE_FORMAT_VERSION}); update medrobust")
    if version < MIN_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version} is too old (its threshold cannot be checked "
                          "against the model, and it cannot be signed); export the run again")
    _check_manifest_types(manifest, path)
    return manifest


def _field(manifest: dict, dotted: str, path: str):
    value = manifest
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise BundleError(f"{path}: missing field {dotted}")
        value = value[key]
    return value


def _check_manifest_types(m: dict, path: str) -> None:
    classes = m["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
        raise BundleError(f"{path}: classes must be a list of class names")
    threshold = m["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise BundleError(f"{path}: threshold must be a finite number, got {threshold!r}")
    size = _field(m, "preprocessing.image_size", path)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BundleError(f"{path}: preprocessing.image_size must be a positive integer, got {size!r}")
    shape = _field(m, "input.shape", path)
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == [size, size, 1]):
        raise BundleError(f"{path}: input.shape must be [null, {size}, {size}, 1], got {shape!r}")
    if _field(m, "input.dtype", path) != "float32":
        raise BundleError(f"{path}: input.dtype must be float32")
    files = m["files"]
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: files must map file names to their sha256")
    for name, entry in files.items():
        if not _plain_name(name):
            raise BundleError(f"{path}: file name {name!r} is not a plain file name inside the bundle")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA256.match(entry["sha256"]):
            raise BundleError(f"{path}: files.{name}.sha256 is missing or not a sha256 hex digest")
    screening = _field(m, "models.screening.file", path)
    if screening not in files:
        raise BundleError(f"{path}: models.screening.file {screening!r} is not listed in files")


def _plain_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name
            and "\\" not in name and "\x00" not in name)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(bundle_dir, manifest: dict) -> None:
    """Check the sha256 of every file the manifest lists; BundleError on the first mismatch."""
    bundle_dir = os.fspath(bundle_dir)
    for name, entry in manifest["files"].items():
        path = os.path.join(bundle_dir, name)
        if not os.path.isfile(path):
            raise BundleError(f"{bundle_dir}: {name} is listed in {MANIFEST} but missing; re-export the bundle")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{bundle_dir}: {name} does not match its sha256 in {MANIFEST} (changed or "
                              "corrupt file); refusing to load it, re-export or re-copy the bundle")


def check_signature(bundle_dir, raw_manifest: bytes, trusted_key=None, allow_unsigned: bool = False) -> dict:
    """The signature status of a bundle: {'status': 'verified', 'key_fingerprint', 'signed'} when
    `trusted_key` (a public key file) verifies signature.json over `raw_manifest`; {'status':
    'not verified', 'reason'} with `allow_unsigned`. BundleError otherwise (no key and no
    permission, a bad key, no signature, a signature that does not verify)."""
    from export import signing

    if trusted_key is not None and allow_unsigned:
        raise UsageError("--trusted-key and --allow-unsigned exclude each other")
    if trusted_key is None:
        if not allow_unsigned:
            raise UsageError("pass --trusted-key PUBLIC_KEY (the bundle publisher's public key) to check the "
                             "bundle's signature, or --allow-unsigned to screen without checking who made it")
        signed = os.path.exists(os.path.join(os.fspath(bundle_dir), signing.SIGNATURE))
        return {"status": "not verified", "reason": "--allow-unsigned; " + (
            f"the bundle's {signing.SIGNATURE} was not checked" if signed else "the bundle is not signed")}
    try:
        return signing.verify_manifest(bundle_dir, raw_manifest, signing.load_public_key(trusted_key))
    except signing.SignatureError as exc:
        raise BundleError(str(exc)) from None


def training_data(manifest: dict) -> dict:
    """What data the bundle's models were trained on, from the manifest's source_run:
    {'source': str | None, 'synthetic': bool | None, 'label': one line for outputs}."""
    run = manifest.get("source_run") if isinstance(manifest.get("source_run"), dict) else {}
    source = run.get("data_source") or run.get("data")
    synthetic = run.get("synthetic_data") if isinstance(run.get("synthetic_data"), bool) else None
    source_text = str(source) if source else "source not recorded"
    if synthetic:
        label = f"SYNTHETIC data ({source_text}): not for clinical use"
    elif synthetic is False:
        label = f"real scans ({source_text})"
    else:
        label = f"data of unknown kind ({source_text}; the manifest does not say whether it was synthetic)"
    return {"source": source, "synthetic": synthetic, "label": label}


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise BundleError("no TFLite interpreter: pip install ai-edge-litert (or tflite-runtime)") from None
    return Interpreter


class Screener:
    """A verified bundle's screening model, ready to screen one image at a time.

    screener = Screener("bundles/NAME", trusted_key="publisher.pub")   # or allow_unsigned=True
    for row in screener.screen(["scans/"]): ...

    Raises BundleError (one-line reason) for a bundle that fails any check (see the module docstring).
    ``.signature`` is the signature status, ``.training_data`` the provenance, ``.threshold`` the
    threshold (manifest and model agree on it).
    """

    def __init__(self, bundle_dir, threads: int = 1, trusted_key=None, allow_unsigned: bool = False):
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        self.bundle_dir = os.fspath(bundle_dir)
        raw = read_manifest_bytes(self.bundle_dir)
        # The signature is checked over the very bytes parsed below (no second read of the manifest).
        self.signature = check_signature(self.bundle_dir, raw, trusted_key, allow_unsigned)
        self.manifest = read_manifest(self.bundle_dir, raw)
        verify_files(self.bundle_dir, self.manifest)
        m = self.manifest
        self.training_data = training_data(m)
        self.classes = tuple(m["classes"])
        self.threshold = float(m["threshold"])
        self.image_size = int(m["preprocessing"]["image_size"])
        name = m["models"]["screening"]["file"]
        with open(os.path.join(self.bundle_dir, name), "rb") as f:
            content = f.read()
        if hashlib.sha256(content).hexdigest() != m["files"][name]["sha256"]:  # changed since verify_files
            raise BundleError(f"{self.bundle_dir}: {name} changed while loading; refusing it")
        try:
            self.interpreter = _interpreter_class()(model_content=content, num_threads=threads)
        except ValueError as exc:
            raise BundleError(f"{self.bundle_dir}: {name} is not a loadable TFLite model ({exc})") from None
        self._bind(name)
        self._check_threshold(name)

    @property
    def signature_label(self) -> str:
        if self.signature["status"] == "verified":
            return f"verified ({self.signature['key_fingerprint']})"
        return UNVERIFIED

    def _bind(self, name: str) -> None:
        it = self.interpreter
        signatures = it.get_signature_list()
        if len(signatures) != 1:
            raise BundleError(f"{name}: expected one signature, found {sorted(signatures)}")
        inputs, outputs = _signature_details(it, next(iter(signatures)))
        needed = (OUTPUT_PROBABILITIES, OUTPUT_SCORE, OUTPUT_FLAG, OUTPUT_THRESHOLD)
        if len(inputs) != 1 or any(k not in outputs for k in needed):
            raise BundleError(f"{name}: expected one image input and outputs {', '.join(needed)}; "
                              f"found {sorted(inputs)} -> {sorted(outputs)}")
        (detail,) = inputs.values()
        shape = [int(v) for v in detail["shape_signature"]]
        if shape[1:] != [self.image_size, self.image_size, 1] or detail["dtype"] != np.float32:
            raise BundleError(f"{name}: input is {shape} {np.dtype(detail['dtype']).name}, the manifest says "
                              f"[-1, {self.image_size}, {self.image_size}, 1] float32")
        self._input = detail["index"]
        it.resize_tensor_input(self._input, [1, self.image_size, self.image_size, 1])
        it.allocate_tensors()
        self._outputs = {k: outputs[k]["index"] for k in needed}
        n = int(outputs[OUTPUT_PROBABILITIES]["shape_signature"][-1])
        if n != len(self.classes):
            raise BundleError(f"{name}: {n} class probabilities, the manifest lists {len(self.classes)} classes")

    def _check_threshold(self, name: str) -> None:
        """The flag is computed inside the model with its own constant: a manifest that states another
        threshold describes a different model (an edited manifest), so it is refused."""
        self.interpreter.set_tensor(self._input, np.zeros((1, self.image_size, self.image_size, 1), np.float32))
        self.interpreter.invoke()
        baked = float(self.interpreter.get_tensor(self._outputs[OUTPUT_THRESHOLD]).reshape(-1)[0])
        if np.float32(self.threshold) != np.float32(baked):
            raise BundleError(f"{self.bundle_dir}: {MANIFEST} says threshold {self.threshold!r}, but {name} has "
                              f"{baked!r} baked in; refusing a manifest that does not describe its model")

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """One preprocessed image [s, s, 1] (or [1, s, s, 1]) -> (probabilities, anomaly score, flag)."""
        image = np.asarray(image)
        s = self.image_size
        if image.shape not in ((s, s), (s, s, 1), (1, s, s, 1)):
            raise ValueError(f"image has shape {image.shape}; the bundle expects [{s}, {s}, 1] (or [1, {s}, {s}, 1])")
        if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
            raise ValueError(f"image has dtype {image.dtype}; expected float pixels in [0, 1]")
        x = np.ascontiguousarray(image, np.float32).reshape(1, s, s, 1)
        if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
            raise ValueError("image pixels must be finite and in [0, 1]")
        self.interpreter.set_tensor(self._input, x)
        self.interpreter.invoke()
        probs = np.array(self.interpreter.get_tensor(self._outputs[OUTPUT_PROBABILITIES])[0], np.float32)
        score = float(self.interpreter.get_tensor(self._outputs[OUTPUT_SCORE]).reshape(-1)[0])
        flag = bool(self.interpreter.get_tensor(self._outputs[OUTPUT_FLAG]).reshape(-1)[0] > 0.5)
        return probs, score, flag

    def load(self, path: str) -> np.ndarray:
        """A file -> the model input [s, s, 1] (ImageError with a one-line reason if it cannot be)."""
        return load_image(path, self.image_size)

    def screen_file(self, path: str) -> dict:
        """One row for one file (an error row if it cannot be decoded)."""
        try:
            image = self.load(path)
        except ImageError as exc:
            return self.row(path, error=exc.reason)
        except OSError as exc:  # pragma: no cover - load_image turns these into ImageError already
            return self.row(path, error=f"cannot read file ({exc.__class__.__name__}: {exc})")
        probs, score, flag = self.predict(image)
        k = int(np.argmax(probs))
        return self.row(path, verdict=VERDICT_REFER if flag else VERDICT_CLASSIFY, cls=self.classes[k],
                        confidence=float(f"{probs[k]:.6f}"), anomaly_score=float(f"{score:.7g}"))

    def row(self, path: str, verdict: str = VERDICT_ERROR, cls: str = "", confidence="", anomaly_score="",
            error: str = "", **extra) -> dict:
        """A result row (COLUMNS; `extra` may add columns a caller declared); an error row by default."""
        return {"file": path, "verdict": verdict, "class": cls, "confidence": confidence,
                "anomaly_score": anomaly_score, "error": " ".join(str(error).split()),
                "training_data": self.training_data["label"], "bundle_signature": self.signature_label, **extra}

    def screen(self, paths: Iterable[str], stats: dict | None = None,
               volume_options: "volumes.VolumeOptions | None" = None) -> Iterator[dict]:
        """Rows for every image under `paths`, one at a time (a generator: bounded memory).
        A DICOM file gives its volume row (and B-scan rows with volume_options.per_frame). Every row
        carries the run columns (training_data, bundle_signature)."""
        run_columns = {"training_data": self.training_data["label"], "bundle_signature": self.signature_label}
        for path in iter_image_files(paths, stats):
            if dicom_files.is_dicom_file(path):
                for row in volumes.screen_volume(self, path, volume_options or volumes.VolumeOptions()):
                    yield {**row, **run_columns}
            else:
                yield self.screen_file(path)


def _signature_details(interpreter, key: str) -> tuple[dict, dict]:
    """Input and output tensor details by name. The signature runner is dropped before returning: the
    interpreter refuses resize_tensor_input while a runner holds a reference to it."""
    runner = interpreter.get_signature_runner(key)
    details = runner.get_input_details(), runner.get_output_details()
    del runner
    return details


def check_inputs(paths: Iterable[str]) -> list[str]:
    """The input paths, after checking each exists (UsageError naming the first that does not)."""
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        if not path or not os.path.exists(path):
            raise UsageError(f"{path or repr(path)}: no such file or folder")
    return paths


def iter_image_files(paths: Iterable[str], stats: dict | None = None) -> Iterator[str]:
    """Files to screen, in order: an explicitly named file as is; a folder recursively (sorted, hidden
    entries skipped, IMAGE_EXTENSIONS and DICOM files). A path that vanished since `check_inputs` is
    yielded (it becomes an error row). `stats['ignored']` counts the non-image files seen in folders."""
    stats = stats if stats is not None else {}
    stats.setdefault("ignored", 0)
    for path in paths:
        path = os.fspath(path)
        if not os.path.isdir(path):
            yield path
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                if is_image_filename(name) or dicom_files.is_dicom_in_folder(os.path.join(root, name)):
                    yield os.path.join(root, name)
                else:
                    stats["ignored"] += 1


# ------------------------------------------------------------------------------------------ output

def output_format(out: str | None) -> str:
    """'csv' or 'json' for --out (CSV on stdout without it); UsageError for another extension or a
    folder that does not exist."""
    if not out:
        return "csv"
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".csv", ".json"):
        raise UsageError(f"--out must end with .csv or .json, got {out!r}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out: folder {folder} does not exist")
    if os.path.isdir(out):
        raise UsageError(f"--out: {out} is a folder")
    return ext[1:]


class _Sink:
    """Rows to stdout (CSV) or to --out (CSV or JSON), written to a temp file and renamed at the end.
    Nothing is written (no file created, no CSV header printed) before the first row."""

    def __init__(self, out: str | None, header: dict, columns: tuple[str, ...] = COLUMNS):
        self.out, self.header, self.columns, self.count = out, header, columns, 0
        self.format = output_format(out)
        self.file = self.tmp = self.writer = None

    def _open(self) -> None:
        if self.out:
            fd, self.tmp = mkstemp_beside(self.out)  # the umask's mode, not mkstemp's 0600
            self.file = os.fdopen(fd, "w", encoding="utf-8", newline="")
        else:
            self.file = sys.stdout
        if self.format == "csv":
            self.writer = csv.DictWriter(self.file, fieldnames=self.columns, lineterminator="\n")
            self.writer.writeheader()
        else:
            self.file.write("{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n"
                                            for k, v in self.header.items()) + '  "results": [')

    def write(self, row: dict) -> None:
        if self.file is None:
            self._open()
        if self.format == "csv":
            self.writer.writerow(row)
        else:
            self.file.write(("," if self.count else "") + "\n    " + json.dumps(_json_row(row)))
        self.count += 1

    def close(self, summary: dict) -> None:
        if self.file is None:
            return
        if self.format == "json":
            self.file.write(("\n  " if self.count else "") + "],\n  \"summary\": " + json.dumps(summary) + "\n}\n")
        self.file.flush()
        if self.tmp:
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.out)

    def abort(self) -> None:
        if self.tmp:
            self.file.close()
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


def _json_row(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in RUN_COLUMNS}  # in the JSON header instead
    for k in ("confidence", "anomaly_score"):
        if out[k] == "":
            out[k] = None
    if not out["error"]:
        out["error"] = None
    if out["verdict"] == VERDICT_ERROR or out["class"] == "":
        out["class"] = None
    return out


# -------------------------------------------------------------------------------------------- main

def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="medrobust-screen",
        description="Screen retinal OCT scans with an exported medrobust bundle (LiteRT, no TensorFlow). "
                    "One row per image: file, verdict (classify|refer|error), class, confidence, "
                    "anomaly_score, error, training_data, bundle_signature. verdict 'refer' = the detector "
                    "flags the scan: do not trust the AI on it, a human reads it.",
        epilog="The bundle is checked before any image is read: its signature against --trusted-key, the "
               "sha256 of every file, and the threshold baked into the model. Exit status: 0 when every file "
               "found was processed (unreadable files get error rows), 2 for a bad bundle, a signature that "
               "does not verify, bad arguments, a missing input path or no image found, 130 when interrupted.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image or DICOM files and/or folders (searched recursively for "
                             f"{' '.join(IMAGE_EXTENSIONS)}, .dcm .dicom and files starting with a DICOM "
                             "preamble); each must exist")
    parser.add_argument("--bundle", required=True, help="bundle folder written by `python -m export bundle`")
    parser.add_argument("--trusted-key", default=None, metavar="PUBLIC_KEY",
                        help="the bundle publisher's Ed25519 public key (PEM, from `python -m export keygen`); "
                             "the bundle's signature.json must verify with it. Default: $MEDROBUST_TRUSTED_KEY "
                             "(set once when a device is provisioned), unless --allow-unsigned is given")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="screen without checking the signature (who made the bundle is then unknown: "
                             "every output says NOT VERIFIED)")
    parser.add_argument("--out", default=None,
                        help="write results to this .csv or .json file (default: CSV on standard output)")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress or summary on standard error (warnings are still printed)")
    volumes.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    warn = lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True)  # noqa: E731 (even with --quiet)
    try:
        return _run(args, log, warn)
    except BundleError as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `medrobust-screen ... | head`: stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        os.close(devnull)
        return 141


def _run(args, log, warn) -> int:
    inputs = check_inputs(args.inputs)  # bad arguments fail before the bundle is even read
    output_format(args.out)
    try:
        volume_options = volumes.options_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    trusted_key = args.trusted_key
    if trusted_key is None and not args.allow_unsigned and os.environ.get(TRUSTED_KEY_ENV):
        trusted_key = os.environ[TRUSTED_KEY_ENV]
        log(f"trusted key from ${TRUSTED_KEY_ENV}: {trusted_key}")
    screener = Screener(args.bundle, threads=args.threads, trusted_key=trusted_key,
                        allow_unsigned=args.allow_unsigned)
    m = screener.manifest
    if screener.signature["status"] == "verified":
        log(f"bundle {args.bundle}: signature verified with trusted key {screener.signature['key_fingerprint']}")
    else:
        warn(f"bundle {args.bundle}: signature NOT VERIFIED ({screener.signature['reason']}): nothing shows who "
             "made this bundle or that its models are the ones its publisher exported")
    log(f"bundle {args.bundle}: {len(m['files'])} files match the manifest; "
        f"{m['models']['screening'].get('precision', '?')} screening model, image "
        f"{screener.image_size}x{screener.image_size}, threshold {screener.threshold:.6g} (baked into the model)")
    provenance = screener.training_data
    (log if provenance["synthetic"] is False else warn)(f"model trained on {provenance['label']}")
    header = {"bundle": os.path.abspath(args.bundle), "classes": list(screener.classes),
              "threshold": screener.threshold, "verdict_rule": VERDICT_RULE,
              "training_data": {k: provenance[k] for k in ("source", "synthetic", "label")},
              "bundle_signature": {**screener.signature, "label": screener.signature_label}}
    # DICOM hook: find the inputs first, since the CSV columns depend on whether any is DICOM.
    stats: dict = {}
    files = list(iter_image_files(inputs, stats))
    columns = COLUMNS
    if any(dicom_files.is_dicom_file(p) for p in files):
        columns = COLUMNS + volume_options.columns()
        dicom_files.import_pydicom()  # start-up, not screening time
        header.update(volume_rule=volumes.VOLUME_RULE, min_confidence=volume_options.min_confidence,
                      identifiers="kept" if volume_options.keep_identifiers else "left out")
    sink = _Sink(args.out, header, columns)
    counts = {VERDICT_CLASSIFY: 0, VERDICT_REFER: 0, VERDICT_ERROR: 0}
    dicom_counts = {"volumes": 0, "bscans": 0}
    started = last = time.perf_counter()
    try:
        for row in screener.screen(files, None, volume_options):
            if columns != COLUMNS:
                row.setdefault("level", volumes.LEVEL_IMAGE)
            sink.write(row)
            if row.get("level") == volumes.LEVEL_FRAME:
                continue  # counted through its volume's row
            counts[row["verdict"]] += 1
            if row.get("level") == volumes.LEVEL_VOLUME:
                dicom_counts["volumes"] += 1
                dicom_counts["bscans"] += row.get("frames") or 0
            if row["verdict"] == VERDICT_ERROR or row["error"]:
                log(f"error: {row['file']}: {row['error']}")
            now = time.perf_counter()
            if now - last > 5:
                log(f"... {sink.count} images")
                last = now
    except BaseException:
        sink.abort()
        raise
    seconds = time.perf_counter() - started
    n_files = sum(counts.values())
    summary = {**counts, "images": n_files, "ignored_non_image_files": stats.get("ignored", 0),
               **(dicom_counts if columns != COLUMNS else {}), "seconds": round(seconds, 3)}
    if n_files == 0:
        sink.abort()
        raise UsageError(f"no image files found in {', '.join(inputs)} "
                         f"(looked for {' '.join(IMAGE_EXTENSIONS)} and DICOM files)")
    sink.close(summary)
    n_images = n_files - dicom_counts["volumes"] + dicom_counts["bscans"]  # 2-D images + B-scans
    rate = n_images / seconds if seconds > 0 else float("inf")
    log(f"screened {n_files} files: {counts[VERDICT_CLASSIFY]} classify, {counts[VERDICT_REFER]} refer, "
        f"{counts[VERDICT_ERROR]} errors"
        + (f" ({dicom_counts['bscans']} B-scans in {dicom_counts['volumes']} DICOM volumes)"
           if dicom_counts["volumes"] else "")
        + (f", {stats['ignored']} non-image files ignored" if stats.get("ignored") else "")
        + f" ({seconds:.2f} s, {rate:.1f} images/s)" + (f"; wrote {args.out}" if args.out else ""))
    if screener.signature["status"] != "verified":
        warn("these results come from a bundle whose signature was NOT VERIFIED (--allow-unsigned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
