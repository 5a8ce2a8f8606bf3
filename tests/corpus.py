"""The bad-input corpus: every kind of broken or odd input a clinic's files can hold, generated on the fly.

FILE_KINDS are single image files dropped into an otherwise good class folder; each says what every
command must do with it: "skip" (reported by name with the reason, the run goes on) or "convert"
(documented conversion in medrobust.data.images, the image is used). DATASET_KINDS break a whole
dataset argument; every command must stop with a one-line error naming the file or folder.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)


def _oct_like(size=(64, 48)) -> Image.Image:
    """A grey image with a bright band, enough to be a valid scan for the loaders."""
    w, h = size
    a = (rng.random((h, w)) * 60).astype(np.uint8)
    a[h // 2: h // 2 + 6] = 220
    return Image.fromarray(a, "L")


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def truncated_jpeg(folder: Path) -> Path:
    p = folder / "truncated.jpeg"
    data = _jpeg_bytes(_oct_like((256, 256)))
    p.write_bytes(data[: len(data) // 2])
    return p


def zero_byte(folder: Path) -> Path:
    p = folder / "empty.jpeg"
    p.write_bytes(b"")
    return p


def text_named_jpeg(folder: Path) -> Path:
    p = folder / "notes.jpeg"
    p.write_text("patient asked to rescan; this is not an image\n")
    return p


def one_pixel(folder: Path) -> Path:
    p = folder / "tiny.png"
    Image.new("L", (1, 1), 128).save(p)
    return p


def decompression_bomb(folder: Path) -> Path:
    p = folder / "bomb.png"
    Image.new("L", (9000, 6000), 0).save(p, optimize=False)  # 54 Mpixel > MAX_PIXELS, ~60 kB on disk
    return p


def png_with_alpha(folder: Path) -> Path:
    p = folder / "alpha.png"
    img = _oct_like().convert("RGBA")
    img.putalpha(200)
    img.save(p)
    return p


def png_16bit(folder: Path) -> Path:
    p = folder / "deep.png"
    a = (np.asarray(_oct_like(), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(a).save(p)  # mode I;16
    return p


def cmyk_jpeg(folder: Path) -> Path:
    p = folder / "print.jpeg"
    p.write_bytes(_jpeg_bytes(_oct_like().convert("CMYK")))
    return p


def animated_gif(folder: Path) -> Path:
    p = folder / "cine.gif"
    frames = [_oct_like(), _oct_like()]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return p


def mixed_case_extension(folder: Path) -> Path:
    p = folder / "SCAN-1-1.JpEg"
    p.write_bytes(_jpeg_bytes(_oct_like()))
    return p


def non_ascii_name(folder: Path) -> Path:
    p = folder / "Ünïcødé-扫描-1.jpeg"
    p.write_bytes(_jpeg_bytes(_oct_like()))
    return p


def wrong_size_rgb(folder: Path) -> Path:
    p = folder / "wide-rgb.png"
    _oct_like((300, 97)).convert("RGB").save(p)
    return p


FILE_KINDS = {  # kind -> (builder, expected handling, what the reason must mention)
    "truncated JPEG": (truncated_jpeg, "skip", "truncated or corrupt"),
    "zero-byte file": (zero_byte, "skip", "empty file"),
    "text file named .jpeg": (text_named_jpeg, "skip", "not an image"),
    "1x1 image": (one_pixel, "skip", "too small"),
    "decompression bomb (54 Mpixel)": (decompression_bomb, "skip", "too large"),
    "PNG with alpha": (png_with_alpha, "convert", None),
    "16-bit grayscale PNG": (png_16bit, "convert", None),
    "CMYK JPEG": (cmyk_jpeg, "convert", None),
    "animated GIF": (animated_gif, "convert", None),
    "mixed-case extension": (mixed_case_extension, "convert", None),
    "non-ASCII file name": (non_ascii_name, "convert", None),
    "odd size, RGB": (wrong_size_rgb, "convert", None),
}


def good_folder(root: Path, per_class: int = 6, splits=("train", "test")) -> Path:
    from medrobust.classes import CLASSES

    for split in splits:
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (d / f"{c}-{100 + i}-{i}.jpeg").write_bytes(_jpeg_bytes(_oct_like()))
    return root


def folder_with_every_bad_file(root: Path) -> tuple[Path, dict[str, Path]]:
    """A Kermany-style train/test folder with one of each FILE_KINDS in train/CNV and test/DME."""
    good_folder(root)
    made = {}
    for kind, (build, _, _) in FILE_KINDS.items():
        made[kind] = build(root / "train" / "CNV")
        build(root / "test" / "DME")
    (root / "train" / "OTHER").mkdir()  # unknown class folder
    _oct_like().save(root / "train" / "OTHER" / "x.png")
    return root, made


# Whole-dataset problems: kind -> builder(tmp) -> the path to pass as --data, and words the error must hold.
def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _images(n=8, dtype=np.uint8, fill=None):
    a = np.zeros((n, 28, 28), dtype) if fill is None else np.full((n, 28, 28), fill, dtype)
    return a


DATASET_KINDS = {
    "folder with no images": (lambda t: (t / "empty_ds").mkdir() or (t / "empty_ds"), "no class folders"),
    "class folders but no loadable images": (
        lambda t: (text_named_jpeg((t / "bad_ds" / "CNV").mkdir(parents=True) or (t / "bad_ds" / "CNV")),
                   t / "bad_ds")[1], "no loadable images"),
    ".npz missing keys": (lambda t: _npz(t / "nokeys.npz", train_images=_images()), "missing arrays"),
    ".npz with NaN/Inf": (lambda t: _npz(t / "nan.npz", train_images=_images(dtype=np.float32, fill=np.nan),
                                         train_labels=np.zeros(8, np.uint8), test_images=_images(),
                                         test_labels=np.zeros(8, np.uint8)), "NaN"),
    ".npz wrong dtype": (lambda t: _npz(t / "dtype.npz", train_images=_images(dtype=np.complex64),
                                        train_labels=np.zeros(8, np.uint8), test_images=_images(),
                                        test_labels=np.zeros(8, np.uint8)), "dtype"),
    "text file named .npz": (lambda t: (t / "fake.npz").write_text("hello") and (t / "fake.npz"), "not a readable .npz"),
}
