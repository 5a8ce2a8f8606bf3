"""One verdict per OCT volume (per eye) from the verdicts of its B-scans, for medrobust-screen.

A DICOM OCT file (see ``medrobust_screen.dicom``) holds one volume: the B-scans of one eye -- or, when a
device exports one file per B-scan, a *series* of files does (``SERIES_RULE``).  Each B-scan is
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

Series.  ``plan_series`` reads the header of every DICOM file (pixel data deferred, never decoded; one
small ``FileHeader`` kept per file) and groups the files of one series: same SeriesInstanceUID, or without
one the same StudyInstanceUID and laterality.  A group becomes one volume (``Series``; ``screen_series``
decodes one frame at a time) when all its files are single-frame, agree on laterality and rows x columns,
and have distinct SOP Instance UIDs; frames are numbered in InstanceNumber order, then file path (files
without InstanceNumber after the others).  Otherwise no file of the group is merged: each is screened as
its own volume (``screen_volume``) and its ``reason`` starts with why ("not merged with the N other files
of series ...: laterality differs (L: 1 file, R: 2 files)"), and a file repeating an earlier file's SOP
Instance UID gets an error row naming that file (``duplicate_row``).  Files without series or study tags are
one volume each, as before.

Rows.  With DICOM inputs the output gains the columns ``DICOM_COLUMNS``: ``level`` (``image``,
``frame`` or ``volume``), ``frame`` (1-based, frame rows; in a series, the position in the series),
``frames``, the counts above, ``driving_frames`` (the frames that decided the verdict: the confident
B-scans of its class for classify, the flagged and unreadable ones for refer -- the unsure ones when there
are none -- the unreadable ones for error; at most ``MAX_LISTED_FRAMES`` numbers, then "+N more"),
``reason`` (why the volume got its verdict), ``sop_instance_uid`` (empty for a series row),
``series_instance_uid``, ``files`` (how many files the volume came from) and ``laterality`` (to trace a row
to its objects and eye); a series row's ``file`` is the common folder of its files, its B-scan rows name
their own file; with ``--keep-identifiers`` also ``IDENTIFIER_COLUMNS`` (a series: its first file's).  Per-B-scan rows are written
(before their volume row) only with ``--per-frame``.  For a volume row, ``confidence`` is the highest
confidence among the confident B-scans of its class and ``anomaly_score`` the highest score of any
decoded B-scan.  With a bundle's referral threshold, a volume's ``p_disease`` is the highest of its
decoded B-scans (flagged ones included: the detector's verdict is reported separately), so the volume
screens positive when any B-scan does; per-volume sensitivity is then at least the per-B-scan one the
threshold was chosen for, and specificity lower.  With a bundle that has part scores, ``top_part`` of a
volume row is that of the B-scan with the highest anomaly score (the one its ``anomaly_score`` comes from).

With ``details`` (``--report``) a volume row also carries ``report.DETAIL_KEY``: the probabilities and a
128 px thumbnail of the B-scan that drove the verdict (``Evidence``; ``report.THUMBNAIL_RULE``), and its
detector part scores when the bundle has them.

No TensorFlow here: numpy, the standard library, ``medrobust_screen.dicom`` and ``medrobust_screen.report``.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from medrobust_screen.classes import URGENT_CLASSES
from medrobust_screen.images import ImageError
from medrobust_screen.referral import disease_screen

from medrobust_screen import dicom, report

LEVEL_IMAGE, LEVEL_FRAME, LEVEL_VOLUME = "image", "frame", "volume"
DICOM_COLUMNS = ("level", "frame", "frames", "refer_frames", "error_frames", "confident_frames",
                 "frame_classes", "driving_frames", "reason", "sop_instance_uid", "series_instance_uid", "files",
                 "laterality")
#: driving_frames lists at most this many frame numbers, then "+N more".
MAX_LISTED_FRAMES = 20
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


class FrameList:
    """Frame numbers added in ascending order: the first MAX_LISTED_FRAMES kept, the rest only counted."""

    def __init__(self):
        self.first: list[int] = []
        self.count = 0

    def add(self, frame: int) -> None:
        self.count += 1
        if len(self.first) < MAX_LISTED_FRAMES:
            self.first.append(frame)

    @classmethod
    def merge(cls, lists: Sequence["FrameList"]) -> "FrameList":
        out = cls()
        out.first = sorted(n for fl in lists for n in fl.first)[:MAX_LISTED_FRAMES]
        out.count = sum(fl.count for fl in lists)
        return out

    def text(self) -> str:
        """'3 7 12' or, past MAX_LISTED_FRAMES, '1 2 ... 20 +N more' ('' for none)."""
        more = self.count - len(self.first)
        return " ".join(map(str, self.first)) + (f" +{more} more" if more > 0 else "")


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
        self.top_part: str | None = None  # top_part of the highest-scoring B-scan (None: rows without top_part)
        self.first_error = ""
        self.numbers: dict[str, FrameList] = {}  # "refer", "error", "unsure" or a class -> its frame numbers

    def add(self, row: dict, frame: int | None = None) -> None:
        """Count one B-scan row (verdict classify/refer/error, class, confidence, anomaly_score, error);
        ``frame`` is its 1-based frame number in the volume (default: the count of rows added so far)."""
        self.frames += 1
        frame = self.frames if frame is None else int(frame)
        if "top_part" in row and self.top_part is None:
            self.top_part = ""  # a bundle with part scores: the volume row gets top_part too
        verdict = row["verdict"]
        if verdict == "error":
            self.errors += 1
            self._number("error", frame)
            if not self.first_error:
                self.first_error = row.get("error", "")
            return
        score = float(row["anomaly_score"])
        if "top_part" in row and (self.max_score is None or score > self.max_score):  # the top B-scan's
            self.top_part = row["top_part"]
        self.max_score = score if self.max_score is None else max(self.max_score, score)
        if row.get("p_disease", "") != "":
            p = float(row["p_disease"])
            self.max_p_disease = p if self.max_p_disease is None else max(self.max_p_disease, p)
        if verdict == "refer":
            self.refer += 1
            self._number("refer", frame)
        elif float(row["confidence"]) >= self.min_confidence:
            cls = row["class"]
            self.confident[cls] += 1
            self.best[cls] = max(self.best[cls], float(row["confidence"]))
            self._number(cls, frame)
        else:
            self.unsure += 1
            self._number("unsure", frame)

    def _number(self, key: str, frame: int) -> None:
        self.numbers.setdefault(key, FrameList()).add(frame)

    def driving(self, verdict: dict) -> str:
        """The frames that drove ``verdict`` (a ``verdict()`` result): the confident B-scans of its class for
        classify; the flagged and unreadable ones for refer (the unsure ones when there are none); the
        unreadable ones for error. Numbers ascending, at most MAX_LISTED_FRAMES, then "+N more"."""
        if verdict["verdict"] == "classify":
            keys = [verdict["class"]]
        elif verdict["verdict"] == "refer":
            keys = ["refer", "error"] if (self.refer or self.errors) else ["unsure"]
        else:
            keys = ["error"]
        return FrameList.merge([self.numbers[k] for k in keys if k in self.numbers]).text()

    def verdict(self) -> dict:
        """The volume's verdict, class, confidence, anomaly_score, reason and frame counts (with a referral
        threshold also p_disease, the highest of its decoded B-scans, and disease_screen at it; with B-scan
        rows that carry top_part, the top_part of the highest-scoring one)."""
        out = self._verdict()
        out["driving_frames"] = self.driving(out)
        if self.referral_threshold is not None:
            out.update({"p_disease": "", "disease_screen": ""} if self.max_p_disease is None
                       else disease_screen(self.max_p_disease, self.referral_threshold))
        if self.top_part is not None:
            out["top_part"] = self.top_part if out["verdict"] != "error" else ""
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


# ------------------------------------------------------------------------------------ series grouping

SERIES_RULE = ("DICOM files of one series (SeriesInstanceUID; without one, StudyInstanceUID + laterality) form one "
               "volume when they are all single-frame, agree on laterality and on rows x columns, and have distinct "
               "SOP Instance UIDs; its frames are ordered by InstanceNumber, then file path (files without "
               "InstanceNumber after the others). Otherwise each file is screened as its own volume and the row's "
               "reason says why it was not merged; a file repeating another's SOP Instance UID gets an error row")


@dataclass(frozen=True)
class FileHeader:
    """What grouping needs from one DICOM file's header (read without its pixel data)."""

    path: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    laterality: str
    instance_number: int | None
    frames: int
    rows: int
    columns: int


