"""Load folders of OCT images laid out by class (numpy + Pillow only, no TensorFlow).

Layouts understood:

* class folder:   ``root/<CLASS>/*.jpeg`` with CLASS one of ``CLASSES`` (folder names
  matched case-insensitively) -> ``load_class_folder``;
* image tree:     a class folder, or a folder whose immediate sub-folders are class
  folders (e.g. ``oct2017_subset/{app_samples,unsplit,val}``) -> ``load_image_tree``;
* Kermany splits: ``root/train``, ``root/test`` and optionally ``root/val``, each a
  class folder (the OCT2017 / Kaggle kermany2018 layout) -> ``load_kermany_splits``.

Rules: files are read in a deterministic order (class label, then class-folder name,
then file name); files whose extension is not in ``IMAGE_EXTENSIONS`` and hidden
files/folders (name starting with ".") are ignored silently; an image-like file that
fails to load is skipped and recorded in ``FolderImages.skipped`` with the
``ImageError`` reason; any other visible folder beside the class folders is not
loaded and reported with ``warnings.warn``.  A root without class folders, or whose
class folders hold no loadable image, raises ``ValueError``.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from medrobust.classes import CLASSES
from medrobust.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    _check_size,
    is_image_filename,
    load_image,
)

__all__ = [
    "FolderImages",
    "patient_id",
    "has_class_folders",
    "is_kermany_root",
    "load_class_folder",
    "load_image_tree",
    "load_kermany_splits",
]

_CLASS_INDEX = {name.upper(): i for i, name in enumerate(CLASSES)}
_SPLITS = ("train", "test", "val")
_KERMANY_NAME = re.compile(
    r"^(" + "|".join(re.escape(c) for c in CLASSES) + r")-([0-9A-Za-z]+)-(\d+)$",
    re.IGNORECASE,
)


@dataclass
class FolderImages:
    """Images loaded from a folder tree.

    x: float32 ``[n, s, s, 1]`` in [0, 1]; y: int64 ``[n]`` labels (index in CLASSES);
    files: path of each kept image (same order as x); skipped: ``(path, reason)`` for
    every image-like file that failed to load; groups: for each kept image, the
    sub-set (sub-folder or split name) it came from, ``""`` if none.
    """

    x: np.ndarray
    y: np.ndarray
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def patients(self) -> list[str | None]:
        """``patient_id`` of each kept file (``None`` where the name is not Kermany-style)."""
        return [patient_id(f) for f in self.files]


def patient_id(filename) -> str | None:
    """Patient id from a Kermany file name ``<CLASS>-<patient>-<n>.<ext>``, else ``None``.

    Accepts a bare name or a path; e.g. ``"CNV-9890872-21.jpeg"`` -> ``"9890872"``.
    """
    stem = os.path.splitext(os.path.basename(os.fspath(filename)))[0]
    m = _KERMANY_NAME.match(stem)
    return m.group(2) if m else None


def _visible_subdirs(root: str) -> list[str]:
    """Names of the non-hidden immediate sub-folders of ``root``, sorted."""
    try:
        with os.scandir(root) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def has_class_folders(root) -> bool:
    """True if ``root`` has at least one immediate sub-folder named like a class (any case)."""
    return any(d.upper() in _CLASS_INDEX for d in _visible_subdirs(os.fspath(root)))


def _split_dirs(root: str) -> dict[str, str]:
    """``{"train": <dir name>, ...}`` for split folders (case-insensitive) that hold class folders."""
    found: dict[str, str] = {}
    for d in _visible_subdirs(root):
        key = d.lower()
        if key in _SPLITS and key not in found and has_class_folders(os.path.join(root, d)):
            found[key] = d
    return found


def is_kermany_root(root) -> bool:
    """True if ``root`` has ``train`` and ``test`` sub-folders (any case) that hold class folders."""
    found = _split_dirs(os.fspath(root))
    return "train" in found and "test" in found


def split_layout_problem(root) -> str | None:
    """Why ``root``'s split folders cannot be used as given, or None.

    A folder with train/ but no test/ (or test/ but no train/), each holding class folders, would otherwise
    be pooled and re-split by patient, silently replacing the splits its owner made: refused instead (one
    line naming the folder and what is missing). A lone val/ beside other groups (as in oct2017_subset/)
    is pooled like any group, with a warning from `medrobust.data.load_data`."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    found = _split_dirs(root)
    if ("train" in found) == ("test" in found):  # both (splits as given) or neither (pooled as groups)
        return None
    missing = [s for s in ("train", "test") if s not in found]
    return (f"{root}: has {', '.join(found[s] + '/' for s in _SPLITS if s in found)} but no "
            f"{' or '.join(m + '/' for m in missing)}; medrobust keeps the splits a folder gives (train/ and "
            "test/, val/ optional) and would otherwise pool and re-split them. Add the missing split, or "
            "point --data at one folder of class folders to have it split by patient 70/15/15")


def _require_dir(root: str) -> None:
    if not os.path.isdir(root):
        what = "does not exist" if not os.path.exists(root) else "is not a folder"
        raise ValueError(f"{root}: {what}")


