"""Which files a run screens: the paths named on the command line, folders searched recursively."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from medrobust_screen import dicom as dicom_files
from medrobust_screen.errors import UsageError
from medrobust_screen.images import is_image_filename


def check_inputs(paths: Iterable[str]) -> list[str]:
    """The input paths, after checking each exists (UsageError naming the first that does not)."""
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        if not path or not os.path.exists(path):
            raise UsageError(f"{path or repr(path)}: no such file or folder")
    return paths


def iter_image_files(paths: Iterable[str], stats: dict | None = None) -> Iterator[str]:
    """Files to screen, in order: an explicitly named file as is; a folder recursively (sorted, hidden
    entries skipped, IMAGE_EXTENSIONS and DICOM files). A path that vanished since `check_inputs` is
    yielded (it becomes an error row). `stats['ignored']` counts the non-image files seen in folders."""
    stats = stats if stats is not None else {}
    stats.setdefault("ignored", 0)
    for path in paths:
        path = os.fspath(path)
        if not os.path.isdir(path):
            yield path
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                if is_image_filename(name) or dicom_files.is_dicom_in_folder(os.path.join(root, name)):
                    yield os.path.join(root, name)
                else:
                    stats["ignored"] += 1