@dataclass(frozen=True)
class Series:
    """Single-frame DICOM files of one series (one eye) screened as one volume; ``paths`` in frame order."""

    series_instance_uid: str  # "" when grouped by StudyInstanceUID + laterality
    laterality: str
    paths: tuple[str, ...]
    label: str  # the row's ``file``: the common folder of the files
    note: str = ""  # said in the volume row's reason (how it was grouped or ordered, when notable)


@dataclass(frozen=True)
class Placement:
    """How one DICOM file is screened: in ``series``, or alone (``note``: why it was not merged), or not at
    all when it repeats the SOP Instance UID of ``duplicate_of``."""

    series: Series | None = None
    note: str = ""
    duplicate_of: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    laterality: str = ""


def read_header(path: str) -> FileHeader | None:
    """The grouping tags of a DICOM file (header only: pixel data is deferred, never decoded); None when the
    file cannot be opened as a screenable OCT object (it is then screened alone and gets its error row)."""
    try:
        v = dicom.open_volume(path)
    except ImageError:
        return None
    return FileHeader(path=path, sop_instance_uid=v.sop_instance_uid, series_instance_uid=v.series_instance_uid,
                      study_instance_uid=v.study_instance_uid, laterality=v.laterality,
                      instance_number=v.instance_number, frames=v.frames, rows=v.rows, columns=v.columns)


