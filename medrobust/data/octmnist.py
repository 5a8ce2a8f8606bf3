"""OCTMNIST (MedMNIST v2/v3) from its official Zenodo record, MD5-checked.

OCTMNIST holds Kermany OCT2017 B-scans, centre-cropped to the short edge and resized
to 28x28 (or 64/128/224 in MedMNIST+). Labels: 0 CNV, 1 DME, 2 DRUSEN, 3 NORMAL.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

RECORD = "https://zenodo.org/records/10519652/files"
# size -> (file name, md5), from MedMNIST's own info.py.
FILES = {
    28: ("octmnist.npz", "c68d92d5b585d8d81f7112f81e2d0842"),
    64: ("octmnist_64.npz", "e229e9440236b774d9f0dfef9d07bdaf"),
    128: ("octmnist_128.npz", "0a97e76651ace45c5d943ee3f65b63ae"),
    224: ("octmnist_224.npz", "abc493b6d529d5de7569faaef2773ba3"),
}
SPLITS = ("train", "val", "test")
CACHE_SUBDIR = "datasets/medrobust"  # under the Keras home, beside keras.datasets' files


def native_size(image_size: int) -> int:
    """The smallest OCTMNIST release at least as large as image_size (resized down if needed)."""
    for size in sorted(FILES):
        if size >= image_size:
            return size
    return max(FILES)


def keras_cache_dir() -> Path:
    """Where keras.utils.get_file keeps our downloads: $KERAS_HOME (or ~/.keras) / datasets/medrobust."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser() / CACHE_SUBDIR


def md5sum(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_local(image_size: int, data_dir: str | os.PathLike | None = None,
               corrupt: list[Path] | None = None) -> Path | None:
    """An OCTMNIST file already on disk whose MD5 matches the release: in data_dir / $MEDROBUST_DATA,
    or in the Keras download cache.

    A file in data_dir / $MEDROBUST_DATA that fails the MD5 check is an error naming it (it is the
    user's file: we neither use nor delete it). A cached download that fails it (e.g. a killed
    download) is skipped and appended to `corrupt`, so the caller downloads it again.
    """
    name, md5 = FILES[native_size(image_size)]
    for folder in (data_dir, os.environ.get("MEDROBUST_DATA")):
        if folder:
            for path in (Path(folder) / name, Path(folder) / "octmnist" / name):
                if path.is_file():
                    found = md5sum(path)
                    if found != md5:
                        raise ValueError(
                            f"{path}: not the OCTMNIST release (MD5 {found}, expected {md5}): incomplete or a "
                            f"different file; delete or replace it, or pass it as --data {path} to use it as it is")
                    return path
    # get_file's cache (cache_subdir datasets/medrobust), and where earlier versions downloaded it.
    for path in (keras_cache_dir() / name, keras_cache_dir().parent.parent / "medrobust" / name):
        if path.is_file():
            if md5sum(path) == md5:
                return path
            if corrupt is not None:
                corrupt.append(path)
    return None


def download(image_size: int = 28, origin: str | None = None, cache_dir: str | None = None) -> Path:
    """Download (or reuse the cached copy of) OCTMNIST with keras.utils.get_file and verify its MD5.

    `origin` overrides the record URL (a file:// URL works, which is how the tests exercise this path).
    get_file checks the MD5 of a cached copy too and downloads again if it fails. Raises ValueError if
    the checksum of the download does not match; the bad file is not kept.
    """
    from medrobust.cli import import_tensorflow

    import_tensorflow()
    import keras

    name, md5 = FILES[native_size(image_size)]
    origin = origin or f"{RECORD}/{name}?download=1"
    path = keras.utils.get_file(
        fname=name, origin=origin, file_hash=md5, hash_algorithm="md5",
        cache_subdir=CACHE_SUBDIR, cache_dir=cache_dir or str(keras_cache_dir().parent.parent),
    )
    return Path(path)


def load_npz(path: str | os.PathLike, image_size: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read an OCTMNIST-style .npz into {'train'|'val'|'test': (x float32 [n,s,s,1] in [0,1], y int64 [n])}.

    Needs `<split>_images` and `<split>_labels` for train and test (val optional). Images are uint8
    [n,h,w] or [n,h,w,1]; resized with antialiasing if image_size differs. np.load runs with
    allow_pickle=False, so a file cannot smuggle in code.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zip/format errors come in many types
        raise ValueError(f"{path}: not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    with archive:
        keys = set(archive.files)
        required = {f"{s}_{k}" for s in ("train", "test") for k in ("images", "labels")}
        missing = sorted(required - keys)
        if missing:
            raise ValueError(f"{path}: missing arrays {', '.join(missing)} (has {', '.join(sorted(keys)) or 'none'})")
        out = {}
        for split in SPLITS:
            if f"{split}_images" not in keys:
                continue
            x, y = archive[f"{split}_images"], archive[f"{split}_labels"]
            out[split] = (_images_to_float(x, path, split, image_size), _labels(y, len(x), path, split))
    return out


def _images_to_float(x: np.ndarray, path: Path, split: str, image_size: int | None) -> np.ndarray:
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"{path}: {split}_images has shape {x.shape}; expected [n, h, w] grayscale")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{path}: {split}_images contains NaN or Inf")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{path}: float {split}_images must lie in [0, 1] (found {x.min():.3g}..{x.max():.3g})")
    else:
        raise ValueError(f"{path}: {split}_images has dtype {x.dtype}; expected uint8 or float in [0, 1]")
    if image_size and x.shape[1:] != (image_size, image_size):
        x = _resize(x, image_size)
    return x[..., None]


def _labels(y: np.ndarray, n: int, path: Path, split: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{path}: {split}_labels has {len(y)} entries for {n} images")
    if not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 or y.max(initial=0) > 3:
        raise ValueError(f"{path}: {split}_labels must be integers 0..3 (CNV, DME, DRUSEN, NORMAL)")
    return y.astype(np.int64)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([
        np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BOX), dtype=np.float32)
        for img in x
    ]).clip(0.0, 1.0)
