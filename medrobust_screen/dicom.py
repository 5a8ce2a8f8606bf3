"""Read DICOM OCT files (single- or multi-frame) into model inputs, one B-scan at a time.

No TensorFlow: numpy, Pillow, ``pydicom`` (imported only when a DICOM file is met) and
``medrobust_screen.images`` -- the edge runtime uses this module.

Which files are screened
    An image SOP instance is screened when its SOP Class UID is Ophthalmic Tomography Image Storage
    (1.2.840.10008.5.1.4.1.1.77.1.5.4, what OCT devices export) or its Modality is ``OPT`` (e.g. an
    OCT B-scan exported as Secondary Capture).  Anything else -- a CT, a fundus photograph (``OP``),
    a DICOMDIR, a structured report -- is refused with a one-line reason naming the SOP class and
    modality (the caller turns it into an error row): the models have only seen retinal OCT.
    Pixel data must be present (``PixelData``; float pixel data is refused), 8 or 16 bits allocated,
    one grey sample (``MONOCHROME1``/``MONOCHROME2``) or three colour samples (``RGB``/``YBR_*``,
    8-bit).

Transfer syntaxes
    Uncompressed (implicit/explicit little endian, explicit big endian, deflated), RLE Lossless
    (pydicom's own decoder), JPEG Baseline/Extended 8-bit and JPEG 2000 (pydicom's Pillow plugin) work
    with the required packages.  JPEG Lossless, JPEG-LS and 12-bit JPEG need an extra decoder
    (``pip install pylibjpeg pylibjpeg-libjpeg``; GPL-3); without it such a file gets an error row that
    says so.

From stored values to the training preprocessing
    The training images are 8-bit grey JPEGs exported by the OCT devices: the grey levels a display
    showed.  A DICOM frame is turned into those same display grey levels, then goes through exactly the
    code path of an 8-bit grey JPEG (``medrobust_screen.images.to_model_input`` on a mode ``L`` image:
    centre square crop of the short edge, Pillow BOX resize with uint8 rounding, /255).  So a B-scan
    stored losslessly in DICOM gives the same float32 ``[s, s, 1]`` array, bit for bit, as the same
    B-scan saved as a JPEG file (up to the JPEG's own loss).  The display grey levels follow the DICOM
    grayscale pipeline (PS3.3 C.11, PS3.4 N.2), with pydicom's implementations:

    1. Modality LUT: ``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence
       (``pydicom.pixels.apply_modality_lut``).
    2. VOI: the first VOI LUT (``VOILUTSequence``) or else the first window (``WindowCenter``/
       ``WindowWidth``, with ``VOILUTFunction`` LINEAR, LINEAR_EXACT or SIGMOID)
       (``pydicom.pixels.apply_voi_lut``).  Its output range -- the window's (the modality output
       range, as pydicom computes it) or the LUT's ``2**bits - 1`` -- maps linearly to [0, 1], the
       window's lower end (and below) to 0.
       Without any VOI the whole range the stored values can take (from ``BitsStored`` and
       ``PixelRepresentation``, through the modality LUT) maps linearly to [0, 1] -- the full-scale
       rule ``medrobust_screen.images`` uses for 16-bit PNGs (a value's /65535) -- never a per-frame
       min/max, which would change contrast from frame to frame.  8-bit data without rescale or
       window is therefore used as is.
    3. ``MONOCHROME1`` (minimum = white) is inverted: grey = 1 - grey.  (``PresentationLUTShape`` is
       not read: OCT is ``MONOCHROME2``, and for ``MONOCHROME1`` it only restates the inversion.)
    4. grey in [0, 1] -> 8-bit: ``floor(grey * 255 + 0.5)``.  16-bit data thus loses its extra
       precision, like the devices' JPEG exports the models were trained on (and the int8 screening
       model quantises its input about that finely anyway).

    Rescale and window values are read, most specific first, from the frame's item of the Per-frame
    Functional Groups Sequence, the Shared Functional Groups Sequence (Pixel Value Transformation,
    Frame VOI LUT) and the top level of the dataset, as enhanced multi-frame objects such as OCT
    store them.  The stored-value -> grey mapping is computed once per distinct setting as a lookup
    table over every possible stored value (at most 65,536), then applied to each frame by indexing.
    Colour frames (pydicom converts YBR to RGB) become grey with Pillow's ITU-R 601-2 luma, as colour
    JPEGs do in training.

Identifiers
    ``DicomVolume.identifiers`` holds patient name, ID, birth date and study date only when asked
    (``keep_identifiers=True``); the SOP Instance UID (which names the object, not the patient) and
    the laterality are always kept.  pydicom's warnings are silenced while reading: they can quote
    header values, names included.

Errors
    File-level problems raise ``medrobust_screen.images.ImageError`` with a one-line reason (missing
    file, not DICOM, not OCT, no pixel data, unsupported pixel format or transfer syntax, frames
    smaller than ``MIN_SIDE`` or larger than ``MAX_PIXELS``).  A frame that cannot be decoded (corrupt
    compressed data, truncated file) is yielded as an ``ImageError`` in its place and the following
    frames are still read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image

from medrobust_screen.dicom_pixels import display_lut, first_item, frame_settings_of, settings_key
from medrobust_screen.images import MAX_PIXELS, MIN_SIDE, ImageError, is_image_filename, to_model_input

__all__ = [
    "DICOM_EXTENSIONS",
    "IDENTIFIER_FIELDS",
    "OPHTHALMIC_TOMOGRAPHY",
    "DicomVolume",
    "display_lut",
    "import_pydicom",
    "is_dicom_file",
    "open_volume",
]

#: SOP Class UID of Ophthalmic Tomography Image Storage (PS3.4 B.5), what OCT devices export.
OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
OCT_MODALITY = "OPT"
#: Folder entries with these extensions are screened as DICOM (so are files that start like DICOM).
DICOM_EXTENSIONS = (".dcm", ".dicom")
#: Output column -> DICOM keyword; written only with keep_identifiers.
IDENTIFIER_FIELDS = {"patient_name": "PatientName", "patient_id": "PatientID",
                     "patient_birth_date": "PatientBirthDate", "study_date": "StudyDate"}

#: DICOM files claiming more frames than this are refused (a corrupt header must not mean a billion rows).
MAX_FRAMES = 10_000
_PREAMBLE = 128
_MAGIC = b"DICM"
_DEFER = 64 * 1024  # values larger than this (the pixel data) are not read with the header
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def is_dicom_file(path) -> bool:
    """True for a ``.dcm``/``.dicom`` name or a file whose bytes 128..131 are ``DICM`` (PS3.10 preamble).

    Files with an image extension are sniffed too (a DICOM named explicitly as ``x.jpg`` is still
    DICOM); ``is_dicom_in_folder`` is the stricter rule for folder walks.  Never raises.
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE + len(_MAGIC))
    except OSError:
        return False
    return head[_PREAMBLE:] == _MAGIC