def plan_series(paths: Sequence[str]) -> dict[str, Placement]:
    """path -> Placement for DICOM files (SERIES_RULE). Reads each header once (no pixels); keeps one small
    FileHeader per file. Files with no series or study tag are left out (screened alone, as before)."""
    headers: list[FileHeader] = []
    seen: set[str] = set()
    for path in paths:
        if path not in seen:
            seen.add(path)
            header = read_header(path)
            if header is not None:
                headers.append(header)
    groups: dict[tuple, list[FileHeader]] = {}
    loose: dict[str, list[FileHeader]] = {}
    for h in headers:
        if h.series_instance_uid:
            groups.setdefault(("series", h.series_instance_uid), []).append(h)
        elif h.study_instance_uid and h.laterality:
            groups.setdefault(("study", h.study_instance_uid, h.laterality), []).append(h)
        elif h.study_instance_uid:
            loose.setdefault(h.study_instance_uid, []).append(h)
    plan: dict[str, Placement] = {}
    for study, members in loose.items():
        if len(members) > 1:
            for h in members:
                plan[h.path] = Placement(note=f"not merged: no Series Instance UID and no laterality (one of "
                                              f"{len(members)} such files of study {study})",
                                         sop_instance_uid=h.sop_instance_uid)
    for key, members in groups.items():
        uid = key[1] if key[0] == "series" else ""
        trace = lambda h: {"sop_instance_uid": h.sop_instance_uid, "series_instance_uid": uid,  # noqa: E731
                           "laterality": h.laterality}
        if len(members) == 1:
            plan[members[0].path] = Placement(**trace(members[0]))
            continue
        name = f"series {uid}" if uid else f"study {key[1]} eye {key[2]} (no Series Instance UID)"
        problems = _conflicts(members)
        if problems:
            why = f"not merged with the {len(members) - 1} other files of {name}: {'; '.join(problems)}"
            first: dict[str, str] = {}
            for h in members:
                original = first.setdefault(h.sop_instance_uid, h.path) if h.sop_instance_uid else h.path
                plan[h.path] = Placement(note=why, duplicate_of="" if original == h.path else original, **trace(h))
            continue
        ordered = sorted(members, key=lambda h: (h.instance_number is None, h.instance_number or 0, h.path))
        notes = [] if uid else [f"files grouped by StudyInstanceUID {key[1]} + laterality {key[2]} (no "
                                "SeriesInstanceUID)"]
        missing = sum(h.instance_number is None for h in members)
        numbers = [h.instance_number for h in members if h.instance_number is not None]
        if missing:
            notes.append(f"{missing} of {len(members)} files have no InstanceNumber: placed last, by file path")
        if len(set(numbers)) < len(numbers):
            notes.append("repeated InstanceNumber: those files ordered by file path")
        series = Series(series_instance_uid=uid, laterality=members[0].laterality,
                        paths=tuple(h.path for h in ordered), label=_common_folder([h.path for h in members]),
                        note="; ".join(notes))
        for h in members:
            plan[h.path] = Placement(series=series, **trace(h))
    return plan


