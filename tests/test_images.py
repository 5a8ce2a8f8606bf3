"""Tests for medrobust.data.images (fixtures are generated with Pillow/numpy in tmp_path)."""

from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from medrobust.data import images
from medrobust.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    is_image_filename,
    load_image,
    load_image_bytes,
    to_model_input,
)

SIZE = 28


def _check_output(x: np.ndarray, size: int = SIZE) -> None:
    assert x.shape == (size, size, 1)
    assert x.dtype == np.float32
    assert np.all(np.isfinite(x))
    assert x.min() >= 0.0 and x.max() <= 1.0


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _expect_error(path, *fragments: str, size: int = SIZE) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path, size)
    err = info.value
    text = str(err)
    assert "\n" not in text
    assert Path(path).name in text
    assert err.path == str(path)
    assert text == f"{err.path}: {err.reason}"
    for frag in fragments:
        assert frag in err.reason.lower(), (frag, err.reason)
    return err


# --------------------------------------------------------------------------- good images


def test_grayscale_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(60, 200, size=(96, 128), dtype=np.uint8)
    p = _save(Image.fromarray(arr), tmp_path / "scan.jpeg", quality=95)
    x = load_image(p, SIZE)
    _check_output(x)
    assert abs(float(x.mean()) - arr.mean() / 255.0) < 0.02


def test_accepts_pathlike_and_str(tmp_path):
    p = _save(Image.new("L", (32, 32), 128), tmp_path / "g.png")
    a, b = load_image(p, 16), load_image(str(p), 16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, 128 / 255.0, atol=1e-6)


def test_rgb_png_to_luma(tmp_path):
    p = _save(Image.new("RGB", (40, 30), (255, 0, 0)), tmp_path / "red.png")
    x = load_image(p, SIZE)
    _check_output(x)
    # ITU-R 601-2 luma of pure red: 0.299 * 255 = 76.2 -> 76
    np.testing.assert_allclose(x, 76 / 255.0, atol=1 / 255.0)


