"""An unlabeled pool for SSAT (train --unlabeled PATH): scans that were never labeled (numpy + Pillow only).

PATH is one of
* a folder of image files, read recursively (any file and folder names; hidden ones are ignored): a plain
  folder of scans, or a class-folder tree whose labels are ignored;
* an OCTMNIST-style .npz: its train images (labels ignored).

Images go through the project's own loaders (medrobust.data.images.load_image for files,
medrobust.data.octmnist.load_npz for .npz), so they are resized exactly like the training data; a file that
fails to load is skipped and named. `leaks` finds pool images that belong to the data's val or test split:
the same patient (Kermany file names <CLASS>-<patient>-<n>) or the same pixels after loading (an identical
file, or a copy of one).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medrobust.data.folders import _progress, patient_id
from medrobust.data.images import ImageError, _check_size, is_image_filename, load_image

CHECKED_SPLITS = ("val", "test")


@dataclass
class UnlabeledPool:
    """x: float32 [n, s, s, 1] in [0, 1]; files: where each image came from (a path, or NPZ:train[i]);
    skipped: (path, reason) of every image file that failed to load."""

    x: np.ndarray
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def patients(self) -> list[str | None]:
        return [patient_id(f) for f in self.files]


def image_files(root) -> list[str]:
    """Every visible image file under root (recursively), in a deterministic order."""
    found = []
    for folder, dirs, names in os.walk(os.fspath(root)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(folder, n) for n in sorted(names)
                     if not n.startswith(".") and is_image_filename(n))
    return sorted(found)


def load_unlabeled(path, image_size: int, progress: bool = False) -> UnlabeledPool:
    """The pool at path (a folder, recursively, or a .npz's train images); ValueError if it holds none."""
    image_size = _check_size(image_size)
    path = Path(os.fspath(path)).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        from medrobust.data.octmnist import load_npz

        x = load_npz(path, image_size)["train"][0]
        return UnlabeledPool(x, [f"{path}:train[{i}]" for i in range(len(x))], source=f"npz:{path.resolve()}")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder of images or an OCTMNIST-style .npz")
    candidates = image_files(path)
    x = np.empty((len(candidates), image_size, image_size, 1), np.float32)
    files, skipped = [], []
    for file in _progress(candidates, progress, path.name or str(path)):
        try:
            x[len(files)] = load_image(file, image_size)
        except ImageError as err:
            skipped.append((file, err.reason))
            continue
        files.append(file)
    if not files:
        detail = f"all {len(skipped)} image files failed to load (first: {skipped[0][0]}: {skipped[0][1]})" \
            if skipped else "no image files"
        raise ValueError(f"{path}: {detail}")
    return UnlabeledPool(x[:len(files)].copy(), files, skipped, source=f"folder:{path.resolve()}")


def pixel_hash(image: np.ndarray) -> str:
    """sha256 of an image's pixels as 8-bit values (what an identical or re-saved identical file loads to)."""
    return hashlib.sha256(np.round(np.asarray(image, np.float32) * 255).astype(np.uint8).tobytes()).hexdigest()


def leaks(pool: UnlabeledPool, data) -> dict[str, dict[str, list[str]]]:
    """{split: {"patients": [...], "images": [pool files]}} for the data's val and test splits: pool images
    of a patient in that split (when both name patients) or with the same pixels as one of its images."""
    found = {}
    pool_hashes = [pixel_hash(image) for image in pool.x]
    pool_patients = pool.patients
    for split in CHECKED_SPLITS:
        if split not in data.splits:
            continue
        split_patients = {p for p in (data.patients.get(split) or []) if p is not None}
        split_hashes = {pixel_hash(image) for image in data[split][0]}
        patients = sorted({p for p in pool_patients if p is not None and p in split_patients})
        images = [f for f, h, p in zip(pool.files, pool_hashes, pool_patients)
                  if h in split_hashes or (p is not None and p in split_patients)]
        if patients or images:
            found[split] = {"patients": patients, "images": images}
    return found
