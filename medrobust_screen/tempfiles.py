"""A temporary file beside an output, with the mode a plainly created file would get: outputs are written
there and renamed into place, so a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mkstemp_beside(path: str | os.PathLike, text: bool = False) -> tuple[int, str]:
    """tempfile.mkstemp in path's folder, with the mode a plainly created file would get (0666 & ~umask).

    mkstemp makes 0600 files, and a rename keeps that mode: outputs would be unreadable by the
    group/others the user's umask lets read them. Returns (fd, temporary path).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", text=text)
    try:
        if hasattr(os, "fchmod"):  # POSIX; on Windows mkstemp's file is already readable
            os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp
