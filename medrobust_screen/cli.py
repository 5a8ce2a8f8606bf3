"""medrobust-screen: screen OCT scans with an exported bundle, on a device without TensorFlow.

    medrobust-screen --bundle bundles/NAME --trusted-key publisher.pub IMAGE_OR_FOLDER... [--out results.csv|.json]
    medrobust-screen --bundle bundles/NAME --allow-unsigned IMAGE_OR_FOLDER...      (unsigned: said in every output)
    python -m medrobust_screen --bundle bundles/NAME ...      (also: python -m export.runtime, the same command)

Imports only the standard library, numpy, Pillow (through ``medrobust_screen.images``), the LiteRT
interpreter (``ai_edge_litert``, else ``tflite_runtime``) and, to check a signature, ``cryptography``
(and ``pydicom`` for DICOM input, medrobust_screen.dicom) -- never TensorFlow, and nothing outside the
medrobust_screen package. ``pip install ./edge`` installs exactly that.

Before loading anything it checks, in order, and refuses the bundle with a one-line reason (exit
status 2) at the first failure:

1. the signature (``signature.json``, Ed25519 over the exact bytes of ``manifest.json``) against the
   public key the operator passes with ``--trusted-key`` (see medrobust_screen.signing); ``--allow-unsigned``
   screens a bundle that has no signature.json, and every output then says NOT VERIFIED (a bundle that
   carries a signature is always checked: the flag is refused for it);
2. that the manifest has every field the runtime relies on;
3. the sha256 of every file the manifest lists;
4. that the threshold the manifest states is the one baked into ``screening.tflite`` (read back from
   the model's ``threshold`` output).

Each image is decoded with ``medrobust_screen.images.load_image`` (the training preprocessing: EXIF
orientation, grey -- alpha composited on black, 16-bit scaled by 1/65535 -- centre square crop, BOX
resize, /255) and run through ``screening.tflite``. One row per image:

    file, verdict, class, confidence, anomaly_score, error, training_data, bundle_signature

verdict is ``refer`` when the detector flags the scan (anomaly_score > threshold: do not trust the
AI on this scan, a human reads it), else ``classify`` (class = the most probable class, confidence
its probability). A file that cannot be screened (corrupt, empty, not an image, too small, an
unsupported pixel mode) gets verdict ``error`` and the reason in ``error``; the run goes on.
``training_data`` says what data the model was trained on (``SYNTHETIC data (phantom) ...``) and
``bundle_signature`` whether the bundle's signature was verified; the JSON output carries both in
its header instead. A bundle with a referral point adds p_disease, disease_screen; one whose screening model
has detector part scores adds top_part (the part with the highest standardised score; the JSON header lists
``detector_parts``).

DICOM OCT files (``.dcm``/``.dicom``, or any file starting with a DICOM preamble; single- or
multi-frame, 8/16-bit, MONOCHROME1/2, rescale/window applied) are read by ``medrobust_screen.dicom`` and
reported per volume by ``medrobust_screen.volume``: one row per volume (one eye) with the worst-class verdict
over its B-scans, plus one row per B-scan with --per-frame; patient identifiers are written only
with --keep-identifiers.  When any DICOM file is among the inputs the rows gain the columns
``medrobust_screen.volume.DICOM_COLUMNS`` (level, frame, frames, counts, driving_frames, reason,
sop_instance_uid, series_instance_uid, files, laterality). The single-frame files of one series
(SeriesInstanceUID; else StudyInstanceUID + laterality) are one volume, frames ordered by InstanceNumber
then file path; files whose tags conflict are screened one by one and their reason says why
(``medrobust_screen.volume.SERIES_RULE``).

``--report report.html`` also writes a self-contained HTML report (``medrobust_screen.report``: no network,
thumbnails inline, referred and disease cases first), atomically like --out; its path is checked (folder
exists, not a folder, not the --out file) before the bundle is read.

Folders are searched recursively for files with an image extension or DICOM files (hidden files
and folders are skipped); files named explicitly are always screened. Images are processed one at a
time (bounded memory); with --out the results are streamed to a temporary file (created with the
umask's permissions) that is renamed into place at the end; nothing is written before the first row.

Exit status: 0 when every file found was screened; 1 when some could not be (their rows say why, the
other rows are complete and written, and a warning says how many); 2 for a bad bundle, a
signature that does not verify, bad arguments, an input path that does not exist, or when no image
file was found; 130 when interrupted; 141 when the reader of standard output went away (``| head``).
"""

from __future__ import annotations

import os
import sys
import time

from medrobust_screen import dicom as dicom_files
from medrobust_screen import volume as volumes
from medrobust_screen.arguments import ArgumentParser
from medrobust_screen.errors import BundleError, UsageError
from medrobust_screen.images import IMAGE_EXTENSIONS
from medrobust_screen.inputs import check_inputs, iter_image_files
from medrobust_screen.output import Sink, output_format
from medrobust_screen.referral import REFERRAL_RULE
from medrobust_screen.report import DETAIL_KEY, HtmlReport, check_report_path
from medrobust_screen.screener import VERDICT_CLASSIFY, VERDICT_ERROR, VERDICT_REFER, VERDICT_RULE, Screener

