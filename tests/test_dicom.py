"""DICOM OCT volumes in medrobust-screen: reading (export.dicom), the volume rule (export.volume), the CLI.

Real-data tests build multi-frame DICOM files with pydicom from real Kermany B-scans (512x496 grey JPEGs
of the test split): 8-bit, 16-bit with rescale and window in functional groups, 16-bit single-frame with no
window, MONOCHROME1, JPEG Baseline (the source JPEG bytes encapsulated as they are), a corrupt JPEG frame, a
truncated file, no pixel data, a CT, a JPEG-LS file, a non-DICOM .dcm. Lossless variants store the decoded
pixels of the source JPEGs, so every frame must reach exactly the array `load_image` gives for its JPEG,
and the same verdict. The bundle is test_runtime's (untrained width-8 CNN + stand-in detector, 28 px).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless,  # noqa: E402
                         generate_uid)
from test_runtime import (ENV, IMAGE_SIZE, NO_TF, REAL_DATA, bundle_dir, keys, parts_bundle,  # noqa: E402,F401
                          parts_detector, referral_bundle,
                          run_dir)  # (fixtures)

from export import dicom  # noqa: E402
from export.volume import VolumeTally, severity_order  # noqa: E402
from medrobust.classes import CLASSES  # noqa: E402
from medrobust.data.images import load_image  # noqa: E402
from medrobust_screen import report as report_module  # noqa: E402

KERMANY = Path(os.environ.get("MEDROBUST_DATA", "/nonexistent")) / "kermany"
if not KERMANY.is_dir():
    KERMANY = Path("/work/shared/data/kermany")
OPT = dicom.OPHTHALMIC_TOMOGRAPHY
PATIENT = {"PatientName": "DOE^JANE", "PatientID": "PID-0042", "PatientBirthDate": "19500101",
           "StudyDate": "20240131"}


# ------------------------------------------------------------------------------------------ builders

def _dataset(sop_class: str = OPT, modality: str = "OPT", syntax=ExplicitVRLittleEndian, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.ImageLaterality = "R"
    for key, value in {**PATIENT, **attrs}.items():
        setattr(ds, key, value)
    return ds


def _native(path: Path, frames: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None,
            **attrs) -> Dataset:
    ds = _dataset(**attrs)
    ds.set_pixel_data(frames, photometric, bits or frames.dtype.itemsize * 8)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _encapsulated(path: Path, frames: list[bytes], rows: int, columns: int, syntax=JPEGBaseline8Bit) -> Dataset:
    ds = _dataset(syntax=syntax)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.NumberOfFrames = len(frames)
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return ds


def _item(**attrs) -> Dataset:
    item = Dataset()
    for key, value in attrs.items():
        setattr(item, key, value)
    return item


@pytest.fixture(scope="module")
def unsigned_bundle(bundle_dir, tmp_path_factory):  # noqa: F811
    """The runtime tests' bundle without its signature.json: these tests screen with --allow-unsigned,
    which a signed bundle refuses (the signature checks are tested in test_runtime.py)."""
    out = tmp_path_factory.mktemp("unsigned") / "bundle"
    shutil.copytree(bundle_dir, out)
    (out / "signature.json").unlink()
    return out


@pytest.fixture(scope="module")
def bscans() -> list[Path]:
    """Six real 512x496 grey B-scans of the test split: 2 CNV, 1 DME, 1 DRUSEN, 2 NORMAL."""
    if not (KERMANY / "test").is_dir():
        pytest.skip("real Kermany scans not found (set MEDROBUST_DATA to the folder holding kermany/)")
    chosen = []
    for cls, n in (("CNV", 2), ("DME", 1), ("DRUSEN", 1), ("NORMAL", 2)):
        found = []
        for path in sorted((KERMANY / "test" / cls).glob("*.jpeg")):
            with Image.open(path) as img:
                if img.size == (512, 496) and img.mode == "L":
                    found.append(path)
            if len(found) == n:
                break
        chosen += found
    assert len(chosen) == 6
    return chosen


@pytest.fixture(scope="module")
def volumes(bscans, tmp_path_factory) -> Path:
    """A folder of DICOM files made from `bscans` (plus bad ones), and a copy of the JPEGs."""
    root = tmp_path_factory.mktemp("dicom")
    pixels = np.stack([np.asarray(Image.open(p)) for p in bscans])  # decoded JPEG pixels, uint8
    p16 = pixels.astype(np.uint16)

    _native(root / "oct8.dcm", pixels)
    # 16-bit, stored = 256 p + 128; rescale in the shared functional groups (value = 64 p - 68), a window in
    # each frame's functional group that maps [-68, 16252] onto [0, 1]: grey = p / 255 again. The top-level
    # window is a decoy the frame windows override.
    ds = _dataset(WindowCenter=100, WindowWidth=50)
    ds.set_pixel_data(p16 * 256 + 128, "MONOCHROME2", 16)
    ds.SharedFunctionalGroupsSequence = Sequence([_item(PixelValueTransformationSequence=Sequence([
        _item(RescaleSlope=0.25, RescaleIntercept=-100, RescaleType="US")]))])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        _item(FrameVOILUTSequence=Sequence([_item(WindowCenter=8092.5, WindowWidth=16321)])) for _ in bscans])
    ds.save_as(root / "oct16_rescale.dcm", enforce_file_format=True)
    # 16-bit single frame, no rescale or window: the full 16-bit range maps to [0, 1] (p * 257 / 65535 = p / 255).
    _native(root / "oct16_single.dcm", p16[0] * 257)
    # MONOCHROME1 (0 = white), in a sub-folder, without an extension: found by its DICOM preamble.
    (root / "series").mkdir()
    _native(root / "series" / "IM000001", 255 - pixels, photometric="MONOCHROME1")
    _native(root / "oct_rgb.dcm", np.repeat(pixels[..., None], 3, axis=-1), photometric="RGB")  # grey as RGB
    # The source JPEG files, byte for byte, as the frames of a JPEG Baseline volume.
    jpegs = [p.read_bytes() for p in bscans]
    _encapsulated(root / "oct_jpeg.dcm", jpegs, 496, 512)
    # Bad ones.
    broken = list(jpegs)
    broken[2] = broken[2][:600] + b"\x00" * 10
    _encapsulated(root / "bad_corrupt_frame.dcm", broken, 496, 512)
    data = (root / "oct8.dcm").read_bytes()
    (root / "bad_truncated.dcm").write_bytes(data[: len(data) - 300_000])  # frame 6 gone, frame 5 cut
    ds = _dataset()
    ds.Rows, ds.Columns = 496, 512
    ds.save_as(root / "bad_no_pixels.dcm", enforce_file_format=True)
    _native(root / "bad_ct.dcm", np.arange(64 * 64, dtype=np.int16).reshape(64, 64), sop_class=CTImageStorage,
            modality="CT", RescaleSlope=1, RescaleIntercept=-1024)
    _encapsulated(root / "bad_jpegls.dcm", [b"\xff\xd8\xff\xf7" + bytes(100)] * 2, 496, 512, syntax=JPEGLSLossless)
    (root / "bad_not_dicom.dcm").write_text("not a DICOM file")
    (root / "DICOMDIR").write_bytes(bytes(128) + b"DICM")  # a media index: skipped in folders
    (root / "README.txt").write_text("ignored")
    return root


GOOD = ["oct8.dcm", "oct16_rescale.dcm", "series/IM000001", "oct_jpeg.dcm", "oct_rgb.dcm"]


def _main(*args: str) -> int:
    from export.runtime import main

    return main([*args, "--allow-unsigned"])  # the signature checks are tested in test_runtime.py


# ------------------------------------------------------------------------------- frames == JPEG

@pytest.mark.realdata
@pytest.mark.parametrize("size", [IMAGE_SIZE, 64])
def test_every_variant_gives_the_arrays_of_the_source_jpegs(volumes, bscans, size):
    expected = [load_image(p, size) for p in bscans]
    for name in GOOD:
        volume = dicom.open_volume(volumes / name)
        assert volume.frames == len(bscans) and (volume.rows, volume.columns) == (496, 512)
        frames = list(volume.iter_frames(size))
        assert [n for n, _ in frames] == list(range(1, len(bscans) + 1))
        for (n, x), ref in zip(frames, expected):
            assert x.dtype == np.float32 and x.shape == (size, size, 1)
            assert np.array_equal(x, ref), f"{name} frame {n} differs from its JPEG"
    single = list(dicom.open_volume(volumes / "oct16_single.dcm").iter_frames(size))
    assert len(single) == 1 and np.array_equal(single[0][1], expected[0])


@pytest.mark.realdata
def test_decoy_window_would_have_changed_the_frames(volumes, bscans):
    """The frame-level window (functional groups) is what made oct16_rescale equal: the top-level one differs."""
    volume = dicom.open_volume(volumes / "oct16_rescale.dcm")
    settings = volume.frame_settings(0)
    assert float(settings.WindowCenter) == 8092.5 and float(settings.RescaleSlope) == 0.25
    decoy = Dataset()
    for keyword in ("BitsStored", "PixelRepresentation", "PhotometricInterpretation", "WindowCenter", "WindowWidth"):
        setattr(decoy, keyword, volume._ds[keyword].value)
    table, low = dicom.display_lut(decoy)
    stored = np.asarray(Image.open(bscans[0]), np.int64) * 256 + 128
    assert not np.array_equal(table[stored - low], np.asarray(Image.open(bscans[0])))


@pytest.mark.realdata
def test_verdicts_equal_the_jpeg_verdicts(unsigned_bundle, volumes, bscans, tmp_path):  # noqa: F811
    from export.runtime import Screener

    screener = Screener(unsigned_bundle, allow_unsigned=True)
    jpeg_rows = [screener.screen_file(str(p)) for p in bscans]
    out = tmp_path / "r.json"
    files = [str(volumes / n) for n in GOOD]
    assert _main("--bundle", str(unsigned_bundle), *files, "--per-frame", "--out", str(out), "--quiet") == 0
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert len(rows) == len(GOOD) * (len(bscans) + 1)
    keys = ("verdict", "class", "confidence", "anomaly_score")
    tally = VolumeTally(screener.classes)
    for row in jpeg_rows:
        tally.add(row)
    expected_volume = tally.verdict()
    for i, name in enumerate(GOOD):
        block = rows[i * (len(bscans) + 1): (i + 1) * (len(bscans) + 1)]
        *frames, vol = block
        for k, (row, ref) in enumerate(zip(frames, jpeg_rows), start=1):
            assert row["level"] == "frame" and row["frame"] == k and row["frames"] == len(bscans)
            assert Path(row["file"]).name == Path(name).name and row["error"] is None
            assert {key: row[key] for key in keys} == {key: ref[key] for key in keys}, (name, k)
        assert vol["level"] == "volume" and vol["frames"] == len(bscans) and vol["laterality"] == "R"
        for key in ("verdict", "class", "confidence", "anomaly_score", "refer_frames", "confident_frames",
                    "frame_classes"):
            want = expected_volume[key]
            assert vol[key] == (None if want == "" and key != "frame_classes" else want), (name, key)
        assert vol["sop_instance_uid"] == str(pydicom.dcmread(volumes / name).SOPInstanceUID)
    assert doc["summary"]["volumes"] == len(GOOD) and doc["summary"]["bscans"] == len(GOOD) * len(bscans)
    assert doc["min_confidence"] == 0.5 and "worst-class" in doc["volume_rule"]


@pytest.mark.realdata
def test_bad_files_give_error_rows_and_the_run_goes_on(unsigned_bundle, volumes, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "r.csv"
    assert _main("--bundle", str(unsigned_bundle), str(volumes), "--out", str(out)) == 1
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_name = {os.path.relpath(r["file"], volumes): r for r in rows}
    assert set(by_name) == set(GOOD) | {"oct16_single.dcm", "bad_corrupt_frame.dcm", "bad_truncated.dcm",
                                         "bad_no_pixels.dcm", "bad_ct.dcm", "bad_jpegls.dcm", "bad_not_dicom.dcm"}
    assert all(r["level"] == "volume" for r in rows)  # no --per-frame: one row per file
    for name in GOOD + ["oct16_single.dcm"]:
        assert by_name[name]["verdict"] in ("classify", "refer") and not by_name[name]["error"]
        assert not dicom.open_volume(volumes / name).truncated

    corrupt = by_name["bad_corrupt_frame.dcm"]  # frame 3 undecodable: the volume is referred, the rest screened
    assert corrupt["verdict"] == "refer" or corrupt["class"] in ("CNV", "DME")
    assert corrupt["error_frames"] == "1" and corrupt["frames"] == "6" and "frame 3" in corrupt["error"]
    truncated = by_name["bad_truncated.dcm"]
    assert truncated["error_frames"] == "2" and truncated["frames"] == "6" and "truncated" in truncated["error"]
    assert truncated["verdict"] == "refer" or truncated["class"] in ("CNV", "DME")
    for name, words in [("bad_no_pixels.dcm", "no pixel data"), ("bad_ct.dcm", "not an OCT image: CT Image Storage"),
                        ("bad_not_dicom.dcm", "not a DICOM file"), ("bad_jpegls.dcm", "JPEG-LS")]:
        row = by_name[name]
        assert row["verdict"] == "error" and words in row["error"] and row["class"] == "", (name, row)
    err = capsys.readouterr().err
    assert "2 non-image files ignored" in err  # README.txt and DICOMDIR (a media index, not an image)
    assert "B-scans in 12 DICOM volumes" in err


@pytest.mark.realdata
def test_per_frame_rows_show_the_bad_frame(unsigned_bundle, volumes, tmp_path):  # noqa: F811
    out = tmp_path / "r.json"
    assert _main("--bundle", str(unsigned_bundle), str(volumes / "bad_corrupt_frame.dcm"), "--per-frame",
                 "--out", str(out), "--quiet") == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["level"] for r in rows] == ["frame"] * 6 + ["volume"]
    assert [r["verdict"] == "error" for r in rows[:6]] == [False, False, True, False, False, False]
    assert "truncated" in rows[2]["error"] and rows[2]["frame"] == 3


@pytest.mark.realdata
def test_identifiers_only_with_keep_identifiers(unsigned_bundle, volumes, tmp_path):  # noqa: F811
    files = [str(volumes / "oct8.dcm"), str(volumes / "oct_jpeg.dcm")]
    uid = str(pydicom.dcmread(volumes / "oct8.dcm").SOPInstanceUID)
    for ext in ("csv", "json"):
        out = tmp_path / f"r.{ext}"
        assert _main("--bundle", str(unsigned_bundle), *files, "--per-frame", "--out", str(out), "--quiet") == 0
        text = out.read_text()
        for value in ("DOE", "JANE", "PID-0042", "19500101", "20240131", "patient"):
            assert value not in text, (ext, value)
        assert uid in text
        assert _main("--bundle", str(unsigned_bundle), *files, "--keep-identifiers", "--out", str(out), "--quiet") == 0
        text = out.read_text()
        for value in ("DOE^JANE", "PID-0042", "19500101", "20240131", "patient_id"):
            assert value in text, (ext, value)


@pytest.mark.realdata
def test_images_and_volumes_in_one_run(unsigned_bundle, volumes, bscans, tmp_path):  # noqa: F811
    out = tmp_path / "r.csv"
    assert _main("--bundle", str(unsigned_bundle), str(bscans[0]), str(volumes / "oct8.dcm"), "--out", str(out),
                 "--quiet") == 0
    with open(out, newline="", encoding="utf-8") as f:
        image, vol = list(csv.DictReader(f))
    assert image["level"] == "image" and image["frames"] == "" and image["verdict"] in ("classify", "refer")
    assert vol["level"] == "volume" and vol["frames"] == "6"


@pytest.mark.realdata
def test_a_header_claiming_too_many_frames(unsigned_bundle, volumes, tmp_path):  # noqa: F811
    """Number of Frames larger than the pixel data: the missing frames are unreadable, without decoding each."""
    from export.runtime import Screener
    from export.volume import screen_volume

    ds = pydicom.dcmread(volumes / "oct8.dcm")
    ds.NumberOfFrames = 5000
    ds.save_as(tmp_path / "lie.dcm")
    (row,) = screen_volume(Screener(unsigned_bundle, allow_unsigned=True), str(tmp_path / "lie.dcm"))
    assert (row["frames"], row["error_frames"]) == (5000, 4994) and "truncated" in row["error"]
    ds.NumberOfFrames = dicom.MAX_FRAMES + 1
    ds.save_as(tmp_path / "huge.dcm")
    (row,) = screen_volume(Screener(unsigned_bundle, allow_unsigned=True), str(tmp_path / "huge.dcm"))
    assert row["verdict"] == "error" and "MAX_FRAMES" in row["error"]


def test_min_confidence_out_of_range_is_refused_before_loading(tmp_path, capsys):
    assert _main("--bundle", str(tmp_path / "no-bundle"), str(tmp_path), "--min-confidence", "1.5") == 2
    err = capsys.readouterr().err
    assert "--min-confidence must be in [0, 1]" in err and "bundle" not in err


@pytest.mark.realdata
def test_dicom_screening_runs_without_tensorflow(unsigned_bundle, volumes, tmp_path):  # noqa: F811
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", NO_TF, "--bundle", str(unsigned_bundle), "--allow-unsigned", str(volumes),
                           "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["summary"]["volumes"] == 12 and doc["summary"]["error"] == 4


# ------------------------------------------------------------------------------------ volume rule

def _row(verdict: str, cls: str = "NORMAL", confidence: float = 0.9, score: float = 0.1) -> dict:
    if verdict == "error":
        return {"verdict": "error", "class": "", "confidence": "", "anomaly_score": "", "error": "bad frame"}
    return {"verdict": verdict, "class": cls, "confidence": confidence, "anomaly_score": score, "error": ""}


def _verdict(rows, min_confidence=0.5) -> dict:
    tally = VolumeTally(CLASSES, min_confidence)
    for row in rows:
        tally.add(row)
    return tally.verdict()


@pytest.mark.parametrize("rows, verdict, cls", [
    ([_row("classify")] * 48 + [_row("classify", "CNV", 0.6)], "classify", "CNV"),       # one confident urgent frame
    ([_row("classify", "DME", 0.9), _row("refer"), _row("error")], "classify", "DME"),   # urgent beats refer
    ([_row("classify", "DRUSEN"), _row("refer")] + [_row("classify")] * 5, "refer", ""),  # refer beats non-urgent
    ([_row("classify", "DRUSEN"), _row("error")], "refer", ""),                         # unreadable frame: refer
    ([_row("classify", "DRUSEN", 0.7)] + [_row("classify")] * 5, "classify", "DRUSEN"),  # worst non-urgent
    ([_row("classify")] * 3, "classify", "NORMAL"),
    ([_row("classify", "CNV", 0.49)] + [_row("classify")] * 3, "classify", "NORMAL"),   # unsure urgent: ignored
    ([_row("classify", "CNV", 0.4), _row("classify", "NORMAL", 0.3)], "refer", ""),     # no confident frame
    ([_row("refer")] * 3, "refer", ""),
    ([_row("error")] * 3, "error", ""),
    ([_row("classify", "CNV", 0.9), _row("classify", "DME", 0.6), _row("classify", "DME", 0.7)],
     "classify", "DME"),                                                                 # more confident frames
    ([_row("classify", "CNV", 0.9), _row("classify", "DME", 0.95)], "classify", "DME"),  # tie: higher confidence
])
def test_worst_class_rule(rows, verdict, cls):
    out = _verdict(rows)
    assert (out["verdict"], out["class"]) == (verdict, cls), out
    assert out["frames"] == len(rows)
    assert out["refer_frames"] == sum(r["verdict"] == "refer" for r in rows)
    assert out["error_frames"] == sum(r["verdict"] == "error" for r in rows)
    assert out["reason"]


def test_rule_counts_confidence_and_threshold():
    rows = [_row("classify", "CNV", 0.6, 0.2), _row("classify", "CNV", 0.8, 0.5), _row("classify", "NORMAL", 0.99),
            _row("refer", "NORMAL", 0.9, 3.0)]
    out = _verdict(rows)
    assert out["confidence"] == 0.8 and out["anomaly_score"] == 3.0
    assert out["confident_frames"] == 3 and out["frame_classes"] == "CNV:2 NORMAL:1"
    assert "2 confident B-scans" in out["reason"] and "1 flagged" in out["reason"]
    assert _verdict(rows, min_confidence=0.9)["class"] == ""  # CNV no longer confident -> refer (flagged frame)
    assert _verdict(rows[:3], min_confidence=0.9)["class"] == "NORMAL"
    assert _verdict([_row("classify", "CNV", 0.3)], min_confidence=0.0)["class"] == "CNV"
    assert severity_order(CLASSES) == ("CNV", "DME", "DRUSEN", "NORMAL")


# ---------------------------------------------------------------------------- stored -> grey levels

def _settings(bits=16, signed=0, photometric="MONOCHROME2", **attrs) -> Dataset:
    ds = Dataset()
    ds.BitsStored, ds.BitsAllocated, ds.PixelRepresentation = bits, 16 if bits > 8 else 8, signed
    ds.PhotometricInterpretation = photometric
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _grey(settings, stored) -> np.ndarray:
    table, low = dicom.display_lut(settings)
    stored = np.asarray(stored, np.int64)
    return stored.astype(np.uint8) if table is None else table[np.clip(stored, low, low + len(table) - 1) - low]


def test_display_lut_rules():
    assert dicom.display_lut(_settings(8))[0] is None  # 8-bit, nothing to apply: used as is
    assert dicom.display_lut(_settings(8, RescaleSlope=2, RescaleIntercept=5))[0] is None
    assert list(_grey(_settings(8, photometric="MONOCHROME1"), [0, 1, 254, 255])) == [255, 254, 1, 0]
    assert list(_grey(_settings(12), [0, 4095, 5000])) == [0, 255, 255]  # 12-bit full range; above it clipped
    assert list(_grey(_settings(16, signed=1), [-32768, 32767, 0])) == [0, 255, 128]
    # negative slope, no window: the smallest value is black, so the largest stored value is
    assert list(_grey(_settings(8, RescaleSlope=-1, RescaleIntercept=0), [0, 255])) == [255, 0]
    # a CT-like window in rescaled units: centre 40, width 400 -> [-160, 240] onto [0, 255]
    ct = _settings(16, signed=1, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    assert list(_grey(ct, [1024 - 200, 1024 - 160, 1024 + 40, 1024 + 240, 1024 + 900])) == [0, 0, 128, 255, 255]
    sigmoid = _settings(8, WindowCenter=128, WindowWidth=64, VOILUTFunction="SIGMOID")
    g = _grey(sigmoid, np.arange(256))
    assert g[0] < 5 and g[-1] > 250 and np.all(np.diff(g.astype(int)) >= 0)
    voi = _settings(8)
    voi.VOILUTSequence = Sequence([_item(LUTDescriptor=[256, 0, 8], LUTData=list(range(255, -1, -1)))])
    voi["VOILUTSequence"].value[0]["LUTData"].VR = "US"
    assert list(_grey(voi, [0, 255])) == [255, 0]


def test_is_dicom_file(tmp_path):
    (tmp_path / "a.dcm").write_text("x")
    (tmp_path / "IM1").write_bytes(bytes(128) + b"DICM" + bytes(10))
    (tmp_path / "scan.jpeg").write_bytes(bytes(128) + b"DICM")
    (tmp_path / "DICOMDIR").write_bytes(bytes(128) + b"DICM")
    (tmp_path / "notes").write_text("hello")
    assert dicom.is_dicom_file(tmp_path / "a.dcm") and dicom.is_dicom_file(tmp_path / "IM1")
    assert dicom.is_dicom_file(tmp_path / "scan.jpeg")  # named explicitly: sniffed
    assert not dicom.is_dicom_in_folder(tmp_path / "scan.jpeg")  # in a folder walk: an image file
    assert not dicom.is_dicom_in_folder(tmp_path / "DICOMDIR") and dicom.is_dicom_in_folder(tmp_path / "IM1")
    assert not dicom.is_dicom_file(tmp_path / "notes") and not dicom.is_dicom_file(tmp_path / "missing")
    with pytest.raises(dicom.ImageError, match="not a DICOM file"):
        dicom.open_volume(tmp_path / "a.dcm")
    with pytest.raises(dicom.ImageError, match="file not found"):
        dicom.open_volume(tmp_path / "missing.dcm")


def test_without_pydicom_a_dicom_file_is_an_error_row(tmp_path, monkeypatch):
    (tmp_path / "a.dcm").write_bytes(bytes(128) + b"DICM" + bytes(64))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    assert dicom.import_pydicom() is None
    with pytest.raises(dicom.ImageError, match="pydicom is not installed"):
        dicom.open_volume(tmp_path / "a.dcm")


def test_a_volume_screens_positive_when_any_decoded_bscan_does():
    def tally(p_values, threshold=0.7):
        t = VolumeTally(CLASSES, 0.5, threshold)
        for p in p_values:
            row = _row("error") if p is None else {**_row("classify", "NORMAL", 0.9), "p_disease": p}
            t.add(row)
        return t.verdict()

    assert tally([0.1, 0.72, 0.3])["disease_screen"] == "positive"
    assert tally([0.1, 0.72, 0.3])["p_disease"] == 0.72
    assert tally([0.1, 0.69, None])["disease_screen"] == "negative"
    assert tally([None, None]) | {} and tally([None, None])["disease_screen"] == ""
    assert "disease_screen" not in VolumeTally(CLASSES).verdict()  # bundles without a referral point


# ------------------------------------------------------------------------------- series: one verdict per eye

def _bscan_pixels(n: int) -> list[tuple[Path, np.ndarray]]:
    """n real 512x496 grey Kermany test B-scans (mixed classes) and their decoded pixels."""
    if not (KERMANY / "test").is_dir():
        pytest.skip("real Kermany scans not found (set MEDROBUST_DATA to the folder holding kermany/)")
    out = []
    files = {cls: iter(sorted((KERMANY / "test" / cls).glob("*.jpeg"))) for cls in ("CNV", "NORMAL", "DME", "DRUSEN")}
    while len(out) < n and files:
        for cls in list(files):
            for path in files[cls]:
                with Image.open(path) as img:
                    if img.size == (512, 496) and img.mode == "L":
                        out.append((path, np.asarray(img)))
                        break
            else:
                del files[cls]
            if len(out) == n:
                return out
    pytest.skip("not enough 512x496 grey Kermany B-scans")


def _single(path: Path, pixels: np.ndarray, **attrs) -> Dataset:
    """One B-scan per file, as many exports store a series."""
    return _native(path, pixels, **attrs)


@pytest.fixture(scope="module")
def series_study(tmp_path_factory):
    """One study, two eyes (R, L), 5 single-frame files per eye (one series each), in one folder with
    shuffled file names; returns (folder, {laterality: [JPEG paths in InstanceNumber order]}, series UIDs)."""
    root = tmp_path_factory.mktemp("series")
    scans = _bscan_pixels(10)
    study = generate_uid()
    uids = {"R": generate_uid(), "L": generate_uid()}
    rng = np.random.default_rng(23)
    names = [f"IMG{n:04d}.dcm" for n in rng.permutation(10)]  # file order unrelated to InstanceNumber
    order = rng.permutation(5)  # InstanceNumber of the k-th file written per eye
    jpegs = {}
    for e, eye in enumerate(("R", "L")):
        ranked = [None] * 5
        for k in range(5):
            src, pixels = scans[e * 5 + k]
            number = int(order[k]) + 1
            ranked[number - 1] = src
            _single(root / names[e * 5 + k], pixels, StudyInstanceUID=study, SeriesInstanceUID=uids[eye],
                    ImageLaterality=eye, InstanceNumber=number)
        jpegs[eye] = ranked
    return root, jpegs, uids


@pytest.mark.realdata
def test_a_series_of_single_frame_files_gives_one_verdict_per_eye(unsigned_bundle, series_study, tmp_path):  # noqa: F811
    from medrobust_screen.screener import Screener

    root, jpegs, uids = series_study
    out = tmp_path / "r.json"
    assert _main("--bundle", str(unsigned_bundle), str(root), "--out", str(out), "--quiet") == 0
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert len(rows) == 2 and {r["laterality"] for r in rows} == {"R", "L"}  # 10 files, 2 eyes
    screener = Screener(unsigned_bundle, allow_unsigned=True)
    for row in rows:
        eye = row["laterality"]
        assert row["level"] == "volume" and row["frames"] == 5 and row["files"] == 5
        assert row["series_instance_uid"] == uids[eye] and row["sop_instance_uid"] == ""
        assert row["file"] == str(root)  # the series' folder
        tally = VolumeTally(screener.classes)
        for jpeg in jpegs[eye]:  # the same B-scans as JPEGs, in InstanceNumber order
            tally.add(screener.screen_file(str(jpeg)))
        want = tally.verdict()
        for key in ("verdict", "class", "confidence", "anomaly_score", "refer_frames", "confident_frames",
                    "frame_classes", "driving_frames"):
            assert row[key] == (None if want[key] == "" and key in ("class", "confidence") else want[key]), key
        assert row["driving_frames"], row
    assert doc["summary"]["volumes"] == 2 and doc["summary"]["bscans"] == 10


@pytest.mark.realdata
def test_series_frames_are_ordered_by_instance_number(unsigned_bundle, series_study, tmp_path):  # noqa: F811
    root, jpegs, uids = series_study
    out = tmp_path / "r.json"
    assert _main("--bundle", str(unsigned_bundle), str(root), "--per-frame", "--out", str(out), "--quiet") == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["level"] for r in rows] == (["frame"] * 5 + ["volume"]) * 2
    for block in (rows[:6], rows[6:]):
        *frames, volume = block
        assert [f["frame"] for f in frames] == [1, 2, 3, 4, 5]
        numbers = [int(pydicom.dcmread(f["file"], stop_before_pixels=True).InstanceNumber) for f in frames]
        assert numbers == [1, 2, 3, 4, 5]  # each frame row names its own file
        assert {f["laterality"] for f in frames} == {volume["laterality"]}
        assert len({f["sop_instance_uid"] for f in frames}) == 5


@pytest.mark.realdata
def test_conflicting_series_are_not_merged_and_say_why(unsigned_bundle, tmp_path):  # noqa: F811
    scans = _bscan_pixels(6)
    p = [pixels for _, pixels in scans]
    root = tmp_path / "export"
    root.mkdir()
    study = generate_uid()
    # laterality disagrees within one SeriesInstanceUID
    mixed = generate_uid()
    for k, eye in enumerate("RRL"):
        _single(root / f"lat{k}.dcm", p[k], StudyInstanceUID=study, SeriesInstanceUID=mixed, ImageLaterality=eye,
                InstanceNumber=k + 1)
    # a repeated SOP Instance UID
    dup = generate_uid()
    first = _single(root / "dup0.dcm", p[0], StudyInstanceUID=study, SeriesInstanceUID=dup, InstanceNumber=1)
    _single(root / "dup1.dcm", p[1], StudyInstanceUID=study, SeriesInstanceUID=dup, InstanceNumber=2)
    ds = _dataset(StudyInstanceUID=study, SeriesInstanceUID=dup, InstanceNumber=3)
    ds.set_pixel_data(p[2], "MONOCHROME2", 8)  # (makes a new SOP Instance UID: repeat the first file's after it)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    ds.save_as(root / "dup2.dcm", enforce_file_format=True)
    # a multi-frame file among single-frame files; and B-scans of different sizes
    multi = generate_uid()
    _single(root / "multi0.dcm", np.stack(p[:3]), StudyInstanceUID=study, SeriesInstanceUID=multi)
    _single(root / "multi1.dcm", p[3], StudyInstanceUID=study, SeriesInstanceUID=multi)
    sizes = generate_uid()
    _single(root / "size0.dcm", p[4], StudyInstanceUID=study, SeriesInstanceUID=sizes, InstanceNumber=1)
    _single(root / "size1.dcm", np.ascontiguousarray(p[5][:480]), StudyInstanceUID=study, SeriesInstanceUID=sizes,
            InstanceNumber=2)
    # no series or study tags: one volume per file, as before
    _single(root / "plain0.dcm", p[0])
    _single(root / "plain1.dcm", p[1])
    # no SeriesInstanceUID: StudyInstanceUID + laterality groups them
    other = generate_uid()
    _single(root / "study0.dcm", p[2], StudyInstanceUID=other, ImageLaterality="L", InstanceNumber=2)
    _single(root / "study1.dcm", p[3], StudyInstanceUID=other, ImageLaterality="L", InstanceNumber=1)
    out = tmp_path / "r.csv"
    assert _main("--bundle", str(unsigned_bundle), str(root), "--out", str(out), "--quiet") == 1
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_name = {os.path.relpath(r["file"], root): r for r in rows}
    assert set(by_name) == {"lat0.dcm", "lat1.dcm", "lat2.dcm", "dup0.dcm", "dup1.dcm", "dup2.dcm", "multi0.dcm",
                            "multi1.dcm", "size0.dcm", "size1.dcm", "plain0.dcm", "plain1.dcm", "."}
    for name in ("lat0.dcm", "lat1.dcm", "lat2.dcm"):
        assert by_name[name]["reason"].startswith("not merged with the 2 other files of series")
        assert "laterality differs (L: 1 file, R: 2 files)" in by_name[name]["reason"]
        assert by_name[name]["verdict"] in ("classify", "refer") and by_name[name]["files"] == "1"
    assert by_name["lat2.dcm"]["laterality"] == "L" and by_name["lat0.dcm"]["series_instance_uid"] == mixed
    duplicate = by_name["dup2.dcm"]
    assert duplicate["verdict"] == "error" and "duplicate SOP Instance UID" in duplicate["error"]
    assert str(root / "dup0.dcm") in duplicate["error"] and "SOP Instance UID repeated" in duplicate["reason"]
    for name in ("dup0.dcm", "dup1.dcm"):
        assert by_name[name]["verdict"] != "error" and "SOP Instance UID repeated" in by_name[name]["reason"]
    assert "only single-frame files are merged" in by_name["multi0.dcm"]["reason"]
    assert by_name["multi0.dcm"]["frames"] == "3" and by_name["multi1.dcm"]["frames"] == "1"
    assert "B-scan sizes differ (512x480: 1 file, 512x496: 1 file)" in by_name["size1.dcm"]["reason"]
    for name in ("plain0.dcm", "plain1.dcm"):
        row = by_name[name]
        assert "not merged" not in row["reason"] and row["series_instance_uid"] == "" and row["frames"] == "1"
    study_row = by_name["."]
    assert study_row["frames"] == "2" and study_row["files"] == "2" and study_row["laterality"] == "L"
    assert "StudyInstanceUID" in study_row["reason"]


def test_driving_frames_are_bounded_and_name_the_deciding_bscans():
    tally = VolumeTally(CLASSES)
    for k in range(30):
        tally.add(_row("classify", "CNV", 0.9) if k % 2 == 0 else _row("classify", "NORMAL", 0.9))
    out = tally.verdict()
    assert out["class"] == "CNV"
    assert out["driving_frames"] == " ".join(str(n) for n in range(1, 30, 2)[:15])  # 15 CNV frames: all listed
    tally = VolumeTally(CLASSES)
    for k in range(50):
        tally.add(_row("refer") if k >= 5 else _row("error"), frame=k + 1)
    out = tally.verdict()
    assert out["verdict"] == "refer" and out["driving_frames"] == " ".join(map(str, range(1, 21))) + " +30 more"
    tally = VolumeTally(CLASSES)
    for row in (_row("classify", "NORMAL", 0.3), _row("classify", "DRUSEN", 0.4)):
        tally.add(row)
    assert tally.verdict()["verdict"] == "refer" and tally.verdict()["driving_frames"] == "1 2"  # none confident


# ------------------------------------------------------------------------------- the HTML report

class _Entries(HTMLParser):
    """The report's entries (section of each, in order), titles, image sources and hrefs."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.titles, self.images, self.links, self._h3 = [], [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and (a.get("class") or "").startswith("entry "):
            self.sections.append(a["class"].split()[1])
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "h3":
            self._h3 = ""
        for key in ("href", "src"):
            if a.get(key) and tag != "img":
                self.links.append(a[key])

    def handle_data(self, data):
        if self._h3 is not None:
            self._h3 += data

    def handle_endtag(self, tag):
        if tag == "h3" and self._h3 is not None:
            self.titles.append(self._h3)
            self._h3 = None


