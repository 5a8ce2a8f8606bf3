"""One verdict per OCT volume (per eye) from the verdicts of its B-scans, for medrobust-screen.

A DICOM OCT file (see ``medrobust_screen.dicom``) holds one volume: the B-scans of one eye.  Each B-scan is
screened like a 2-D image (verdict ``classify`` with a class and confidence, or ``refer`` when the
detector flags it, or ``error`` when it cannot be decoded).  The volume gets one row whose verdict
follows the **worst-class rule**, in this order:

1. **error** -- no B-scan could be decoded (or the file is not a screenable OCT object).
2. **classify, urgent class** -- at least one *confident* B-scan has an urgent class (CNV or DME,
   Kermany et al. 2018's urgent referrals): the volume gets that class (if both occur, the one with
   more confident B-scans; then the higher confidence; then class order).
3. **refer** -- otherwise, if any B-scan was flagged by the detector or could not be decoded, or no
   B-scan is confident: a human reads the volume.
4. **classify, worst remaining class** -- otherwise the most severe class among the confident B-scans:
   a non-urgent abnormal class (DRUSEN) before NORMAL.

A B-scan is *confident* when it is not flagged and the probability of its most probable class is at
least ``--min-confidence`` (default 0.5: that class is more probable than all others together).
B-scans below it (``unsure``) are counted but do not choose the class; a volume with no confident
B-scan is referred.

Why this order.  A volume is as sick as its sickest B-scan: a lesion (a CNV membrane, a focus of
macular oedema) often shows on a few of the 49 B-scans only, so an average or a majority vote would
dilute it into NORMAL.  An urgent finding on a B-scan the model is sure of and the detector trusts
leads to an urgent referral, where a specialist reads the whole volume, flagged B-scans included;
turning it into ``refer`` (read by a human, perhaps not soon) would delay it, so urgent comes first.
A flagged or unreadable B-scan may hide anything, urgent disease included, so it outranks the
non-urgent classes: the volume is referred rather than called DRUSEN or NORMAL.  The confidence
threshold keeps a single uncertain B-scan from deciding a whole volume; counting frames
(``refer_frames``, ``error_frames``, ``confident_frames``, ``frame_classes``) keeps what was overruled
visible.  The price of "any confident urgent B-scan" is specificity: with 49 B-scans per eye, a
per-B-scan false-urgent rate f gives up to 1 - (1 - f)**49 false-urgent volumes; raise
``--min-confidence`` to trade sensitivity for specificity.

Rows.  With DICOM inputs the output gains the columns ``DICOM_COLUMNS``: ``level`` (``image``,
``frame`` or ``volume``), ``frame`` (1-based, frame rows), ``frames``, the counts above, ``reason``
(why the volume got its verdict), ``sop_instance_uid`` and ``laterality`` (to trace a row to its
object and eye); with ``--keep-identifiers`` also ``IDENTIFIER_COLUMNS``.  Per-B-scan rows are written
(before their volume row) only with ``--per-frame``.  For a volume row, ``confidence`` is the highest
confidence among the confident B-scans of its class and ``anomaly_score`` the highest score of any
decoded B-scan.  With a bundle's referral threshold, a volume's ``p_disease`` is the highest of its
decoded B-scans (flagged ones included: the detector's verdict is reported separately), so the volume
screens positive when any B-scan does; per-volume sensitivity is then at least the per-B-scan one the
threshold was chosen for, and specificity lower.

No TensorFlow here: numpy, the standard library and ``medrobust_screen.dicom``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from medrobust_screen.classes import URGENT_CLASSES
from medrobust_screen.images import ImageError
from medrobust_screen.referral import disease_screen

from medrobust_screen import dicom

LEVEL_IMAGE, LEVEL_FRAME, LEVEL_VOLUME = "image", "frame", "volume"
DICOM_COLUMNS = ("level", "frame", "frames", "refer_frames", "error_frames", "confident_frames",
                 "frame_classes", "reason", "sop_instance_uid", "laterality")
IDENTIFIER_COLUMNS = tuple(dicom.IDENTIFIER_FIELDS)
DEFAULT_MIN_CONFIDENCE = 0.5
NORMAL = "NORMAL"

VOLUME_RULE = ("worst-class rule over the B-scans of a volume: error if no B-scan could be decoded; else the "
               "urgent class (CNV, DME) of any confident B-scan; else refer if any B-scan is flagged by the "
               "detector, could not be decoded, or none is confident; else the most severe class among the "
               "confident B-scans (DRUSEN before NORMAL). confident = not flagged and top probability >= "
               "min_confidence")


@dataclass(frozen=True)
class VolumeOptions:
    """How DICOM volumes are reported: per-frame rows, the confidence threshold, identifiers."""

    per_frame: bool = False
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    keep_identifiers: bool = False

    def __post_init__(self):
        c = self.min_confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1.0:
            raise ValueError(f"--min-confidence must be in [0, 1], got {c!r}")

    def columns(self) -> tuple[str, ...]:
        return DICOM_COLUMNS + (IDENTIFIER_COLUMNS if self.keep_identifiers else ())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The DICOM options of medrobust-screen."""
    group = parser.add_argument_group("DICOM OCT volumes (.dcm files, or files starting with a DICOM preamble)")
    group.add_argument("--per-frame", action="store_true",
                       help="also write one row per B-scan (level=frame) before each volume's row")
    group.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE, metavar="P",
                       help="a B-scan counts for its volume's class only if not flagged and its top class "
                            f"probability is >= P (default {DEFAULT_MIN_CONFIDENCE}); a volume with no such "
                            "B-scan is referred")
    group.add_argument("--keep-identifiers", action="store_true",
                       help="write patient name, ID, birth date and study date (default: left out; the SOP "
                            "Instance UID and laterality are always written)")


