"""Datasets: real OCTMNIST, Kermany-style image folders, or the synthetic OCT phantom.

`load_data` is the single entry point the CLIs use. This module imports no TensorFlow; the tf.data
pipelines live in `medrobust.data.pipeline`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medrobust.classes import CLASSES

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class OCTData:
    """Train/val/test arrays (x float32 [n,s,s,1] in [0,1], y int64 [n]) and where they came from."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str
    synthetic: bool
    image_size: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: tuple[str, ...] = CLASSES
    # The `data` argument of load_data that gives these data again from any folder: 'phantom',
    # 'octmnist' (the MD5-checked release) or an absolute path.
    argument: str = ""

    def __getitem__(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.splits[split]

    def describe(self) -> str:
        counts = ", ".join(f"{s} {len(self.splits[s][1])}" for s in SPLIT_NAMES if s in self.splits)
        kind = "SYNTHETIC phantom" if self.synthetic else "real scans"
        return f"{self.source} ({kind}, {self.image_size}x{self.image_size}; {counts})"


def load_data(data: str = "auto", image_size: int = 28, seed: int = 0, data_dir: str | None = None,
              phantom_size: tuple[int, int, int] = (4000, 800, 800), download: bool = True) -> OCTData:
    """Load a dataset by name or path.

    data: 'auto' (OCTMNIST if on disk or downloadable, else the synthetic phantom, with a warning),
    'phantom', 'octmnist', a path to an OCTMNIST-style .npz, or a Kermany-style folder
    (train/ test/ [val/] with class folders) or any folder of class folders (split by patient here).
    data_dir defaults to $MEDROBUST_DATA.
    """
    from medrobust.data import octmnist

    data = str(data)
    if data == "phantom":
        return _phantom(image_size, seed, phantom_size)
    if data in ("auto", "octmnist"):
        corrupt: list[Path] = []
        path = octmnist.find_local(image_size, data_dir, corrupt=corrupt)
        # A cached copy that fails its MD5 (e.g. a killed download) is fetched again by get_file.
        note = "".join(f"; the cached copy {p} failed its MD5 check (incomplete or corrupt)"
                       + (", delete it" if p.exists() else "") for p in corrupt)
        if path is None and download:
            try:
                path = octmnist.download(image_size)
            except Exception as exc:  # offline, refused, bad checksum: all mean "not available"
                reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
                if data == "octmnist":
                    raise ValueError(f"OCTMNIST is not on disk and could not be downloaded ({reason}){note}") from None
                warnings.warn(f"OCTMNIST not found locally and not downloadable ({reason}){note}; "
                              "using the SYNTHETIC OCT phantom instead.", stacklevel=2)
        if path is None:
            if data == "octmnist":
                raise ValueError(f"OCTMNIST is not on disk (set MEDROBUST_DATA or allow the download){note}")
            return _phantom(image_size, seed, phantom_size)
        loaded = _from_npz(path, image_size, seed)
        loaded.argument = "octmnist"  # the MD5-checked release, wherever it is found next time
        return loaded
    path = Path(data).expanduser()
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder (expected auto, phantom, octmnist, a .npz or a folder)")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ValueError(f"{path}: a data file must be an OCTMNIST-style .npz")
        return _from_npz(path, image_size, seed)
    return _from_folder(path, image_size, seed)


def run_data_argument(config: dict) -> str:
    """The `data` argument that gives a trained run's data again, from its config.json.

    'data_resolved' (recorded since medrobust.train records it), else derived from 'data_source'
    ('phantom', 'octmnist:PATH', 'folder:PATH'), else the --data the run was given.
    """
    if config.get("data_resolved"):
        return str(config["data_resolved"])
    source = str(config.get("data_source") or "")
    kind, _, path = source.partition(":")
    if source == "phantom" or (kind in ("octmnist", "folder") and path):
        return "phantom" if source == "phantom" else path
    return str(config.get("data", "auto"))


def load_run_data(config: dict, data: str | None = None, image_size: int | None = None,
                  seed: int | None = None) -> OCTData:
    """The data for evaluating or exporting a trained run: by default the data it was trained on.

    config: the run's config.json. data: another source (any load_data argument); then, if it gives
    other data than the run was trained on, a warning names both. image_size and seed default to the
    run's. Raises ValueError if the recorded data is no longer there (naming it) or cannot be loaded.
    """
    image_size = int(config["image_size"]) if image_size is None else image_size
    seed = int(config.get("seed", 0)) if seed is None else seed
    recorded = run_data_argument(config)
    if data is None:
        if recorded not in ("auto", "phantom", "octmnist") and not Path(recorded).exists():
            raise ValueError(f"{recorded}: the data this run was trained on is no longer there; restore it or pass "
                             "--data to choose the data")
        return load_data(recorded, image_size=image_size, seed=seed)
    dataset = load_data(str(data), image_size=image_size, seed=seed)
    trained_on = config.get("data_source")
    if trained_on and not _same_data(dataset, recorded):
        kind = " (SYNTHETIC phantom)" if config.get("synthetic_data") else ""
        warnings.warn(f"DIFFERENT DATA: --data {data} gives {dataset.describe()}, but this run was trained on "
                      f"{trained_on}{kind}; the figures are not on the data the run was trained on", stacklevel=2)
    return dataset


def _same_data(dataset: OCTData, recorded: str) -> bool:
    if recorded in ("phantom", "octmnist", "auto"):
        return dataset.argument == recorded
    return dataset.argument == str(Path(recorded).expanduser().resolve())


def _phantom(image_size: int, seed: int, sizes: tuple[int, int, int]) -> OCTData:
    from medrobust.data.phantom import phantom_splits

    n_train, n_val, n_test = sizes
    splits = phantom_splits(image_size=image_size, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    return OCTData(splits, source="phantom", synthetic=True, image_size=image_size, argument="phantom")


def _from_npz(path: Path, image_size: int, seed: int) -> OCTData:
    from medrobust.data.octmnist import load_npz

    splits = load_npz(path, image_size)
    if "val" not in splits:
        splits["train"], splits["val"] = _carve_val(*splits["train"], seed)
    return OCTData(splits, source=f"octmnist:{path}", synthetic=False, image_size=image_size,
                   argument=str(Path(path).expanduser().resolve()))


def _from_folder(path: Path, image_size: int, seed: int) -> OCTData:
    from medrobust.data import folders

    if folders.is_kermany_root(path):
        loaded = folders.load_kermany_splits(path, image_size, progress=True)
        splits = {name: (part.x, part.y) for name, part in loaded.items()}
        skipped = [s for part in loaded.values() for s in part.skipped]
        if "val" not in splits:
            splits["train"], splits["val"] = _carve_val(*splits["train"], seed)
    else:
        part = folders.load_image_tree(path, image_size, progress=True)
        splits, skipped = _split_by_patient(part, seed), part.skipped
    for file, reason in skipped:
        warnings.warn(f"skipped {file}: {reason}", stacklevel=3)
    return OCTData(splits, source=f"folder:{path}", synthetic=False, image_size=image_size, skipped=skipped,
                   argument=str(path.expanduser().resolve()))


def _carve_val(x: np.ndarray, y: np.ndarray, seed: int, fraction: float = 0.1):
    from sklearn.model_selection import train_test_split

    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)
    return (x_tr, y_tr), (x_va, y_va)


def _split_by_patient(part, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    which = patient_split(part.files, seed)
    return {s: (part.x[which == s], part.y[which == s]) for s in SPLIT_NAMES}


def patient_split(files: list[str], seed: int, fractions=(0.7, 0.15)) -> np.ndarray:
    """train/val/test name per file, 70/15/15 by patient, so no patient is in two splits.

    Patient ids come from Kermany file names (<CLASS>-<patient>-<n>); files without one are their own patient.
    """
    from medrobust.data.folders import patient_id

    groups = np.array([patient_id(os.path.basename(f)) or f for f in files])
    patients = np.random.default_rng(seed).permutation(np.unique(groups))
    cut = np.cumsum(fractions) * len(patients)
    split_of = {p: ("train" if i < cut[0] else "val" if i < cut[1] else "test") for i, p in enumerate(patients)}
    return np.array([split_of[g] for g in groups])