RANK = {key: k for k, (key, _) in enumerate(report_module.SECTIONS)}


def test_report_orders_sections_and_escapes_what_comes_from_files(tmp_path):
    run = {"bundle": "bundles/b<i>", "signature": {"status": "unsigned", "reason": "--allow-unsigned"},
           "training_data": {"label": "SYNTHETIC data (phantom): not for clinical use", "synthetic": True},
           "classes": CLASSES, "threshold": 0.5, "referral": None, "model_outputs": ("anomaly_score", "flag")}
    html_path = tmp_path / "r.html"
    rep = report_module.HtmlReport(str(html_path), run)
    probs = [0.1, 0.1, 0.1, 0.7]
    base = {"class": "NORMAL", "confidence": 0.7, "anomaly_score": 0.1, "error": ""}
    rep.add({**base, "file": "normal1.png", "verdict": "classify"}, {"probabilities": probs})
    rep.add({"file": "<script>alert(1)</script>.dcm", "verdict": "error", "class": "", "confidence": "",
             "anomaly_score": "", "error": "not a DICOM file <img src=x onerror=alert(2)>", "level": "volume"}, None)
    rep.add({**base, "file": "flagged.png", "verdict": "refer", "anomaly_score": 0.9}, {"probabilities": probs})
    rep.add({**base, "file": "frame.png", "verdict": "refer", "level": "frame"}, None)  # frames are not entries
    rep.add({**base, "file": "cnv.png", "verdict": "classify", "class": "CNV"}, None)
    rep.add({**base, "file": "normal2.png", "verdict": "classify"}, None)
    rep.close({"classify": 3, "refer": 1, "error": 1})
    text = html_path.read_text(encoding="utf-8")
    entries = _Entries(text)
    assert entries.sections == ["refer", "disease", "error", "rest", "rest"]
    assert [t.split(" ", 1)[1] for t in entries.titles] == ["flagged.png", "cnv.png", "<script>alert(1)</script>.dcm",
                                                           "normal1.png", "normal2.png"]
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(2)&gt;" in text and "b&lt;i&gt;" in text
    assert "SYNTHETIC data (phantom)" in text and 'class="banner"' in text and "NOT VERIFIED" in text
    assert "only the combined anomaly score" in text and "volumes</th>" not in text  # no DICOM in this run
    assert not [p for p in tmp_path.iterdir() if p.name != "r.html"]  # no temporary file left