def _conflicts(members: Sequence[FileHeader]) -> list[str]:
    """Why the files of one series cannot be one volume ([] when they can)."""
    out = []
    counted = lambda c: ", ".join(f"{k}: {n} file{'s' if n != 1 else ''}" for k, n in sorted(c.items()))  # noqa: E731
    lateralities = Counter(h.laterality or "missing" for h in members)
    if len(lateralities) > 1:
        out.append(f"laterality differs ({counted(lateralities)})")
    multi = [h for h in members if h.frames != 1]
    if multi:
        out.append(f"{len(multi)} multi-frame file{'s' if len(multi) != 1 else ''} among {len(members)} (e.g. "
                   f"{os.path.basename(multi[0].path)}: {multi[0].frames} frames); only single-frame files are merged")
    sizes = Counter(f"{h.columns}x{h.rows}" for h in members)
    if len(sizes) > 1:
        out.append(f"B-scan sizes differ ({counted(sizes)})")
    sops = Counter(h.sop_instance_uid for h in members if h.sop_instance_uid)
    repeated = sum(n for n in sops.values() if n > 1)
    if repeated:
        out.append(f"SOP Instance UID repeated ({repeated} files share {sum(n > 1 for n in sops.values())} UID)")
    no_sop = sum(not h.sop_instance_uid for h in members)
    if no_sop:
        out.append(f"{no_sop} file{'s' if no_sop != 1 else ''} without SOP Instance UID")
    return out


def _common_folder(paths: Sequence[str]) -> str:
    folders = [os.path.dirname(p) for p in paths]
    try:
        common = os.path.commonpath(folders)
    except ValueError:  # absolute and relative paths mixed
        common = os.path.commonpath([os.path.abspath(f) for f in folders])
    return common or "."


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# ------------------------------------------------------------------------------- report evidence