TRUSTED_KEY_ENV = "MEDROBUST_TRUSTED_KEY"  # a provisioned device's publisher key, used when --trusted-key is absent


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="medrobust-screen",
        description="Screen retinal OCT scans with an exported medrobust bundle (LiteRT, no TensorFlow). "
                    "One row per image: file, verdict (classify|refer|error), class, confidence, "
                    "anomaly_score, error, training_data, bundle_signature. verdict 'refer' = the detector "
                    "flags the scan: do not trust the AI on it, a human reads it.",
        epilog="The bundle is checked before any image is read: its signature against --trusted-key, the "
               "sha256 of every file, and the threshold baked into the model. Exit status: 0 when every file "
               "found was screened, 1 when some could not be (they get error rows; the rest is written), 2 for "
               "a bad bundle, a signature that "
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
                        help="screen a bundle that has no signature.json (who made it is then unknown: every "
                             "output says NOT VERIFIED); refused for a signed bundle, whose signature is always checked")
    parser.add_argument("--out", default=None,
                        help="write results to this .csv or .json file (default: CSV on standard output)")
    parser.add_argument("--report", default=None, metavar="REPORT.html",
                        help="also write a self-contained HTML report (one file, no network: thumbnails inline; "
                             "referred and disease cases first); with or without --out")
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
    check_report_path(args.report, args.out)
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
    columns = screener.columns
    if screener.referral:
        header.update(referral={**screener.referral, "rule": REFERRAL_RULE})
    if screener.parts:  # bundles whose screening model has part scores (rows then carry top_part)
        header.update(detector_parts=screener.parts)
    is_dicom = any(dicom_files.is_dicom_file(p) for p in files)
    if is_dicom:
        columns = columns + volume_options.columns()
        dicom_files.import_pydicom()  # start-up, not screening time
        header.update(volume_rule=volumes.VOLUME_RULE, series_rule=volumes.SERIES_RULE,
                      min_confidence=volume_options.min_confidence,
                      identifiers="kept" if volume_options.keep_identifiers else "left out")
    sink = Sink(args.out, header, columns)
    html = None
    if args.report:
        html = HtmlReport(args.report, {
            "bundle": header["bundle"], "signature": screener.signature, "training_data": provenance,
            "classes": screener.classes, "threshold": screener.threshold, "referral": screener.referral,
            "model_outputs": screener.output_names, "keep_identifiers": volume_options.keep_identifiers,
            "parts": screener.parts,
            **({"volume_rule": volumes.VOLUME_RULE + ". " + volumes.SERIES_RULE,
                "min_confidence": volume_options.min_confidence} if is_dicom else {})})
    counts = {VERDICT_CLASSIFY: 0, VERDICT_REFER: 0, VERDICT_ERROR: 0}
    dicom_counts = {"volumes": 0, "bscans": 0}
    positives = 0
    started = last = time.perf_counter()
    try:
        for row in screener.screen(files, None, volume_options, details=html is not None):
            detail = row.pop(DETAIL_KEY, None)
            if is_dicom:
                row.setdefault("level", volumes.LEVEL_IMAGE)
            sink.write(row)
            if html is not None:
                html.add(row, detail)
            if row.get("level") == volumes.LEVEL_FRAME:
                continue  # counted through its volume's row
            counts[row["verdict"]] += 1
            positives += row.get("disease_screen") == "positive"
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
        if html is not None:
            html.abort()
        raise
    seconds = time.perf_counter() - started
    n_files = sum(counts.values())
    summary = {**counts, **({"screen_positive": positives} if screener.referral else {}),
               "images": n_files, "ignored_non_image_files": stats.get("ignored", 0),
               **(dicom_counts if is_dicom else {}), "seconds": round(seconds, 3)}
    if n_files == 0:
        sink.abort()
        if html is not None:
            html.abort()
        raise UsageError(f"no image files found in {', '.join(inputs)} "
                         f"(looked for {' '.join(IMAGE_EXTENSIONS)} and DICOM files)")
    sink.close(summary)
    if html is not None:
        try:
            html.close(summary)
        except OSError as exc:
            raise UsageError(f"--report: cannot write {args.report} ({exc})") from None
    n_images = n_files - dicom_counts["volumes"] + dicom_counts["bscans"]  # 2-D images + B-scans
    rate = n_images / seconds if seconds > 0 else float("inf")
    log(f"screened {n_files} {'images and volumes' if is_dicom else 'files'}: {counts[VERDICT_CLASSIFY]} classify, {counts[VERDICT_REFER]} refer, "
        f"{counts[VERDICT_ERROR]} error{'' if counts[VERDICT_ERROR] == 1 else 's'}"
        + (f"; {positives} screen positive (p_disease >= {screener.referral_threshold:.4g})" if screener.referral else "")
        + (f" ({dicom_counts['bscans']} B-scans in {dicom_counts['volumes']} DICOM volumes)"
           if dicom_counts["volumes"] else "")
        + (f", {stats['ignored']} non-image files ignored" if stats.get("ignored") else "")
        + f" ({seconds:.2f} s, {rate:.1f} images/s)" + (f"; wrote {args.out}" if args.out else "")
        + (f"; report {args.report}" if args.report else ""))
    if screener.signature["status"] != "verified":
        warn("these results come from a bundle whose signature was NOT VERIFIED (--allow-unsigned)")
    if counts[VERDICT_ERROR]:
        # Said even with --quiet, and in the exit status, so a script cannot mistake a partial run for a full one.
        warn(f"{counts[VERDICT_ERROR]} of {n_files} could not be screened (verdict 'error'; the error column says "
             "why); exit status 1")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