@pytest.fixture(scope="module")
def report_run(unsigned_bundle, series_study, tmp_path_factory):  # noqa: F811
    """A run over real scans (oct2017_subset JPEGs, one named with <script>), the two-eye series and a
    corrupt DICOM file, with --out and --report."""
    real = sorted((REAL_DATA / "val").rglob("*.jpeg"))[::8][:3]
    if len(real) < 3:
        pytest.skip("real OCT2017 scans not found")
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    images.mkdir()
    for k, src in enumerate(real):
        name = f"a<script>alert({k}).jpeg" if k == 0 else src.name
        (images / name).write_bytes(src.read_bytes())
    (images / "corrupt.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00garbage")
    out, html_path = root / "r.csv", root / "report.html"
    assert _main("--bundle", str(unsigned_bundle), str(images), str(series_study[0]), "--out", str(out),
                 "--report", str(html_path), "--quiet") == 1
    return root, out, html_path


@pytest.mark.realdata
def test_html_report_of_a_real_run(unsigned_bundle, report_run, series_study, tmp_path):  # noqa: F811
    root, out, html_path = report_run
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    text = html_path.read_text(encoding="utf-8")
    entries = _Entries(text)
    assert len(entries.sections) == len(rows) == 6  # 3 images, 1 corrupt file, 2 eyes
    assert sorted(entries.sections, key=RANK.get) == entries.sections  # referred and disease first
    assert sorted(entries.sections) == sorted(report_module.section_of(r) for r in rows)
    assert entries.sections.count("error") == 1 and "corrupt.dcm" in text
    assert "<script" not in text and "a&lt;script&gt;alert(0).jpeg" in text
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert entries.links and all(link.startswith("#") for link in entries.links)  # in-page only
    assert len(entries.images) == 5  # every decoded image and volume has its thumbnail
    for src in entries.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == "PNG" and max(img.size) <= report_module.THUMBNAIL_SIZE
    for value in ("DOE", "JANE", "PID-0042", "19500101", "20240131"):
        assert value not in text, value
    assert series_study[2]["R"] in text and "eye L" in text  # series UID and laterality are shown
    assert "volumes</th>" in text and "SeriesInstanceUID" in text  # the volume and series rules
    assert "SYNTHETIC" in text and "NOT VERIFIED" in text and text.count("the most confident") + text.count(
        "the highest anomaly score") >= 2
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    # the rows are the same bytes with or without --report, and identifiers appear only when asked for
    again = tmp_path / "again.csv"
    assert _main("--bundle", str(unsigned_bundle), str(root / "images"), str(series_study[0]), "--out", str(again),
                 "--quiet") == 1
    assert again.read_bytes() == out.read_bytes()
    kept = tmp_path / "kept.html"
    assert _main("--bundle", str(unsigned_bundle), str(series_study[0]), "--report", str(kept), "--keep-identifiers",
                 "--quiet") == 0
    assert "DOE^JANE" in kept.read_text(encoding="utf-8") and "PID-0042" in kept.read_text(encoding="utf-8")