def options_from_args(args: argparse.Namespace) -> VolumeOptions:
    """VolumeOptions from parsed arguments; ValueError for an out-of-range --min-confidence."""
    return VolumeOptions(per_frame=args.per_frame, min_confidence=args.min_confidence,
                         keep_identifiers=args.keep_identifiers)


def severity_order(classes: Sequence[str]) -> tuple[str, ...]:
    """Classes from most to least severe: urgent ones, other abnormal ones, NORMAL."""
    urgent = [c for c in URGENT_CLASSES if c in classes]
    rest = [c for c in classes if c not in urgent and c != NORMAL]
    return tuple(urgent + rest + ([NORMAL] if NORMAL in classes else []))


class VolumeTally:
    """Running counts over one volume's B-scan rows (bounded memory); ``verdict()`` applies the rule."""

    def __init__(self, classes: Sequence[str], min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                 referral_threshold: float | None = None):
        self.classes = tuple(classes)
        self.min_confidence = float(min_confidence)
        self.referral_threshold = referral_threshold
        self.max_p_disease: float | None = None
        self.frames = self.refer = self.errors = self.unsure = 0
        self.confident = {c: 0 for c in self.classes}
        self.best = {c: 0.0 for c in self.classes}
        self.max_score: float | None = None
        self.first_error = ""

    def add(self, row: dict, frame: int | None = None) -> None:
        """Count one B-scan row (verdict classify/refer/error, class, confidence, anomaly_score, error)."""
        self.frames += 1
        verdict = row["verdict"]
        if verdict == "error":
            self.errors += 1
            if not self.first_error:
                self.first_error = row.get("error", "")
            return
        score = float(row["anomaly_score"])
        self.max_score = score if self.max_score is None else max(self.max_score, score)
        if row.get("p_disease", "") != "":
            p = float(row["p_disease"])
            self.max_p_disease = p if self.max_p_disease is None else max(self.max_p_disease, p)
        if verdict == "refer":
            self.refer += 1
        elif float(row["confidence"]) >= self.min_confidence:
            cls = row["class"]
            self.confident[cls] += 1
            self.best[cls] = max(self.best[cls], float(row["confidence"]))
        else:
            self.unsure += 1

    def verdict(self) -> dict:
        """The volume's verdict, class, confidence, anomaly_score, reason and frame counts (with a referral
        threshold also p_disease, the highest of its decoded B-scans, and disease_screen at it)."""
        out = self._verdict()
        if self.referral_threshold is not None:
            out.update({"p_disease": "", "disease_screen": ""} if self.max_p_disease is None
                       else disease_screen(self.max_p_disease, self.referral_threshold))
        return out

    def _verdict(self) -> dict:
        n_confident = sum(self.confident.values())
        out = {"verdict": "classify", "class": "", "confidence": "",
               "anomaly_score": "" if self.max_score is None else float(f"{self.max_score:.7g}"),
               "error": "", "frames": self.frames, "refer_frames": self.refer, "error_frames": self.errors,
               "confident_frames": n_confident,
               "frame_classes": " ".join(f"{c}:{n}" for c, n in self.confident.items() if n)}
        if self.errors:
            out["error"] = (f"{self.errors} of {self.frames} B-scans unreadable"
                            + (f"; first: {self.first_error}" if self.first_error else ""))
        if self.errors == self.frames:
            return {**out, "verdict": "error", "anomaly_score": "",
                    "reason": "no B-scan could be decoded"}
        order = severity_order(self.classes)
        urgent = [c for c in order if c in URGENT_CLASSES and self.confident.get(c)]
        if urgent:
            cls = max(urgent, key=lambda c: (self.confident[c], self.best[c], -order.index(c)))
            return {**out, "class": cls, "confidence": float(f"{self.best[cls]:.6f}"),
                    "reason": f"urgent class {cls} in {self.confident[cls]} confident B-scan"
                              f"{'s' if self.confident[cls] != 1 else ''}"
                              + (f" ({self.refer} flagged, {self.errors} unreadable)"
                                 if self.refer or self.errors else "")}
        if self.refer or self.errors or not n_confident:
            why = []
            if self.refer:
                why.append(f"{self.refer} of {self.frames} B-scans flagged by the detector")
            if self.errors:
                why.append(f"{self.errors} of {self.frames} B-scans unreadable")
            if not n_confident:
                why.append(f"no B-scan confident (top probability >= {self.min_confidence:g}, not flagged)")
            return {**out, "verdict": "refer", "reason": "; ".join(why)}
        cls = next(c for c in order if self.confident.get(c))
        return {**out, "class": cls, "confidence": float(f"{self.best[cls]:.6f}"),
                "reason": f"most severe class among {n_confident} confident B-scans"
                          + (f" ({self.unsure} unsure)" if self.unsure else "")}


