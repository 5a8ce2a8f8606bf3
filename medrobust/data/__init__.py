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
    """Train/val/test arrays (x float32 [n,s,s,1] in [0,1], y int64 [n]) and where they came from.

    patients: per split, the patient id of each image (None where unknown), when the source names
    patients (Kermany file names <CLASS>-<patient>-<n>); empty for OCTMNIST and the phantom.
    """

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str
    synthetic: bool
    image_size: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: tuple[str, ...] = CLASSES
    # The `data` argument of load_data that gives these data again from any folder: 'phantom',
    # 'octmnist' (the MD5-checked release) or an absolute path.
    argument: str = ""
    patients: dict[str, list[str | None]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.splits[split]

    def patient_counts(self) -> dict[str, int]:
        """Distinct known patient ids per split ({} when the source names no patients)."""
        return {s: len({p for p in ids if p is not None}) for s, ids in self.patients.items()}

    def describe(self) -> str:
        patients = self.patient_counts()
        counts = ", ".join(f"{s} {len(self.splits[s][1])}" + (f" ({patients[s]} patients)" if s in patients else "")
                           for s in SPLIT_NAMES if s in self.splits)
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

    problem = folders.split_layout_problem(path)
    if problem:
        raise ValueError(problem)
    if folders.is_kermany_root(path):
        loaded = folders.load_kermany_splits(path, image_size, progress=True)
        splits = {name: (part.x, part.y) for name, part in loaded.items()}
        patients = {name: part.patients for name, part in loaded.items()}
        skipped = [s for part in loaded.values() for s in part.skipped]
        warn_shared_patients(patients, path)
        if "val" not in splits:
            train = loaded["train"]
            is_val = patient_val_mask(train.files, train.y, seed)
            ids = np.array(train.patients, dtype=object)
            splits["train"] = (train.x[~is_val], train.y[~is_val])
            splits["val"] = (train.x[is_val], train.y[is_val])
            patients["train"], patients["val"] = list(ids[~is_val]), list(ids[is_val])
    else:
        if folders._split_dirs(str(path)):  # a lone val/ among other groups: pooled, and said
            warnings.warn(f"{path}: no train/ and test/ folders, so its sub-folders (val/ included) are pooled "
                          "and split by patient 70/15/15", stacklevel=3)
        part = folders.load_image_tree(path, image_size, progress=True)
        which = patient_split(part.files, seed)
        splits = {s: (part.x[which == s], part.y[which == s]) for s in SPLIT_NAMES}
        patients = {s: [p for p, w in zip(part.patients, which) if w == s] for s in SPLIT_NAMES}
        skipped = part.skipped
    for file, reason in skipped:
        warnings.warn(f"skipped {file}: {reason}", stacklevel=3)
    return OCTData(splits, source=f"folder:{path}", synthetic=False, image_size=image_size, skipped=skipped,
                   argument=str(path.expanduser().resolve()), patients=patients)


def _carve_val(x: np.ndarray, y: np.ndarray, seed: int, fraction: float = 0.1):
    """A stratified image-level split, for sources without patient ids (OCTMNIST .npz files)."""
    from sklearn.model_selection import train_test_split

    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)
    return (x_tr, y_tr), (x_va, y_va)


def patient_val_mask(files: list[str], y: np.ndarray, seed: int, fraction: float = 0.1) -> np.ndarray:
    """bool [n]: which images form a validation split of about `fraction`, whole patients at a time.

    Stratified by class as far as patients allow (sklearn StratifiedGroupKFold with round(1 / fraction)
    folds; its first fold is val; a folder too small to stratify gets GroupShuffleSplit). Files without a
    Kermany patient id count as their own patient, and a warning says how many there are. Deterministic
    for a given seed. Raises ValueError if there are fewer than 2 patients.
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    from medrobust.data.folders import patient_id

    ids = [patient_id(f) for f in files]
    unknown = sum(p is None for p in ids)
    if unknown:
        warnings.warn(f"{unknown} of {len(files)} training files have no patient id in their name "
                      "(<CLASS>-<patient>-<n>); each is treated as its own patient when carving val", stacklevel=3)
    groups = np.array([p if p is not None else f"file:{f}" for p, f in zip(ids, files)])
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"{len(files)} training images of {n_groups} patient: too few to carve a validation "
                         "split by patient; add a val/ folder")
    n_splits = min(max(2, round(1 / fraction)), n_groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn: "the least populated class has only k members"
        try:
            folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            _, val_index = next(folds.split(np.zeros(len(y)), y, groups))
        except ValueError:  # every class has fewer images than there are folds
            shuffle = GroupShuffleSplit(n_splits=1, test_size=1 / n_splits, random_state=seed)
            _, val_index = next(shuffle.split(np.zeros(len(y)), y, groups))
    mask = np.zeros(len(y), bool)
    mask[val_index] = True
    return mask


def shared_patients(patients: dict[str, list[str | None]]) -> dict[tuple[str, str], list[str]]:
    """{(split_a, split_b): sorted patient ids found in both} for every pair of splits that share any."""
    known = {s: {p for p in ids if p is not None} for s, ids in patients.items()}
    names = [s for s in SPLIT_NAMES if s in known]
    pairs = {(a, b): sorted(known[a] & known[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    return {pair: ids for pair, ids in pairs.items() if ids}


def warn_shared_patients(patients: dict[str, list[str | None]], source, shown: int = 10) -> None:
    """Warn, naming the ids (the first `shown`, then a count), for each pair of splits sharing patients:
    images of one patient in train and test make test accuracy optimistic."""
    for (a, b), ids in shared_patients(patients).items():
        listed = ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
        warnings.warn(f"{source}: {len(ids)} patient(s) appear in both {a}/ and {b}/ (ids {listed}); "
                      f"{b} figures will be optimistic. Split by patient id to avoid this.", stacklevel=3)


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