def test_bad_report_path_is_refused_before_any_work(tmp_path, capsys):
    for bad, words in [(tmp_path / "missing" / "r.html", "does not exist"), (tmp_path, "is a folder")]:
        assert _main("--bundle", str(tmp_path / "no-bundle"), str(tmp_path), "--report", str(bad)) == 2
        err = capsys.readouterr().err
        assert "--report: " in err and words in err and "bundle" not in err and len(err.strip().splitlines()) == 1
    same = tmp_path / "r.csv"
    assert _main("--bundle", str(tmp_path / "no-bundle"), str(tmp_path), "--out", str(same), "--report",
                 str(same)) == 2
    assert "same file" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_a_headless_browser(report_run, tmp_path):
    _, _, html_path = report_run
    png = tmp_path / "shot.png"
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                           "--window-size=1280,2000", f"file://{html_path}"],
                          capture_output=True, text=True, timeout=180)
    assert png.is_file(), proc.stderr[-2000:]
    with Image.open(png) as img:
        arr = np.asarray(img.convert("RGB"))
    assert arr.shape[:2] == (2000, 1280)
    assert arr.std() > 20 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 100  # not one flat colour


@pytest.mark.realdata
def test_referral_columns_for_a_series_volume(referral_bundle, series_study, tmp_path):  # noqa: F811
    """p_disease of a series volume = the highest of its B-scans (as for a multi-frame file); the report shows it."""
    from medrobust_screen.screener import Screener

    root, jpegs, _ = series_study
    out, html_path = tmp_path / "r.csv", tmp_path / "r.html"
    assert _main("--bundle", str(referral_bundle), str(root), "--out", str(out), "--report", str(html_path),
                 "--quiet") == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"p_disease", "disease_screen"} <= set(rows[0])
    screener = Screener(referral_bundle, allow_unsigned=True)
    for row in rows:
        tally = VolumeTally(screener.classes, 0.5, screener.referral_threshold)
        for jpeg in jpegs[row["laterality"]]:
            tally.add(screener.screen_file(str(jpeg)))
        want = tally.verdict()
        assert float(row["p_disease"]) == want["p_disease"] and row["disease_screen"] == want["disease_screen"]
    text = html_path.read_text(encoding="utf-8")
    assert "positive when &ge; 0.74" in text and text.count("(p_disease ") == 2