def frame_row(path: str, probs: np.ndarray, score: float, flag: bool, classes: Sequence[str]) -> dict:
    """A B-scan's row, formatted like medrobust-screen's image rows."""
    k = int(np.argmax(probs))
    return {"file": path, "verdict": "refer" if flag else "classify", "class": classes[k],
            "confidence": float(f"{probs[k]:.6f}"), "anomaly_score": float(f"{score:.7g}"), "error": ""}


def frame_error_row(path: str, reason: str) -> dict:
    return {"file": path, "verdict": "error", "class": "", "confidence": "", "anomaly_score": "",
            "error": " ".join(str(reason).split())}


def screen_volume(screener, path: str, options: VolumeOptions = VolumeOptions()) -> Iterator[dict]:
    """Rows for one DICOM file: its B-scan rows (with ``options.per_frame``), then its volume row.

    ``screener`` is an ``medrobust_screen.screener.Screener`` (``predict``, ``classes``, ``image_size``).  A file
    that cannot be screened at all gives a single volume row with verdict ``error``.
    """
    try:
        volume = dicom.open_volume(path, keep_identifiers=options.keep_identifiers)
    except ImageError as exc:
        yield {**frame_error_row(path, exc.reason), **screener.referral_fields(None), "level": LEVEL_VOLUME,
               "reason": "file not screened"}
        return
    trace = {"sop_instance_uid": volume.sop_instance_uid, "laterality": volume.laterality, **volume.identifiers}
    tally = VolumeTally(screener.classes, options.min_confidence, screener.referral_threshold)
    for number, x in volume.iter_frames(screener.image_size):
        if isinstance(x, ImageError):
            row = {**frame_error_row(path, x.reason), **screener.referral_fields(None)}
        else:
            probs, score, flag = screener.predict(x)
            row = {**frame_row(path, probs, score, flag, screener.classes), **screener.referral_fields(probs)}
        tally.add(row)
        if options.per_frame:
            yield {**row, "level": LEVEL_FRAME, "frame": number, "frames": volume.frames, **trace}
    yield {"file": path, "level": LEVEL_VOLUME, **tally.verdict(), **trace}
