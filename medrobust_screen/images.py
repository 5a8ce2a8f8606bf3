"""Decode one image file into the model's input array (numpy + Pillow only).

This module must not import TensorFlow: it runs on devices that have only
numpy and Pillow (medrobust-screen), and the training side (medrobust.data)
uses it too, so a scan gets the same preprocessing in training and on the device.

Preprocessing (``to_model_input``) follows how OCTMNIST was made from the
Kermany OCT2017 scans (MedMNIST v2: "center-crop the images with a window size
of length of the short edge and resize them"), so a model trained on OCTMNIST
sees the same kind of input when it is given a real JPEG:

1. EXIF orientation is applied (``ImageOps.exif_transpose``).
2. The pixels become one grey channel:

   * ``L`` is used as is; ``1``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ... are
     converted with Pillow's ``convert("L")`` (ITU-R 601-2 luma).
   * Images with alpha (``RGBA``, ``LA``, ``PA``, or ``P``/``L``/``RGB`` with a
     ``transparency`` entry) are **composited on black**: ``grey * alpha / 255``,
     so fully transparent pixels become 0 (the background of an OCT B-scan).
   * 16-bit images (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer
     ``I`` images (how Pillow often presents 16-bit PNG/TIFF) are treated as
     16-bit data: clipped to [0, 65535] and divided by 65535.
   * ``F`` (32-bit float) and other modes Pillow cannot turn into grey are
     refused.
3. A centred square whose side is the short edge is cropped (for an odd
   difference the extra pixel goes to the right/bottom margin).
4. The square is resized to ``image_size`` x ``image_size`` with Pillow's
   ``BOX`` filter (area averaging: every source pixel contributes equally, an
   antialiasing filter for downscaling, no overshoot or ringing; when
   upscaling it is equivalent to nearest neighbour).  8-bit images are resized
   in mode ``L``, so the result is rounded to uint8 like the stored OCTMNIST
   arrays, then divided by 255.  16-bit images are resized in float.
5. The result is float32 ``[image_size, image_size, 1]`` in [0, 1]; it cannot
   contain NaN or infinities.

``load_image`` adds the file handling and turns every failure into an
``ImageError`` with a one-line reason (missing, empty, not an image, truncated or
corrupt data, too large, too small, unsupported pixel mode).  It decodes only the
first frame of an animated GIF or multi-page TIFF, refuses images larger than
``MAX_PIXELS`` before decoding them, forces a full decode with ``img.load()`` and
never changes Pillow's global settings (e.g. ``ImageFile.LOAD_TRUNCATED_IMAGES``).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageError",
    "is_image_filename",
    "load_image",
    "load_image_bytes",
    "to_model_input",
]

#: File name extensions the folder loaders treat as images (matched case-insensitively).
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif")

#: Decompression-bomb guard: images with more pixels than this are refused
#: (from the header, before any pixel data is decoded).
MAX_PIXELS = 50_000_000

#: Images whose width or height is below this are refused as "too small".
MIN_SIDE = 8

#: Pillow decoders that ``load_image`` may use.  Restricting the list keeps
#: exotic plugins (e.g. EPS, which runs Ghostscript) away from untrusted files;
#: GIF is allowed for animated GIFs.  (Camera JPEGs holding several pictures come
#: back as "MPO" images through the JPEG opener; some Pillow versions also register
#: "MPO" on its own.)  Names this Pillow does not register are dropped at call time.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "DIB", "TIFF", "GIF")

_RESAMPLE = Image.Resampling.BOX
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112
_MAX_REASON_CHARS = 300


class ImageError(ValueError):
    """An image file that cannot be turned into model input.

    ``.path`` is the file (as a string), ``.reason`` a one-line description;
    ``str(err)`` is ``"<path>: <reason>"``.
    """

    def __init__(self, path, reason: str):
        self.path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # keep it picklable (e.g. across multiprocessing)
        return (type(self), (self.path, self.reason))


def is_image_filename(name) -> bool:
    """True if ``name`` ends with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _describe(exc: BaseException) -> str:
    msg = _one_line(str(exc))
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _check_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise TypeError(f"image_size must be an int, got {image_size!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return int(image_size)


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF block: keep the stored orientation
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )


def _to_grey_8bit(img: Image.Image) -> Image.Image:
    """Any non-16-bit image -> mode ``L`` (alpha composited on black)."""
    if img.mode == "L" and "transparency" not in img.info:
        return img
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        grey = rgba.convert("L")
        black = Image.new("L", rgba.size, 0)
        return Image.composite(grey, black, rgba.getchannel("A"))
    try:
        return img.convert("L")
    except ValueError:
        try:
            return img.convert("RGB").convert("L")
        except ValueError:
            raise ValueError(f"unsupported pixel mode {img.mode!r}") from None