def is_dicom_in_folder(path) -> bool:
    """Folder-walk rule: DICOM unless it has an image extension (those are images) or is a DICOMDIR."""
    name = os.path.basename(os.fspath(path))
    return name.upper() != "DICOMDIR" and not is_image_filename(name) and is_dicom_file(path)


def import_pydicom():
    """pydicom with its pixel handlers, or None if it is not installed (imported on first use: ~0.5 s)."""
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401
    except ImportError:
        return None
    return pydicom


@dataclass
class DicomVolume:
    """One DICOM image object (an OCT volume or a single B-scan), header read, pixels not yet.

    ``frames`` B-scans of ``rows`` x ``columns``; ``iter_frames`` decodes them one at a time.
    ``series_instance_uid``, ``study_instance_uid`` ("" when absent) and ``instance_number`` (None when
    absent or not a number) let ``medrobust_screen.volume.plan_series`` group single-frame files.
    """

    path: str
    sop_instance_uid: str
    sop_class: str
    modality: str
    frames: int
    rows: int
    columns: int
    transfer_syntax: str
    laterality: str = ""
    identifiers: dict = field(default_factory=dict)
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    instance_number: int | None = None  # InstanceNumber; None when absent or not a number
    _ds: object = field(default=None, repr=False)
    truncated: bool = False  # native pixel data longer than what the file holds
    readable_frames: int = -1  # frames wholly inside a truncated native file (-1: all)
    _per_frame_settings: bool | None = field(default=None, repr=False)
    _shared_settings: object = field(default=None, repr=False)

    def frame_settings(self, index: int):
        """The pixel-module attributes in force for frame `index` (0-based), as a pydicom Dataset."""
        if self._per_frame_settings is None:  # computed once: do frames carry their own rescale/window?
            per_frame = self._ds.get("PerFrameFunctionalGroupsSequence") or []
            self._per_frame_settings = any(
                "PixelValueTransformationSequence" in item or "FrameVOILUTSequence" in item for item in per_frame)
        if self._per_frame_settings:
            return frame_settings_of(self._ds, index)
        if self._shared_settings is None:
            self._shared_settings = frame_settings_of(self._ds, 0)
        return self._shared_settings

    def iter_frames(self, image_size: int) -> Iterator[tuple[int, np.ndarray | ImageError]]:
        """Yield ``(frame_number, x)`` for every frame in file order; frame numbers start at 1.

        ``x`` is float32 ``[image_size, image_size, 1]`` in [0, 1] (see the module docstring), or an
        ``ImageError`` for a frame that cannot be decoded (the next frames are still tried).
        """
        for number, x, _ in self.iter_frames_with_display(image_size):
            yield number, x

    def iter_frames_with_display(self, image_size: int) -> Iterator[tuple[int, np.ndarray | ImageError,
                                                                         np.ndarray | None]]:
        """Like ``iter_frames``, yielding ``(frame_number, x, grey)``: ``grey`` is the frame's display
        grey levels (uint8 ``[rows, columns]`` or ``[rows, columns, 3]``, read-only, valid until the next
        frame; e.g. for a thumbnail), None when the frame could not be decoded."""
        for number, grey in self.iter_display_frames():
            if isinstance(grey, ImageError):
                yield number, grey, None
                continue
            try:  # uint8 [h, w] -> mode L, [h, w, 3] -> RGB
                x = to_model_input(Image.fromarray(grey), image_size)
            except ValueError as exc:
                yield number, ImageError(self.path, f"frame {number}: {exc}"), None
                continue
            yield number, x, grey

    def iter_display_frames(self) -> Iterator[tuple[int, np.ndarray | ImageError]]:
        """Yield ``(frame_number, grey)``: uint8 display grey levels ``[rows, columns]`` (or RGB
        ``[rows, columns, 3]``), or an ``ImageError`` for a frame that cannot be decoded."""
        pydicom = import_pydicom()
        luts: dict = {}
        start = 0
        stop = self.frames if self.readable_frames < 0 else self.readable_frames
        while start < stop:
            index = start
            frames = pydicom.pixels.iter_pixels(self.path, indices=range(start, stop),
                                                view_only=True)  # read-only arrays: no copy
            try:
                while True:
                    with warnings.catch_warnings():  # not around the yield: the caller's code runs there
                        warnings.simplefilter("ignore")
                        arr = next(frames, None)
                        if arr is None:
                            break
                        grey = self._display(arr, index, luts)
                    index += 1
                    yield index, grey
            except ImageError as exc:
                yield index + 1, exc
            except (Exception, MemoryError) as exc:  # any decoder failure becomes this frame's error
                why = "the file is truncated: it ends inside the pixel data" if self.truncated else _describe(exc)
                yield index + 1, ImageError(self.path, f"frame {index + 1}: cannot decode ({why})")
            else:
                break
            finally:
                frames.close()
            start = index + 1  # restart after the bad frame
        else:
            index = start
        why = ("the file is truncated: it ends inside the pixel data" if self.truncated
               else "missing from the pixel data")
        for missing in range(index + 1, self.frames + 1):  # fewer frames than Number of Frames
            yield missing, ImageError(self.path, f"frame {missing}: {why}")

    def _display(self, arr: np.ndarray, index: int, luts: dict) -> np.ndarray:
        expected = (self.rows, self.columns) + ((3,) if arr.ndim == 3 else ())
        if arr.shape != expected:
            raise ImageError(self.path, f"frame {index + 1}: decoded shape {arr.shape}, expected {expected}")
        if arr.ndim == 3:  # colour: already RGB uint8
            return np.ascontiguousarray(arr, np.uint8)
        settings = self.frame_settings(index)
        key = settings_key(settings)
        if key not in luts:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    luts[key] = display_lut(settings)
            except (ValueError, NotImplementedError, TypeError, AttributeError, KeyError, IndexError) as exc:
                luts[key] = ImageError(self.path, f"frame {index + 1}: unusable rescale/window/LUT "
                                                  f"({_describe(exc)})")
        lut = luts[key]
        if isinstance(lut, ImageError):
            raise lut
        table, low = lut
        if table is None:  # identity on 8-bit unsigned data
            return np.ascontiguousarray(arr, np.uint8)
        idx = np.clip(arr.astype(np.int64, copy=False), low, low + len(table) - 1) - low
        return table[idx]