def test_rgba_png_alpha_composited_on_black(tmp_path):
    arr = np.zeros((32, 64, 4), np.uint8)
    arr[..., :3] = 255  # white everywhere
    arr[:, :32, 3] = 0  # left half fully transparent
    arr[:, 32:, 3] = 255  # right half opaque
    p = _save(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png")
    x = load_image(p, 8)
    _check_output(x, 8)
    # centre crop = columns 16..48: transparent white -> black, opaque white -> white
    assert x[:, :3].max() < 0.01
    assert x[:, -3:].min() > 0.99

    half = np.full((20, 20, 4), 255, np.uint8)
    half[..., 3] = 128
    q = _save(Image.fromarray(half, "RGBA"), tmp_path / "half.png")
    np.testing.assert_allclose(load_image(q, 8), 128 / 255.0, atol=1 / 255.0)


def test_16bit_png_scaled_by_65535(tmp_path):
    arr = np.full((20, 24), 1000, np.uint16)
    arr[:, :12] = 50000
    p = _save(Image.fromarray(arr), tmp_path / "deep.png")
    with Image.open(p) as im:
        assert im.mode == "I;16"
    x = load_image(p, 2)
    _check_output(x, 2)
    # centre crop 20x20 = columns 2..22 -> left output column 50000, right 1000
    np.testing.assert_allclose(x[:, 0, 0], 50000 / 65535.0, rtol=1e-5)
    np.testing.assert_allclose(x[:, 1, 0], 1000 / 65535.0, rtol=1e-5)
    # not /255 (that would saturate at 1)
    assert x.max() < 0.8


def test_32bit_int_mode_treated_as_16bit():
    arr = np.full((16, 16), 70000, np.int32)
    arr[:8] = 6553
    x = to_model_input(Image.fromarray(arr, "I"), 2)
    np.testing.assert_allclose(x[0, :, 0], 6553 / 65535.0, rtol=1e-5)
    np.testing.assert_allclose(x[1, :, 0], 1.0)  # clipped to the 16-bit range


def test_cmyk_jpeg(tmp_path):
    p = _save(Image.new("CMYK", (30, 30), (0, 0, 0, 0)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    x = load_image(p, SIZE)
    _check_output(x)
    assert x.min() > 0.95  # CMYK (0,0,0,0) is white
    q = _save(Image.new("CMYK", (30, 30), (0, 0, 0, 255)), tmp_path / "cmyk_black.jpg")
    assert load_image(q, SIZE).max() < 0.05


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("L", (16, 16), v) for v in (200, 10, 90)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=40, loop=0)
    with Image.open(p) as im:
        assert getattr(im, "n_frames", 1) > 1
    x = load_image(p, 8)
    _check_output(x, 8)
    np.testing.assert_allclose(x, 200 / 255.0, atol=2 / 255.0)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (16, 16), 1)
    img.putpalette([255, 255, 255] * 2 + [0, 0, 0] * 254)
    p = _save(img, tmp_path / "pal.png", transparency=1)
    x = load_image(p, 8)
    _check_output(x, 8)
    assert x.max() < 0.01  # white but fully transparent -> black


def test_centre_crop_takes_the_centre(tmp_path):
    # wide: white left/right borders, black centre square
    wide = np.full((40, 120), 255, np.uint8)
    wide[:, 40:80] = 0
    x = load_image(_save(Image.fromarray(wide), tmp_path / "wide.png"), SIZE)
    assert x.max() < 0.01
    # tall: white top/bottom borders, black centre
    x = load_image(_save(Image.fromarray(np.ascontiguousarray(wide.T)), tmp_path / "tall.png"), SIZE)
    assert x.max() < 0.01
    # same with JPEG artefacts
    x = load_image(_save(Image.fromarray(wide), tmp_path / "wide.jpeg", quality=95), SIZE)
    assert x.mean() < 0.05
    # and the inverse: only the centre is white
    inv = 255 - wide
    x = load_image(_save(Image.fromarray(inv), tmp_path / "inv.png"), SIZE)
    assert x.min() > 0.99


def test_exif_orientation_applied(tmp_path):
    # stored 20 wide x 40 high, top half white; orientation 6 = rotate 90 deg clockwise
    # to display, so the displayed image is 40x20 with the white half on the right.
    arr = np.zeros((40, 20), np.uint8)
    arr[:20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(Image.fromarray(arr), tmp_path / "rot.jpeg", exif=exif, quality=95)
    x = load_image(p, 8)[..., 0]
    assert x[:, :3].mean() < 0.1 and x[:, -3:].mean() > 0.9
    # without the tag the centre crop would be white on top, black below
    q = _save(Image.fromarray(arr), tmp_path / "plain.jpeg", quality=95)
    y = load_image(q, 8)[..., 0]
    assert y[:3].mean() > 0.9 and y[-3:].mean() < 0.1


def test_upscales_small_but_valid_image(tmp_path):
    p = _save(Image.new("L", (8, 10), 30), tmp_path / "small.bmp")
    x = load_image(p, 64)
    _check_output(x, 64)
    np.testing.assert_allclose(x, 30 / 255.0, atol=1e-6)


def test_tiff_and_mixed_case_and_non_ascii_name(tmp_path):
    p = _save(Image.new("L", (16, 16), 77), tmp_path / "Scän_Ωmega.TIFF")
    np.testing.assert_allclose(load_image(p, 4), 77 / 255.0, atol=1e-6)


def test_to_model_input_matches_load_image(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(50, 70), dtype=np.uint8)
    p = _save(Image.fromarray(arr), tmp_path / "a.png")
    with Image.open(p) as im:
        direct = to_model_input(im, SIZE)
    np.testing.assert_array_equal(direct, load_image(p, SIZE))
    # same as an explicit centre crop + BOX resize in mode L
    ref = Image.fromarray(arr[:, 10:60]).resize((SIZE, SIZE), Image.Resampling.BOX)
    np.testing.assert_array_equal(direct[..., 0], np.asarray(ref, np.float32) / 255.0)


def test_load_image_bytes(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (20, 20), 100).save(buf, format="PNG")
    np.testing.assert_allclose(load_image_bytes(buf.getvalue(), 5), 100 / 255.0, atol=1e-6)
    with pytest.raises(ImageError, match="upload.jpeg: not an image"):
        load_image_bytes(b"not an image at all", 5, name="upload.jpeg")
    with pytest.raises(ImageError, match="empty"):
        load_image_bytes(b"", 5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "28", True])
def test_bad_image_size(tmp_path, bad):
    p = _save(Image.new("L", (16, 16)), tmp_path / "g.png")
    with pytest.raises((TypeError, ValueError)) as info:
        load_image(p, bad)
    assert not isinstance(info.value, ImageError)


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.jpeg", "not found")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpeg"
    p.write_bytes(b"")
    _expect_error(p, "empty", "0 bytes")


def test_text_file_named_jpeg(tmp_path):
    p = tmp_path / "notes.jpeg"
    p.write_text("this is a README, not a scan\n")
    _expect_error(p, "not an image")


def test_directory(tmp_path):
    d = tmp_path / "folder.jpeg"
    d.mkdir()
    _expect_error(d, "directory")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    good = _save(Image.fromarray(arr), tmp_path / "good.jpeg", quality=90)
    data = good.read_bytes()
    p = tmp_path / "cut.jpeg"
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p, "truncated")
    # the global Pillow switch was not touched
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (32, 32), 9).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[-20:-12] = b"\x00" * 8  # damage the end of the IDAT chunk / its CRC
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    err = _expect_error(p)
    assert "corrupt" in err.reason or "truncated" in err.reason


