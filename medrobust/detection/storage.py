"""A detector on disk: the folder with detector.json (the config), stats.npz (the class Gaussians) and, when a
part uses it, autoencoder.keras; no pickle. Reads formats medrobust-uad/2 and /1 (the four original parts)."""

from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np

from medrobust.detection.parts import AE_PARTS, GAUSSIAN_ARRAYS, LEGACY_PARTS, STAT_PREFIX
from medrobust.io import atomic_save_model, atomic_write_bytes, atomic_write_json, package_versions, read_json

FORMAT, LEGACY_FORMAT = "medrobust-uad/2", "medrobust-uad/1"
AUTOENCODER_FILE, CONFIG_FILE, STATS_FILE = "autoencoder.keras", "detector.json", "stats.npz"


def save(detector, path) -> Path:
    """Write the folder path/ with detector.json, stats.npz and (when a part uses it) autoencoder.keras;
    no pickle."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if detector.autoencoder is not None:
        atomic_save_model(detector.autoencoder, path / AUTOENCODER_FILE)
    elif (path / AUTOENCODER_FILE).is_file():
        (path / AUTOENCODER_FILE).unlink()  # a stale one from an earlier save to this folder
    buffer = io.BytesIO()
    np.savez(buffer, **detector.stats)
    atomic_write_bytes(path / STATS_FILE, buffer.getvalue())
    atomic_write_json(path / CONFIG_FILE, {**detector.config, "score_names": list(detector.score_names),
                                          "versions": package_versions()})
    return path


def read(path) -> tuple[keras.Model | None, dict[str, np.ndarray], dict]:
    """(autoencoder or None, stats, config) of a detector saved by `save` (the .keras file with
    safe_mode=True, the arrays with allow_pickle=False). Raises ValueError naming the file for a missing
    file, unknown format or missing array."""
    path = Path(path)
    missing = [f for f in (CONFIG_FILE, STATS_FILE) if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{path}: not a saved detector (missing {', '.join(missing)})")
    config = read_json(path / CONFIG_FILE)
    if config.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise ValueError(f"{path / CONFIG_FILE}: unknown detector format {config.get('format')!r} "
                         f"(expected {FORMAT} or {LEGACY_FORMAT})")
    if config["format"] == LEGACY_FORMAT:
        config["parts"] = list(LEGACY_PARTS)
    parts = config.get("parts") or []
    autoencoder = None
    if any(p in AE_PARTS for p in parts):
        if not (path / AUTOENCODER_FILE).is_file():
            raise ValueError(f"{path}: not a saved detector (missing {AUTOENCODER_FILE})")
        autoencoder = keras.models.load_model(path / AUTOENCODER_FILE, compile=False, safe_mode=True)
    with np.load(path / STATS_FILE, allow_pickle=False) as npz:
        stats = {k: npz[k] for k in npz.files}
    needed = [STAT_PREFIX[p] + k for p in parts if p in STAT_PREFIX for k in GAUSSIAN_ARRAYS]
    absent = [k for k in needed if k not in stats]
    if absent:
        raise ValueError(f"{path / STATS_FILE}: missing arrays {', '.join(absent)}")
    config.pop("versions", None)
    config.pop("score_names", None)
    return autoencoder, stats, config
