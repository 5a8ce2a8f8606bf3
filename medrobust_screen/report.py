"""A self-contained HTML report of a medrobust-screen run (``--report report.html``).

One HTML file that needs nothing else: inline CSS, thumbnails as base64 PNG ``data:`` URIs, no scripts,
no fonts, no external reference (a Content-Security-Policy ``default-src 'none'`` makes a browser refuse
any network access the page might attempt). Standard library, numpy and Pillow only -- no TensorFlow.

Content
    The header: which bundle, its signature status, the training-data provenance (a SYNTHETIC banner
    when the model was trained on synthetic data), the date, the thresholds and the run's counts.
    Then one entry per 2-D image and per DICOM volume (one eye; per-B-scan rows are not repeated here),
    in four sections, in this order:

    1. *Referred by the detector* (verdict ``refer``: a human reads the scan),
    2. *Disease* (verdict ``classify`` with a class other than NORMAL, or ``disease_screen`` positive),
    3. *Errors* (not screened; with their reason),
    4. *No disease found* (the rest).

    Within a section, entries keep the run's order. Each entry shows the verdict, the probabilities of
    all classes, the anomaly score against the detector's threshold, the referral result (``p_disease``,
    ``disease_screen``) when the bundle has a referral point, the frame counts and driving frames of a
    volume, and a thumbnail (``THUMBNAIL_SIZE`` px): the image itself, or for a volume the B-scan that
    drove its verdict (``THUMBNAIL_RULE``), whose probabilities are the ones shown.

    Which detector part scored high: a bundle whose screening model has the ``part_scores`` output (each
    detector part's standardised score z, 0 = a typical clean scan; the manifest's ``detector.parts`` names
    them) shows, per entry, a bar list of the part scores (for a volume: of the B-scan shown) and names the
    top part (the row's ``top_part``). An older bundle outputs only the combined anomaly score (outputs
    ``probabilities``, ``anomaly_score``, ``flag``, ``threshold``), and the report says so instead.

Privacy
    Patient name, ID, birth date and study date appear only when the rows carry them (``--keep-identifiers``);
    SOP/Series Instance UIDs and laterality always do. Every string that comes from an input (file names,
    DICOM values, error messages) is HTML-escaped.

Memory
    Entries are written as HTML fragments to one anonymous temporary file per section as rows arrive; only
    small thumbnails are ever made (never a full image kept). ``close`` writes the report beside its final
    name and renames it into place (the same atomic write as ``--out``).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from medrobust_screen.errors import UsageError
from medrobust_screen.tempfiles import mkstemp_beside

THUMBNAIL_SIZE = 128
#: The key under which Screener.screen(details=True) attaches a row's report details (popped before output).
DETAIL_KEY = "_detail"
THUMBNAIL_RULE = ("for a volume: verdict classify -> the most confident B-scan of the chosen class (the first "
                  "one on a tie); refer -> the decoded B-scan with the highest anomaly score; error -> none")
NO_PART_SCORES = ("this bundle's screening model outputs only the combined anomaly score (outputs: {outputs}); "
                  "which detector part scored high is not available on the device")
PART_SCORES_NOTE = ("per entry, the score of each detector part is shown as z (its standardised score: 0 = a "
                    "typical clean scan, higher = more unusual; for a volume, the parts of the B-scan shown), and "
                    "the top part, the part with the highest z, is named; the parts: ")
TOP_CLASS = ' class="top"'
PART_BAR_FULL = 4.0  # a part score bar is full at z = 4 (or at the entry's highest z, when larger)
SECTIONS = (("refer", "Referred by the detector (a human reads these)"),
            ("disease", "Disease"),
            ("error", "Errors (not screened)"),
            ("rest", "No disease found"))
_IDENTIFIERS = ("patient_name", "patient_id", "patient_birth_date", "study_date")


# ------------------------------------------------------------------------------------------ thumbnails

def thumbnail_png(grey: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """uint8 grey ``[h, w]`` (or RGB ``[h, w, 3]``) -> PNG bytes of a thumbnail whose long side is at most
    ``size`` px (aspect kept). ValueError for another shape or dtype."""
    arr = np.asarray(grey)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected uint8 [h, w] or [h, w, 3], got {arr.dtype} {arr.shape}")
    return _png(Image.fromarray(arr), size)


def thumbnail_of_file(path, size: int = THUMBNAIL_SIZE) -> bytes | None:
    """PNG bytes of a thumbnail of an image file (EXIF orientation applied, grey), or None when the file
    cannot be decoded (the row then has no thumbnail; its verdict comes from the screening, not from here)."""
    try:
        with Image.open(os.fspath(path)) as img:
            img.draft("L", (size * 2, size * 2))  # JPEG: decode at a reduced scale (bounded memory)
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                img = Image.fromarray((np.clip(np.asarray(img, np.float64), 0, 65535) / 257).astype(np.uint8))
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() else img.convert("L")
            return _png(img, size)
    except Exception:  # noqa: BLE001 - a thumbnail is optional; the row says why the image failed
        return None


def _png(img: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.BOX)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ the report

def check_report_path(path: str | None, out: str | None = None) -> None:
    """UsageError (one line) for a --report path that is a folder, whose folder does not exist, or that is
    the --out file; None is fine (no report)."""
    if path is None:
        return
    if not path:
        raise UsageError("--report: empty path")
    if os.path.isdir(path):
        raise UsageError(f"--report: {path} is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--report: folder {folder} does not exist")
    if out and os.path.abspath(out) == os.path.abspath(path):
        raise UsageError(f"--report and --out are the same file ({path})")


def section_of(row: dict) -> str:
    """The report section of a result row: 'refer', 'disease', 'error' or 'rest' (module docstring)."""
    if row.get("verdict") == "error":
        return "error"
    if row.get("verdict") == "refer":
        return "refer"
    if row.get("class") not in ("", None, "NORMAL") or row.get("disease_screen") == "positive":
        return "disease"
    return "rest"


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _part_list(parts) -> str:
    return "; ".join(f"<b>{_e(p['name'])}</b>: {_e(p.get('description'))}" for p in parts)


def _fmt(value, digits: int = 4) -> str:
    if value in ("", None):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


class HtmlReport:
    """The report of one run: ``add`` each result row as it comes, then ``close(summary)`` (or ``abort``).

    report = HtmlReport("report.html", run)     # run: bundle, signature, training_data, classes, threshold,
    report.add(row, detail)                     #      referral, model_outputs, keep_identifiers, ...
    report.close(summary)

    ``row`` is a result row (dict of the CSV columns); ``detail`` is None or ``{"probabilities": [float] *
    n_classes | None, "thumbnail": PNG bytes | None, "thumbnail_note": str}`` (plus ``"part_scores": [float]
    * n_parts`` when ``run["parts"]``, the manifest's detector.parts, is set). Rows with level ``frame`` are
    skipped. Raises UsageError from the constructor for a bad path (``check_report_path``); OSError from
    ``close`` if the file cannot be written (the temporary file is then removed).
    """

    def __init__(self, path: str, run: dict):
        check_report_path(path)
        self.path = os.fspath(path)
        self.run = run
        self.classes: Sequence[str] = tuple(run["classes"])
        self.parts: Sequence[dict] = tuple(run.get("parts") or ())
        self.counts = {key: 0 for key, _ in SECTIONS}
        self._spools = {key: tempfile.TemporaryFile("w+", encoding="utf-8") for key, _ in SECTIONS}
        self._n = 0

    def add(self, row: dict, detail: dict | None = None) -> None:
        if row.get("level") == "frame":
            return
        key = section_of(row)
        self.counts[key] += 1
        self._n += 1
        self._spools[key].write(self._entry(row, detail or {}, key))

    def abort(self) -> None:
        for spool in self._spools.values():
            spool.close()

    def close(self, summary: dict) -> None:
        fd, tmp = mkstemp_beside(self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._head(summary))
                for key, title in SECTIONS:
                    f.write(f'<h2 id="{key}">{_e(title)} <span class="n">({self.counts[key]})</span></h2>\n')
                    if not self.counts[key]:
                        f.write('<p class="none">none</p>\n')
                        continue
                    spool = self._spools[key]
                    spool.seek(0)
                    shutil.copyfileobj(spool, f)
                f.write(_TAIL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        finally:
            self.abort()

    # ------------------------------------------------------------------ pieces

    def _head(self, summary: dict) -> str:
        run = self.run
        provenance = run["training_data"]
        signature = run["signature"]
        verified = signature.get("status") == "verified"
        banner = ""
        if provenance.get("synthetic") is not False:
            banner = f'<div class="banner">Model trained on {_e(provenance.get("label"))}</div>\n'
        sig = (f'<span class="ok">verified</span> (key {_e(signature.get("key_fingerprint"))})' if verified else
               f'<span class="bad">NOT VERIFIED</span> ({_e(signature.get("reason", "--allow-unsigned"))}): '
               "nothing shows who made this bundle")
        referral = run.get("referral")
        facts = [
            ("bundle", _e(run["bundle"])),
            ("bundle signature", sig),
            ("training data", _e(provenance.get("label"))),
            ("date", _e(run.get("date") or datetime.datetime.now(datetime.timezone.utc)
                        .isoformat(timespec="seconds"))),
            ("classes", _e(", ".join(self.classes))),
            ("detector", f"refer when anomaly score &gt; threshold {_fmt(run['threshold'], 6)}; "
                         + (_e(PART_SCORES_NOTE) + _part_list(self.parts) if self.parts else
                            _e(NO_PART_SCORES.format(outputs=", ".join(run.get("model_outputs", ())) or "?")))),
            ("referral", (f"p_disease = 1 &minus; P(NORMAL); positive when &ge; {_fmt(referral['threshold'], 6)}"
                          if referral else "this bundle has no referral operating point")),
            ("thumbnails", _e(THUMBNAIL_RULE)),
            ("patient identifiers", "kept (--keep-identifiers)" if run.get("keep_identifiers") else
             "left out (SOP/Series Instance UIDs and laterality are shown)"),
        ]
        if run.get("volume_rule"):  # DICOM inputs
            facts.insert(7, ("volumes", _e(run["volume_rule"]) + (f" (min confidence {_fmt(run['min_confidence'])})"
                                                                  if run.get("min_confidence") is not None else "")))
        counts = " &middot; ".join(f'<a href="#{k}">{_e(t.split(" (")[0])}: {self.counts[k]}</a>'
                                   for k, t in SECTIONS)
        totals = ", ".join(f"{_e(k)} {_e(v)}" for k, v in summary.items())
        rows = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
        return (_HEAD + banner + "<h1>medrobust-screen report</h1>\n"
                f'<p class="counts">{self._n} entries: {counts}</p>\n<p class="totals">run: {totals}</p>\n'
                f'<table class="facts">\n{rows}\n</table>\n')

    def _entry(self, row: dict, detail: dict, key: str) -> str:
        verdict = str(row.get("verdict", ""))
        volume = row.get("level") == "volume"
        title = _e(row.get("file"))
        if row.get("laterality"):
            title += f' <span class="eye">eye {_e(row["laterality"])}</span>'
        facts = []
        if verdict != "error":
            cls = f"<b>{_e(row['class'])}</b>" if row.get("class") else "&ndash;"
            facts.append(("class", cls + (f" (confidence {_fmt(row.get('confidence'))})"
                                          if row.get("confidence") not in ("", None) else "")
                          + (" &mdash; referred: do not trust the class on this scan"
                             if verdict == "refer" and row.get("class") else "")))
        facts.append(("detector", self._detector(row, volume)))
        if self.run.get("referral"):
            screen = row.get("disease_screen") or ""
            facts.append(("referral", f'<span class="{_e(screen)}">{_e(screen or "n/a")}</span>'
                                      f" (p_disease {_fmt(row.get('p_disease'))})"))
        if volume and row.get("frames") not in ("", None):
            facts.append(("B-scans", f"{_e(row.get('frames'))} in {_e(row.get('files') or 1)} file(s): "
                                     f"{_e(row.get('refer_frames'))} flagged, {_e(row.get('error_frames'))} "
                                     f"unreadable, {_e(row.get('confident_frames'))} confident "
                                     f"({_e(row.get('frame_classes') or 'none')})"))
            if row.get("driving_frames"):
                facts.append(("driving frames", _e(row["driving_frames"])))
        if row.get("reason"):
            facts.append(("reason", _e(row["reason"])))
        if row.get("error"):
            facts.append(("error", f'<span class="bad">{_e(row["error"])}</span>'))
        for column, label in (("series_instance_uid", "Series UID"), ("sop_instance_uid", "SOP UID")):
            if row.get(column):
                facts.append((label, f"<code>{_e(row[column])}</code>"))
        for column in _IDENTIFIERS:  # only present with --keep-identifiers
            if row.get(column):
                facts.append((column.replace("_", " "), _e(row[column])))
        table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
        return (f'<div class="entry {key}">\n{self._thumb(detail)}<div class="body">\n'
                f'<h3><span class="badge {_e(verdict)}">{_e(verdict.upper())}</span> {title}</h3>\n'
                f'<table class="kv">{table}</table>\n{self._probabilities(detail, volume)}'
                f'{self._part_scores(detail, volume)}</div>\n</div>\n')

    def _detector(self, row: dict, volume: bool) -> str:
        score = row.get("anomaly_score")
        if score in ("", None):
            return "no score (not decoded)"
        threshold = float(self.run["threshold"])
        high = float(score) > threshold
        verdict = ('<span class="bad">flagged</span>' if high else "not flagged")
        text = f"anomaly score {_fmt(score, 5)} {'&gt;' if high else '&le;'} threshold {_fmt(threshold, 5)}: {verdict}"
        if volume:
            text = (f"{_e(row.get('refer_frames'))} of {_e(row.get('frames'))} B-scans flagged; highest "
                    + text.replace("anomaly score", "score", 1))
        if self.parts:
            top = row.get("top_part")
            return text + (f"; top part <b>{_e(top)}</b>" if top else "") + (
                " (the B-scan with the highest score)" if volume and top else "")
        return text + " (combined score; no per-part scores in this bundle)"

    def _probabilities(self, detail: dict, volume: bool) -> str:
        probs = detail.get("probabilities")
        if probs is None:
            return ""
        rows = "".join(f'<tr><td>{_e(c)}</td><td class="bar"><div style="width:{max(0.0, min(1.0, float(p))) * 100:.1f}%">'
                       f"</div></td><td>{float(p):.4f}</td></tr>" for c, p in zip(self.classes, probs))
        what = "probabilities of the B-scan shown" if volume else "class probabilities"
        return f'<table class="probs"><caption>{what}</caption>{rows}</table>\n'

    def _part_scores(self, detail: dict, volume: bool) -> str:
        """The detector part scores of the image (of the B-scan shown, for a volume), highest marked."""
        scores = detail.get("part_scores")
        if not self.parts or scores is None or len(scores) != len(self.parts):
            return ""
        top = int(np.argmax(scores))
        scale = max(PART_BAR_FULL, max(float(v) for v in scores))
        rows = "".join(
            f'<tr{TOP_CLASS if i == top else ""}><td title="{_e(p.get("description"))}">{_e(p["name"])}</td>'
            f'<td class="bar part"><div style="width:{max(0.0, min(1.0, float(v) / scale)) * 100:.1f}%"></div></td>'
            f"<td>{float(v):+.3f}</td><td>{'top part' if i == top else ''}</td></tr>"
            for i, (p, v) in enumerate(zip(self.parts, scores)))
        what = "detector part scores of the B-scan shown" if volume else "detector part scores"
        return (f'<table class="parts"><caption>{what} (z: 0 = typical clean scan, higher = more unusual)'
                f"</caption>{rows}</table>\n")

    def _thumb(self, detail: dict) -> str:
        png = detail.get("thumbnail")
        note = detail.get("thumbnail_note", "")
        if not png:
            return f'<div class="thumb"><div class="noimg">no image</div><div class="cap">{_e(note)}</div></div>\n'
        data = base64.b64encode(png).decode("ascii")
        return (f'<div class="thumb"><img src="data:image/png;base64,{data}" alt="thumbnail">'
                f'<div class="cap">{_e(note)}</div></div>\n')


_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>medrobust-screen report</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #1b1b1b; background: #fff; font-size: 14px; }
h1 { font-size: 1.5em; margin: 0.3em 0; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 2px solid #ccc; padding-bottom: 0.2em; }
h2 .n { color: #666; font-weight: normal; }
h3 { font-size: 1em; margin: 0 0 0.4em 0; word-break: break-all; }
.banner { background: #b00020; color: #fff; font-weight: bold; padding: 0.6em 1em; font-size: 1.1em; }
table.facts { border-collapse: collapse; margin: 0.6em 0; }
table.facts th, table.facts td { text-align: left; vertical-align: top; padding: 2px 10px 2px 0; }
table.facts th { color: #555; white-space: nowrap; }
.counts a { color: #1b1b1b; }
.totals { color: #555; }
.entry { display: flex; gap: 14px; border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin: 8px 0; }
.entry.refer { border-left: 6px solid #c77700; }
.entry.disease { border-left: 6px solid #b00020; }
.entry.error { border-left: 6px solid #555; }
.entry.rest { border-left: 6px solid #2e7d32; }
.thumb { width: 132px; flex: none; text-align: center; }
.thumb img { max-width: 128px; max-height: 128px; border: 1px solid #999; background: #000; }
.noimg { width: 128px; height: 64px; line-height: 64px; background: #eee; color: #777; margin: auto; }
.cap { font-size: 11px; color: #555; margin-top: 3px; }
.body { flex: 1; min-width: 0; }
table.kv th { text-align: left; color: #555; padding-right: 10px; white-space: nowrap; vertical-align: top; }
table.kv td { word-break: break-word; }
table.probs { margin-top: 4px; font-size: 12px; }
table.probs caption { text-align: left; color: #555; }
td.bar { width: 160px; background: #f0f0f0; }
td.bar div { height: 10px; background: #4a6fa5; }
table.parts { margin-top: 4px; font-size: 12px; }
table.parts caption { text-align: left; color: #555; }
td.bar.part div { background: #c77700; }
table.parts tr.top td { font-weight: bold; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 4px; color: #fff; font-size: 12px; }
.badge.classify { background: #2e7d32; }
.badge.refer { background: #c77700; }
.badge.error { background: #555; }
.entry.disease .badge.classify { background: #b00020; }
.eye { background: #e3eaf5; padding: 0 6px; border-radius: 4px; font-weight: normal; }
.ok { color: #2e7d32; font-weight: bold; }
.bad, .positive { color: #b00020; font-weight: bold; }
.none { color: #777; }
code { font-size: 11px; }
</style>
</head>
<body>
"""
_TAIL = "<p class=\"totals\">End of report. Written by medrobust-screen; open offline, nothing is loaded from elsewhere.</p>\n</body>\n</html>\n"