def test_one_pixel_image(tmp_path):
    p = _save(Image.new("L", (1, 1), 0), tmp_path / "dot.png")
    err = _expect_error(p, "too small: 1x1")
    assert err.reason.startswith("too small: 1x1")


def test_thin_image_is_too_small(tmp_path):
    p = _save(Image.new("L", (200, 5), 0), tmp_path / "thin.png")
    _expect_error(p, "too small: 200x5")


def test_oversized_refused_before_decoding(tmp_path, monkeypatch):
    p = _save(Image.new("L", (40, 30), 0), tmp_path / "huge.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    calls = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    err = _expect_error(p, "too large", "40x30")
    assert "1000" in err.reason
    assert calls == []  # never decoded


def test_pillow_decompression_bomb_is_image_error(tmp_path, monkeypatch):
    p = _save(Image.new("L", (40, 30), 0), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # warning above 500, error above 1000
    _expect_error(p, "too large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 px: only Pillow's warning
    _expect_error(p, "too large")


def test_unsupported_float_mode(tmp_path):
    p = _save(Image.fromarray(np.full((16, 16), 0.5, np.float32)), tmp_path / "float.tiff")
    _expect_error(p, "unsupported pixel mode")


def test_image_error_is_value_error_and_picklable():
    err = ImageError("a/b.jpeg", "truncated\nor corrupt")
    assert isinstance(err, ValueError)
    assert str(err) == "a/b.jpeg: truncated or corrupt"
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


def test_is_image_filename():
    for name in ("a.jpeg", "b.JPG", "c.Jpeg", "d.png", "e.BMP", "f.tif", "g.TIFF", "h.gif"):
        assert is_image_filename(name)
    for name in ("README", "MANIFEST.sha256", ".DS_Store", "x.txt", "y.webp", "jpeg"):
        assert not is_image_filename(name)
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- property tests


def _small_jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


_JPEG = _small_jpeg_bytes()
_FUZZ = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load_or_image_error(path: Path) -> None:
    try:
        x = load_image(path, 8)
    except ImageError as err:
        assert "\n" not in str(err) and err.reason
    else:
        _check_output(x, 8)


@_FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_only_raise_image_error(tmp_path, data):
    p = tmp_path / "fuzz.jpeg"
    p.write_bytes(data)
    _load_or_image_error(p)


@_FUZZ
@given(
    cut=st.integers(min_value=0, max_value=len(_JPEG)),
    flips=st.lists(
        st.tuples(st.integers(0, len(_JPEG) - 1), st.integers(0, 255)), max_size=8
    ),
)
def test_damaged_jpeg_only_raises_image_error(tmp_path, cut, flips):
    data = bytearray(_JPEG)
    for pos, val in flips:
        data[pos] = val
    p = tmp_path / "damaged.jpeg"
    p.write_bytes(bytes(data[:cut]))
    _load_or_image_error(p)


# --------------------------------------------------------------------------- edge runtime


def test_no_tensorflow_import_in_data_loaders():
    from medrobust.data import folders  # images.py is medrobust_screen's (the device package) since issue 24

    for path in (Path(images.__file__), Path(folders.__file__)):
        name = path.name
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                assert top not in {"tensorflow", "keras", "tf_keras", "torch"}, (name, mod)
