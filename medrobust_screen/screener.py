"""The screening model of a checked bundle (LiteRT), run on one image at a time: one result row per image.

A row is ``COLUMNS``: file, verdict (``classify`` | ``refer`` | ``error``), class, confidence,
anomaly_score, error, training_data, bundle_signature (see medrobust_screen.cli for the command).
A bundle whose manifest carries a referral operating point ("referral": the run's threshold on
P(disease) = 1 - P(NORMAL), chosen on the validation split for a target sensitivity; see
medrobust.evaluation.referral) adds ``REFERRAL_COLUMNS``: p_disease and disease_screen
(``positive`` = refer to an ophthalmologist, ``negative``). Bundles without one give the rows they always gave.
A bundle whose screening model has the optional ``part_scores`` output (each detector part's standardised
score, named in order by the manifest's ``detector.parts``) adds ``PART_COLUMNS``: top_part, the name of
the part with the highest score (blank for an error row). Older bundles give the rows they always gave.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator

import numpy as np

from medrobust_screen import dicom as dicom_files
from medrobust_screen import report
from medrobust_screen import volume as volumes
from medrobust_screen.errors import BundleError, UsageError
from medrobust_screen.images import ImageError, load_image
from medrobust_screen.inputs import iter_image_files
from medrobust_screen.referral import REFERRAL_COLUMNS, disease_screen
from medrobust_screen.manifest import (MANIFEST, check_signature, read_manifest, read_manifest_bytes, training_data,
                                       verify_files)

OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_SCORE = "anomaly_score"
OUTPUT_FLAG = "flag"
OUTPUT_THRESHOLD = "threshold"  # screening models: the threshold baked into the graph, [n] (same value)
OUTPUT_PART_SCORES = "part_scores"  # optional, [n, k]: each detector part's standardised score (manifest detector.parts)

VERDICT_CLASSIFY = "classify"
VERDICT_REFER = "refer"
VERDICT_ERROR = "error"
VERDICT_RULE = ("flag = anomaly_score > threshold; verdict = 'refer' (human review, do not trust the AI "
                "on this scan) if flag, else 'classify' (the most probable class stands)")

COLUMNS = ("file", "verdict", "class", "confidence", "anomaly_score", "error", "training_data", "bundle_signature")
PART_COLUMNS = ("top_part",)
UNVERIFIED = "NOT VERIFIED (--allow-unsigned)"


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

    Raises BundleError (one-line reason) for a bundle that fails any check (see medrobust_screen.cli).
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
        self.referral = m.get("referral")
        self.referral_threshold = float(self.referral["threshold"]) if self.referral else None
        if self.referral and "NORMAL" not in self.classes:
            raise BundleError(f"{self.bundle_dir}: {MANIFEST} has a referral threshold but no NORMAL class")
        name = m["models"]["screening"]["file"]
        with open(os.path.join(self.bundle_dir, name), "rb") as f:
            content = f.read()
        if hashlib.sha256(content).hexdigest() != m["files"][name]["sha256"]:  # changed since verify_files
            raise BundleError(f"{self.bundle_dir}: {name} changed while loading; refusing it")
        try:
            self.interpreter = _interpreter_class()(model_content=content, num_threads=threads)
        except ValueError as exc:
            raise BundleError(f"{self.bundle_dir}: {name} is not a loadable TFLite model ({exc})") from None
        self.parts = _manifest_parts(m)  # [{name, description}] or None
        self._bind(name)
        self._check_threshold(name)

    @property
    def columns(self) -> tuple[str, ...]:
        """The row columns of this bundle (REFERRAL_COLUMNS only when its manifest has a referral point,
        PART_COLUMNS only when its screening model has part scores)."""
        return COLUMNS + (REFERRAL_COLUMNS if self.referral else ()) + (PART_COLUMNS if self.parts else ())

    @property
    def part_names(self) -> tuple[str, ...]:
        """The detector part names in part_scores order (empty for a bundle without part scores)."""
        return tuple(p["name"] for p in self.parts) if self.parts else ()

    def part_fields(self, part_scores: np.ndarray | None) -> dict:
        """{top_part} for one image's part scores [k] (blank for None: an unreadable scan); {} for a bundle
        without part scores."""
        if not self.parts:
            return {}
        if part_scores is None:
            return {"top_part": ""}
        return {"top_part": self.part_names[int(np.argmax(part_scores))]}

    def referral_fields(self, probs: np.ndarray | None) -> dict:
        """{p_disease, disease_screen} for one softmax [classes] (blank for None: an unreadable scan); {}
        for a bundle without a referral point."""
        if not self.referral:
            return {}
        if probs is None:
            return {"p_disease": "", "disease_screen": ""}
        p = 1.0 - float(probs[self.classes.index("NORMAL")])
        return disease_screen(p, self.referral_threshold)

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
        if (OUTPUT_PART_SCORES in outputs) != bool(self.parts):
            raise BundleError(f"{name}: " + (f"has a {OUTPUT_PART_SCORES} output but {MANIFEST} names no detector.parts"
                                             if self.parts is None else
                                             f"has no {OUTPUT_PART_SCORES} output but {MANIFEST} lists detector.parts"))
        if self.parts:
            k = [int(v) for v in outputs[OUTPUT_PART_SCORES]["shape_signature"]][-1:]
            if k != [len(self.parts)]:
                raise BundleError(f"{name}: {OUTPUT_PART_SCORES} has {k[0] if k else '?'} columns, {MANIFEST} lists "
                                  f"{len(self.parts)} detector.parts")
            needed = needed + (OUTPUT_PART_SCORES,)
        (detail,) = inputs.values()
        shape = [int(v) for v in detail["shape_signature"]]
        if shape[1:] != [self.image_size, self.image_size, 1] or detail["dtype"] != np.float32:
            raise BundleError(f"{name}: input is {shape} {np.dtype(detail['dtype']).name}, the manifest says "
                              f"[-1, {self.image_size}, {self.image_size}, 1] float32")
        self._input = detail["index"]
        it.resize_tensor_input(self._input, [1, self.image_size, self.image_size, 1])
        it.allocate_tensors()
        self._outputs = {k: outputs[k]["index"] for k in needed}
        self.output_names = tuple(sorted(outputs))  # e.g. for the report: which scores the model exposes
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
        return self.predict_parts(image)[:3]

    def predict_parts(self, image: np.ndarray) -> tuple[np.ndarray, float, bool, np.ndarray | None]:
        """Like ``predict``, plus the detector part scores [k] (float32, in ``part_names`` order; None for a
        bundle without them)."""
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
        parts = None
        if self.parts:
            parts = np.array(self.interpreter.get_tensor(self._outputs[OUTPUT_PART_SCORES]), np.float32).reshape(-1)
        return probs, score, flag, parts

    def load(self, path: str) -> np.ndarray:
        """A file -> the model input [s, s, 1] (ImageError with a one-line reason if it cannot be)."""
        return load_image(path, self.image_size)

    def screen_file(self, path: str, details: bool = False) -> dict:
        """One row for one file (an error row if it cannot be decoded). With ``details`` the row also carries
        ``report.DETAIL_KEY``: {probabilities ([n_classes] floats, None for an error row), thumbnail (PNG
        bytes or None), thumbnail_note, and for a bundle with part scores part_scores ([k] floats)} for the HTML
        report (the caller removes it before writing the row)."""
        try:
            image = self.load(path)
        except ImageError as exc:
            return self.row(path, error=exc.reason,
                            **({report.DETAIL_KEY: {"thumbnail_note": "not decoded"}} if details else {}))
        except OSError as exc:  # pragma: no cover - load_image turns these into ImageError already
            return self.row(path, error=f"cannot read file ({exc.__class__.__name__}: {exc})")
        probs, score, flag, parts = self.predict_parts(image)
        k = int(np.argmax(probs))
        extra = {}
        if details:
            extra[report.DETAIL_KEY] = {"probabilities": [float(p) for p in probs],
                                        "thumbnail": report.thumbnail_of_file(path), "thumbnail_note": "the image",
                                        **({"part_scores": [float(v) for v in parts]} if parts is not None else {})}
        return self.row(path, verdict=VERDICT_REFER if flag else VERDICT_CLASSIFY, cls=self.classes[k],
                        confidence=float(f"{probs[k]:.6f}"), anomaly_score=float(f"{score:.7g}"),
                        **self.referral_fields(probs), **self.part_fields(parts), **extra)

    def row(self, path: str, verdict: str = VERDICT_ERROR, cls: str = "", confidence="", anomaly_score="",
            error: str = "", **extra) -> dict:
        """A result row (COLUMNS; `extra` may add columns a caller declared); an error row by default."""
        return {"file": path, "verdict": verdict, "class": cls, "confidence": confidence,
                "anomaly_score": anomaly_score, "error": " ".join(str(error).split()),
                "training_data": self.training_data["label"], "bundle_signature": self.signature_label,
                **self.referral_fields(None), **self.part_fields(None), **extra}

    def screen(self, paths: Iterable[str], stats: dict | None = None,
               volume_options: "volumes.VolumeOptions | None" = None, details: bool = False) -> Iterator[dict]:
        """Rows for every image under `paths`, one at a time (a generator: bounded memory).

        DICOM files are grouped first (``volume.plan_series``: headers only, no pixels): the files of one
        series give one volume row at the place of its first file, a file on its own gives its volume row
        (B-scan rows before it with volume_options.per_frame). Every row carries the run columns
        (training_data, bundle_signature); with ``details`` rows for images and volumes also carry
        ``report.DETAIL_KEY`` (see ``screen_file``)."""
        run_columns = {"training_data": self.training_data["label"], "bundle_signature": self.signature_label}
        options = volume_options or volumes.VolumeOptions()
        files = list(iter_image_files(paths, stats))
        is_dicom = {path: dicom_files.is_dicom_file(path) for path in files}
        plan = volumes.plan_series([p for p in files if is_dicom[p]]) if any(is_dicom.values()) else {}
        done: set[int] = set()
        for path in files:
            if not is_dicom[path]:
                yield self.screen_file(path, details)
                continue
            placement = plan.get(path)
            if placement is not None and placement.series is not None:
                if id(placement.series) in done:
                    continue  # screened with the first file of its series
                done.add(id(placement.series))
                rows = volumes.screen_series(self, placement.series, options, details)
            elif placement is not None and placement.duplicate_of:
                rows = [volumes.duplicate_row(self, path, placement)]
            else:
                rows = volumes.screen_volume(self, path, options, details, placement)
            for row in rows:
                yield {**row, **run_columns}


def _manifest_parts(manifest: dict) -> list[dict] | None:
    """detector.parts of a checked manifest (medrobust_screen.manifest checks its types), or None."""
    parts = manifest.get("detector", {}).get("parts") if isinstance(manifest.get("detector"), dict) else None
    return [{"name": p["name"], "description": p.get("description", "")} for p in parts] if parts else None


def _signature_details(interpreter, key: str) -> tuple[dict, dict]:
    """Input and output tensor details by name. The signature runner is dropped before returning: the
    interpreter refuses resize_tensor_input while a runner holds a reference to it."""
    runner = interpreter.get_signature_runner(key)
    details = runner.get_input_details(), runner.get_output_details()
    del runner
    return details