def to_model_input(img: Image.Image, image_size: int) -> np.ndarray:
    """Preprocess a decoded Pillow image into float32 ``[image_size, image_size, 1]`` in [0, 1].

    Steps (see the module docstring): EXIF orientation, grey (alpha composited
    on black, 16-bit scaled by 65535), centre square crop of the short edge,
    Pillow ``BOX`` (area) resize, /255.  Uses the image's current frame.
    Raises ``ValueError`` for a pixel mode that cannot be made grey (e.g. ``F``)
    or an empty image; ``load_image`` turns these into ``ImageError``.
    """
    size = _check_size(image_size)
    img = _apply_exif_orientation(img)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image: {w}x{h}")
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)

    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img)
        arr = np.clip(arr.astype(np.float32), 0.0, 65535.0) / np.float32(65535.0)
        small = Image.fromarray(arr).resize((size, size), _RESAMPLE, box=box)
        out = np.asarray(small, dtype=np.float32)
    elif img.mode == "F":
        raise ValueError("unsupported pixel mode 'F' (32-bit float)")
    else:
        grey = _to_grey_8bit(img)
        small = grey.resize((size, size), _RESAMPLE, box=box)
        out = np.asarray(small, dtype=np.float32) / np.float32(255.0)

    out = np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
    return out.reshape(size, size, 1)


def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers all plugins once; cheap afterwards
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _decode(source, path_str: str, size: int) -> np.ndarray:
    """Open ``source`` (path or binary file object) and preprocess it; ImageError on failure."""
    formats = _open_formats()
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than fails) between MAX_IMAGE_PIXELS and twice that.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(
                        path_str,
                        f"too large: {w}x{h} = {w * h} pixels > MAX_PIXELS = {MAX_PIXELS}",
                    )
                if w < MIN_SIDE or h < MIN_SIDE:
                    raise ImageError(
                        path_str, f"too small: {w}x{h} (minimum {MIN_SIDE}x{MIN_SIDE})"
                    )
                try:
                    img.load()  # full decode of the first frame: truncation is detected here
                except ImageError:
                    raise
                except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                    raise ImageError(path_str, f"too large: {_describe(exc)}") from None
                except MemoryError:
                    raise ImageError(path_str, f"too large to decode in memory: {w}x{h}") from None
                except Exception as exc:
                    raise ImageError(
                        path_str, f"truncated or corrupt image data ({_describe(exc)})"
                    ) from None
                try:
                    return to_model_input(img, size)
                except ValueError as exc:
                    raise ImageError(path_str, _one_line(str(exc))) from None
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            path_str,
            "not an image: Pillow cannot identify the format "
            f"(supported: {', '.join(formats)})",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path_str, f"too large: {_describe(exc)}") from None
    except FileNotFoundError:
        raise ImageError(path_str, "file not found") from None
    except PermissionError as exc:
        raise ImageError(path_str, f"cannot read file ({_describe(exc)})") from None
    except MemoryError:
        raise ImageError(path_str, "too large to decode in memory") from None
    except Exception as exc:  # any other Pillow/plugin failure: never escape raw
        # e.g. OSError("Truncated File Read") while parsing the header, SyntaxError
        # ("broken PNG file"), struct.error, zlib.error ...
        raise ImageError(path_str, f"truncated or corrupt image data ({_describe(exc)})") from None


def load_image(path, image_size: int) -> np.ndarray:
    """Read an image file and return float32 ``[image_size, image_size, 1]`` in [0, 1].

    Raises ``ImageError`` (a ``ValueError``) with a one-line reason for a missing
    or empty file, a directory, a file that is not an image, truncated or
    corrupt data, an image with more than ``MAX_PIXELS`` pixels or a side below
    ``MIN_SIDE``, or an unsupported pixel mode.  Raises ``TypeError`` /
    ``ValueError`` (not ``ImageError``) for a bad ``image_size``.
    """
    size = _check_size(image_size)
    path_str = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    try:
        st = os.stat(path_str)
    except FileNotFoundError:
        raise ImageError(path_str, "file not found") from None
    except OSError as exc:
        raise ImageError(path_str, f"cannot access file ({_describe(exc)})") from None
    if os.path.isdir(path_str):
        raise ImageError(path_str, "is a directory, not an image file")
    if st.st_size == 0:
        raise ImageError(path_str, "empty file (0 bytes)")
    return _decode(path_str, path_str, size)


def load_image_bytes(data: bytes, image_size: int, name: str = "<bytes>") -> np.ndarray:
    """Like ``load_image`` for an encoded image held in memory (e.g. an upload).

    ``name`` is used as the ``ImageError`` path.
    """
    size = _check_size(image_size)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError(name, "empty file (0 bytes)")
    return _decode(io.BytesIO(bytes(data)), str(name), size)