def _progress(items, enabled: bool, desc: str):
    """items with a progress bar when enabled and stderr is a terminal (never in a log file or pipe)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except Exception:  # tqdm is optional
        return items
    return tqdm(items, desc=desc, unit="img", leave=False, disable=None)  # None: only on a terminal


def _empty(image_size: int) -> FolderImages:
    return FolderImages(
        x=np.zeros((0, image_size, image_size, 1), np.float32),
        y=np.zeros((0,), np.int64),
    )


def load_class_folder(root, image_size: int, progress: bool = False, group: str = "") -> FolderImages:
    """Load ``root/<CLASS>/*.<image ext>`` for every class folder present.

    Labels come from the folder name (case-insensitive match against CLASSES).
    ``group`` is stored in ``groups`` for every kept image.  Raises ``ValueError`` if
    ``root`` is not a folder, has no class folders, or no image in them loads.
    """
    image_size = _check_size(image_size)
    root = os.fspath(root)
    _require_dir(root)
    subdirs = _visible_subdirs(root)
    class_dirs = sorted(
        ((_CLASS_INDEX[d.upper()], d) for d in subdirs if d.upper() in _CLASS_INDEX)
    )
    if not class_dirs:
        raise ValueError(
            f"{root}: no class folders (expected sub-folders named {', '.join(CLASSES)})"
        )
    for d in subdirs:
        if d.upper() not in _CLASS_INDEX:
            warnings.warn(
                f"{root}: ignoring folder {d!r} (not a class folder; classes are "
                f"{', '.join(CLASSES)})",
                stacklevel=2,
            )

    candidates: list[tuple[int, str]] = []
    for label, d in class_dirs:
        folder = os.path.join(root, d)
        with os.scandir(folder) as it:
            names = sorted(
                e.name
                for e in it
                if not e.name.startswith(".") and is_image_filename(e.name) and not e.is_dir()
            )
        candidates.extend((label, os.path.join(folder, n)) for n in names)

    n = len(candidates)
    x = np.empty((n, image_size, image_size, 1), np.float32)
    y = np.empty((n,), np.int64)
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    desc = os.path.basename(os.path.normpath(root)) or root
    for label, path in _progress(candidates, progress, desc):
        try:
            arr = load_image(path, image_size)
        except ImageError as err:
            skipped.append((path, err.reason))
            continue
        k = len(files)
        x[k] = arr
        y[k] = label
        files.append(path)

    kept = len(files)
    if kept == 0:
        found = ", ".join(d for _, d in class_dirs)
        detail = (
            f"all {len(skipped)} image files failed to load (first: {skipped[0][0]}: {skipped[0][1]})"
            if skipped
            else f"no files with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
        raise ValueError(f"{root}: class folders ({found}) hold no loadable images: {detail}")
    if kept < n:
        x, y = x[:kept].copy(), y[:kept].copy()
    return FolderImages(x=x, y=y, files=files, skipped=skipped, groups=[group] * kept)


def _concat(parts: list[FolderImages], image_size: int) -> FolderImages:
    if not parts:
        return _empty(image_size)
    return FolderImages(
        x=np.concatenate([p.x for p in parts], axis=0),
        y=np.concatenate([p.y for p in parts], axis=0),
        files=[f for p in parts for f in p.files],
        skipped=[s for p in parts for s in p.skipped],
        groups=[g for p in parts for g in p.groups],
    )


def load_image_tree(root, image_size: int, progress: bool = False) -> FolderImages:
    """Load a class folder, or every immediate sub-folder of ``root`` that is one.

    If ``root`` itself has class folders this is ``load_class_folder(root)`` with
    groups ``""``.  Otherwise each immediate sub-folder with class folders is loaded
    (sorted by name) and the results concatenated, with ``groups`` = that
    sub-folder's name; other visible sub-folders are reported with
    ``warnings.warn``.  Raises ``ValueError`` if nothing loadable is found.
    """
    root = os.fspath(root)
    _require_dir(root)
    if has_class_folders(root):
        return load_class_folder(root, image_size, progress=progress)
    parts: list[FolderImages] = []
    for d in _visible_subdirs(root):
        sub = os.path.join(root, d)
        if has_class_folders(sub):
            parts.append(load_class_folder(sub, image_size, progress=progress, group=d))
        else:
            warnings.warn(
                f"{root}: ignoring folder {d!r} (it has no class folders "
                f"{', '.join(CLASSES)})",
                stacklevel=2,
            )
    if not parts:
        raise ValueError(
            f"{root}: no class folders ({', '.join(CLASSES)}) in it or in its immediate sub-folders"
        )
    return _concat(parts, image_size)


def load_kermany_splits(root, image_size: int, progress: bool = False) -> dict[str, FolderImages]:
    """Load the Kermany OCT2017 layout: ``root/train``, ``root/test`` and optional ``root/val``.

    Returns ``{"train": ..., "test": ..., "val": ...}`` (``"val"`` only if present);
    each split's ``groups`` holds the split name.  Split folder names are matched
    case-insensitively.  Raises ``ValueError`` if ``train`` or ``test`` is missing.
    """
    root = os.fspath(root)
    _require_dir(root)
    found = _split_dirs(root)
    missing = [s for s in ("train", "test") if s not in found]
    if missing:
        raise ValueError(
            f"{root}: not a Kermany OCT2017 root: missing {' and '.join(missing)} "
            f"folder(s) with class folders {', '.join(CLASSES)}"
        )
    out: dict[str, FolderImages] = {}
    for split in _SPLITS:
        if split in found:
            out[split] = load_class_folder(
                os.path.join(root, found[split]), image_size, progress=progress, group=split
            )
    return out

