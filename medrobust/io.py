"""Run files: atomic writes (a crash mid-write never leaves a half-written file under the final name)
and the metadata every output records (package versions). Below every other medrobust module: it
imports no TensorFlow and nothing from medrobust (the temporary file beside the target comes from the
device package, medrobust_screen.tempfiles)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

from medrobust_screen.tempfiles import mkstemp_beside

VERSIONED_PACKAGES = ("medrobust", "tensorflow", "keras", "numpy", "scikit-learn", "tf2onnx", "onnxruntime",
                      "ai-edge-litert")


def package_versions() -> dict:
    """Python, platform and the installed versions of the packages that shape results (None if absent)."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """RUN/config.json as medrobust.train writes it: a JSON object with an integer image_size.

    Raises ValueError naming the file when it is missing, not JSON, not a JSON object, or has no integer
    image_size (a config.json that is not a run's), so a caller reports one line instead of a traceback.
    """
    path = Path(run_dir) / "config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a medrobust run config (a JSON {type(config).__name__}, not an object)")
    if isinstance(config.get("image_size"), bool) or not isinstance(config.get("image_size"), int):
        raise ValueError(f"{path}: not a medrobust run config (no integer image_size)")
    return config


def atomic_save_model(model, path: str | os.PathLike) -> None:
    """model.save() to a temporary .keras file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