class Evidence:
    """For the HTML report: the B-scan to show for a volume (``report.THUMBNAIL_RULE``), with its
    probabilities and a small thumbnail. Keeps at most one candidate per class and the highest-anomaly
    one (len(classes) + 1 thumbnails of THUMBNAIL_SIZE px): bounded memory."""

    def __init__(self, min_confidence: float):
        self.min_confidence = float(min_confidence)
        self.best: dict[str, tuple] = {}  # class -> (confidence, frame, path, probabilities, png, part scores)
        self.top: tuple | None = None  # (anomaly score, frame, path, probabilities, png, part scores)

    def consider(self, frame: int, path: str, row: dict, probs: np.ndarray | None, grey: np.ndarray | None,
                 parts: np.ndarray | None = None) -> None:
        if row["verdict"] == "error" or probs is None or grey is None:
            return
        score = float(row["anomaly_score"])
        p = [float(v) for v in probs]
        z = None if parts is None else [float(v) for v in parts]
        if self.top is None or score > self.top[0]:
            self.top = (score, frame, path, p, report.thumbnail_png(grey), z)
        if row["verdict"] == "classify" and float(row["confidence"]) >= self.min_confidence:
            cls, c = row["class"], float(row["confidence"])
            if cls not in self.best or c > self.best[cls][0]:
                self.best[cls] = (c, frame, path, p, report.thumbnail_png(grey), z)

    def detail(self, verdict: dict, series: bool) -> dict:
        """{probabilities, thumbnail, thumbnail_note} (and part_scores when the B-scans had them) for the
        volume's verdict (a VolumeTally.verdict())."""
        where = lambda frame, path: f"frame {frame}" + (f" ({os.path.basename(path)})" if series else "")  # noqa: E731
        if verdict["verdict"] == "classify" and verdict["class"] in self.best:
            c, frame, path, probs, png, z = self.best[verdict["class"]]
            note = f"{where(frame, path)}: the most confident {verdict['class']} B-scan ({c:.3f})"
        elif verdict["verdict"] == "refer" and self.top is not None:
            score, frame, path, probs, png, z = self.top
            note = f"{where(frame, path)}: the highest anomaly score ({score:.4g})"
        else:
            return {"probabilities": None, "thumbnail": None, "thumbnail_note": "no B-scan could be decoded"}
        return {"probabilities": probs, "thumbnail": png, "thumbnail_note": note,
                **({"part_scores": z} if z is not None else {})}


# ------------------------------------------------------------------------------------------ screening

def _part_fields(screener, parts) -> dict:
    """screener.part_fields(parts), or {} for a screener without part scores."""
    fields = getattr(screener, "part_fields", None)
    return fields(parts) if fields is not None else {}


def _frames(screener, volume: dicom.DicomVolume, details: bool):
    """(frame number in the file, B-scan row, probabilities or None, display grey or None, part scores or
    None), one at a time."""
    predict_parts = getattr(screener, "predict_parts", None)
    for number, x, grey in volume.iter_frames_with_display(screener.image_size):
        if isinstance(x, ImageError):
            yield (number, {**frame_error_row(volume.path, x.reason), **screener.referral_fields(None),
                            **_part_fields(screener, None)}, None, None, None)
        else:
            probs, score, flag, parts = predict_parts(x) if predict_parts else (*screener.predict(x), None)
            row = {**frame_row(volume.path, probs, score, flag, screener.classes), **screener.referral_fields(probs),
                   **_part_fields(screener, parts)}
            yield number, row, probs, (grey if details else None), parts


def screen_volume(screener, path: str, options: VolumeOptions = VolumeOptions(), details: bool = False,
                  placement: Placement | None = None) -> Iterator[dict]:
    """Rows for one DICOM file screened as its own volume: its B-scan rows (with ``options.per_frame``),
    then its volume row.

    ``screener`` is an ``medrobust_screen.screener.Screener`` (``predict``, ``classes``, ``image_size``).  A file
    that cannot be screened at all gives a single volume row with verdict ``error``.  ``placement`` (from
    ``plan_series``) adds why the file was not merged with its series to the row's reason.  With ``details``
    the volume row carries ``report.DETAIL_KEY`` (``Evidence.detail``) for the HTML report.
    """
    placement = placement or Placement()
    try:
        volume = dicom.open_volume(path, keep_identifiers=options.keep_identifiers)
    except ImageError as exc:
        yield {**frame_error_row(path, exc.reason), **screener.referral_fields(None),
               **_part_fields(screener, None), "level": LEVEL_VOLUME,
               "reason": _join(placement.note, "file not screened"), "files": 1,
               **({report.DETAIL_KEY: {"thumbnail_note": "file not screened"}} if details else {})}
        return
    trace = {"sop_instance_uid": volume.sop_instance_uid, "series_instance_uid": volume.series_instance_uid,
             "files": 1, "laterality": volume.laterality, **volume.identifiers}
    tally = VolumeTally(screener.classes, options.min_confidence, screener.referral_threshold)
    evidence = Evidence(options.min_confidence) if details else None
    for number, row, probs, grey, parts in _frames(screener, volume, details):
        tally.add(row, number)
        if evidence is not None:
            evidence.consider(number, path, row, probs, grey, parts)
        if options.per_frame:
            yield {**row, "level": LEVEL_FRAME, "frame": number, "frames": volume.frames, **trace}
    verdict = tally.verdict()
    out = {"file": path, "level": LEVEL_VOLUME, **verdict, "reason": _join(placement.note, verdict["reason"]),
           **trace}
    if evidence is not None:
        out[report.DETAIL_KEY] = evidence.detail(verdict, series=False)
    yield out