@pytest.mark.realdata
def test_grouping_reads_headers_only(series_study, monkeypatch):
    """plan_series must not decode (or even read) pixel data: every pixel reader is made to fail."""
    from medrobust_screen import volume as volume_module

    root, jpegs, uids = series_study

    def refuse(*args, **kwargs):
        raise AssertionError("pixel data read while grouping")

    monkeypatch.setattr(pydicom.pixels, "iter_pixels", refuse)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", refuse)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(refuse))
    paths = sorted(str(p) for p in root.iterdir())
    plan = volume_module.plan_series(paths)
    series = {id(p.series): p.series for p in plan.values()}
    assert len(plan) == 10 and len(series) == 2
    for s in series.values():
        assert s.series_instance_uid == uids[s.laterality] and len(s.paths) == 5
        numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in s.paths]
        assert numbers == [1, 2, 3, 4, 5]


@pytest.mark.realdata
def test_a_volume_names_the_top_part_of_its_highest_scoring_bscan(parts_bundle, series_study, tmp_path):  # noqa: F811
    root, _, _ = series_study
    out, html_path = tmp_path / "r.json", tmp_path / "r.html"
    assert _main("--bundle", str(parts_bundle), str(root), "--allow-unsigned", "--per-frame", "--out", str(out),
                 "--report", str(html_path), "--quiet") == 0
    rows = json.loads(out.read_text())["results"]
    names = [p["name"] for p in json.loads((parts_bundle / "manifest.json").read_text())["detector"]["parts"]]
    volumes = [r for r in rows if r["level"] == "volume"]
    assert len(volumes) == 2
    for volume in volumes:
        frames = [r for r in rows if r["level"] == "frame" and r["laterality"] == volume["laterality"]]
        assert all(f["top_part"] in names for f in frames)
        top = max(frames, key=lambda f: f["anomaly_score"])
        assert volume["anomaly_score"] == top["anomaly_score"] and volume["top_part"] == top["top_part"]
    text = html_path.read_text(encoding="utf-8")
    assert text.count("detector part scores of the B-scan shown") == 2  # one table per volume, not per frame
    assert "only the combined anomaly score" not in text