def open_volume(path, keep_identifiers: bool = False) -> DicomVolume:
    """Read a DICOM file's header and check it is a screenable OCT image; ImageError otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(path, "file not found")
    if os.path.isdir(path):
        raise ImageError(path, "is a directory, not a DICOM file")
    if os.path.getsize(path) == 0:
        raise ImageError(path, "empty file (0 bytes)")
    pydicom = import_pydicom()
    if pydicom is None:
        raise ImageError(path, "DICOM file, but pydicom is not installed (pip install 'pydicom>=3.0,<3.1')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, defer_size=_DEFER)
    except pydicom.errors.InvalidDicomError:
        raise ImageError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except (Exception, MemoryError) as exc:
        raise ImageError(path, f"unreadable DICOM header ({_describe(exc)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _check(path, ds, keep_identifiers)
    except ImageError:
        raise
    except Exception as exc:  # a malformed value somewhere in the header
        raise ImageError(path, f"malformed DICOM header ({_describe(exc)})") from None


def _check(path: str, ds, keep_identifiers: bool) -> DicomVolume:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    modality = str(ds.get("Modality", "") or "")
    sop_name = UID(sop_class).name if sop_class else "no SOP Class UID"
    if sop_class != OPHTHALMIC_TOMOGRAPHY and modality.upper() != OCT_MODALITY:
        raise ImageError(path, f"not an OCT image: {sop_name}, Modality {modality or 'missing'}; medrobust "
                               "screens retinal OCT (Ophthalmic Tomography Image Storage or Modality OPT) only")
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        raise ImageError(path, f"{'float pixel data is not supported' if other else 'no pixel data'} "
                               f"({sop_name})")
    tsyntax = meta.get("TransferSyntaxUID") if meta else None
    if not tsyntax:
        raise ImageError(path, "no Transfer Syntax UID in the file meta information")
    decoder = get_decoder(tsyntax) if _decodable(tsyntax) else None
    if decoder is None or not decoder.is_available:
        hint = "; ".join(getattr(decoder, "missing_dependencies", [])) if decoder is not None else ""
        raise ImageError(path, f"transfer syntax {UID(tsyntax).name} cannot be decoded here"
                               + (f" (needs one of: {hint}; e.g. pip install 'medrobust[dicom-lossless]')"
                                  if hint else ""))
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            raise ImageError(path, f"no {keyword} in the image pixel module")
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if samples == 1 and photometric not in _GREY:
        raise ImageError(path, f"unsupported photometric interpretation {photometric!r} for one sample")
    if samples == 3 and (photometric not in _COLOUR or bits_allocated != 8):
        raise ImageError(path, f"unsupported colour pixels: {photometric} {bits_allocated}-bit")
    if samples not in (1, 3):
        raise ImageError(path, f"unsupported samples per pixel: {samples}")
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise ImageError(path, f"unsupported bit depth: {bits_stored} stored of {bits_allocated} allocated "
                               "(8 or 16 allocated)")
    if rows < MIN_SIDE or columns < MIN_SIDE:
        raise ImageError(path, f"too small: {columns}x{rows} (minimum {MIN_SIDE}x{MIN_SIDE})")
    if rows * columns > MAX_PIXELS:
        raise ImageError(path, f"too large: {columns}x{rows} = {rows * columns} pixels per frame "
                               f"> MAX_PIXELS = {MAX_PIXELS}")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        raise ImageError(path, f"Number of Frames is not a number: {frames!r}") from None
    if frames < 1:
        raise ImageError(path, f"Number of Frames is {frames}")
    if frames > MAX_FRAMES:
        raise ImageError(path, f"Number of Frames is {frames} > MAX_FRAMES = {MAX_FRAMES}")
    truncated, readable = False, -1
    if not ds["PixelData"].is_undefined_length:  # native: compare the frames' size with the file's
        frame_bytes = rows * columns * samples * bits_allocated // 8
        start = getattr(ds["PixelData"], "file_tell", None)
        if start is not None and os.path.getsize(path) - start < frames * frame_bytes:
            # the element header (8 or 12 bytes) is counted as data here: at worst one frame too many is
            # tried, and that one fails to decode like any bad frame
            truncated, readable = True, min(frames, (os.path.getsize(path) - start) // frame_bytes)
    identifiers = {}
    if keep_identifiers:
        identifiers = {column: str(ds.get(keyword, "") or "") for column, keyword in IDENTIFIER_FIELDS.items()}
    return DicomVolume(path=path, sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""), sop_class=sop_name,
                       modality=modality, frames=frames, rows=rows, columns=columns,
                       transfer_syntax=UID(tsyntax).name, laterality=_laterality(ds),
                       identifiers=identifiers, series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                       study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
                       instance_number=_instance_number(ds), truncated=truncated,
                       readable_frames=readable, _ds=ds)


def _instance_number(ds) -> int | None:
    value = ds.get("InstanceNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _decodable(tsyntax) -> bool:
    from pydicom.pixels import get_decoder

    try:
        get_decoder(tsyntax)
    except NotImplementedError:
        return False
    return True


def _laterality(ds) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = ds.get(keyword)
        if value:
            return str(value).strip()
    shared = first_item(ds.get("SharedFunctionalGroupsSequence"))
    anatomy = first_item(shared.get("FrameAnatomySequence")) if shared is not None else None
    if anatomy is not None and anatomy.get("FrameLaterality"):
        return str(anatomy.FrameLaterality).strip()
    return ""


def _describe(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