def screen_series(screener, series: Series, options: VolumeOptions = VolumeOptions(),
                  details: bool = False) -> Iterator[dict]:
    """Rows for the files of one series screened as one volume (one eye): B-scan rows (``options.per_frame``;
    each names its own file, ``frame`` numbers run over the whole series in ``series.paths`` order), then
    the volume row (``file`` = the series' common folder, ``files`` = how many, the worst-class verdict over
    all its B-scans). One frame is decoded at a time. A file that cannot be opened any more counts as an
    unreadable B-scan."""
    uid, n = series.series_instance_uid, len(series.paths)
    tally = VolumeTally(screener.classes, options.min_confidence, screener.referral_threshold)
    evidence = Evidence(options.min_confidence) if details else None
    identifiers: dict = {}
    number = 0
    for path in series.paths:
        try:
            volume = dicom.open_volume(path, keep_identifiers=options.keep_identifiers)
        except ImageError as exc:  # changed or removed since its header was read for grouping
            number += 1
            row = {**frame_error_row(path, exc.reason), **screener.referral_fields(None),
                   **_part_fields(screener, None)}
            tally.add(row, number)
            if options.per_frame:
                yield {**row, "level": LEVEL_FRAME, "frame": number, "frames": n, "sop_instance_uid": "",
                       "series_instance_uid": uid, "files": 1, "laterality": series.laterality}
            continue
        identifiers = identifiers or volume.identifiers
        trace = {"sop_instance_uid": volume.sop_instance_uid, "series_instance_uid": uid, "files": 1,
                 "laterality": volume.laterality, **volume.identifiers}
        for _, row, probs, grey, parts in _frames(screener, volume, details):
            number += 1
            tally.add(row, number)
            if evidence is not None:
                evidence.consider(number, path, row, probs, grey, parts)
            if options.per_frame:
                yield {**row, "level": LEVEL_FRAME, "frame": number, "frames": n, **trace}
    verdict = tally.verdict()
    out = {"file": series.label, "level": LEVEL_VOLUME, **verdict, "reason": _join(verdict["reason"], series.note),
           "sop_instance_uid": "", "series_instance_uid": uid, "files": n, "laterality": series.laterality,
           **{k: identifiers.get(k, "") for k in (IDENTIFIER_COLUMNS if options.keep_identifiers else ())}}
    if evidence is not None:
        out[report.DETAIL_KEY] = evidence.detail(verdict, series=True)
    yield out


def duplicate_row(screener, path: str, placement: Placement) -> dict:
    """The error row of a file that repeats the SOP Instance UID of ``placement.duplicate_of`` (not screened)."""
    return {**frame_error_row(path, f"duplicate SOP Instance UID {placement.sop_instance_uid}: the same SOP "
                                    f"instance as {placement.duplicate_of}; not screened"),
            **screener.referral_fields(None), **_part_fields(screener, None), "level": LEVEL_VOLUME,
            "reason": placement.note,
            "sop_instance_uid": placement.sop_instance_uid, "series_instance_uid": placement.series_instance_uid,
            "files": 1, "laterality": placement.laterality}
