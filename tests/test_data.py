"""OCTMNIST .npz loading and download path, load_data dispatch, stratified splits, tf.data pipelines."""

from __future__ import annotations

import hashlib
import re
import warnings

import numpy as np
import pytest

from medrobust.data import load_data, octmnist
from medrobust.data.splits import labeled_unlabeled_split


def _fake_octmnist(path, n=(40, 8, 12), size=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 4).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_load_npz_reads_all_splits_in_unit_range(tmp_path):
    splits = octmnist.load_npz(_fake_octmnist(tmp_path / "octmnist.npz"))
    assert set(splits) == {"train", "val", "test"}
    x, y = splits["train"]
    assert x.shape == (40, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == {0, 1, 2, 3}


def test_load_npz_resizes_to_requested_size(tmp_path):
    x, _ = octmnist.load_npz(_fake_octmnist(tmp_path / "o.npz", size=64), image_size=28)["test"]
    assert x.shape == (12, 28, 28, 1)


def test_load_npz_missing_keys_names_file_and_keys(tmp_path):
    path = tmp_path / "broken.npz"
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"broken\.npz: missing arrays .*test_images.*train_labels"):
        octmnist.load_npz(path)


@pytest.mark.parametrize("bad, message", [
    (np.full((4, 28, 28), np.nan, np.float32), "NaN"),
    (np.zeros((4, 28, 28), np.complex64), "dtype"),
    (np.zeros((4, 28), np.uint8), "shape"),
])
def test_load_npz_rejects_bad_arrays(tmp_path, bad, message):
    path = tmp_path / "bad.npz"
    good = np.zeros((4, 28, 28), np.uint8)
    np.savez(path, train_images=bad, train_labels=np.zeros(4, np.uint8),
             test_images=good, test_labels=np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=message):
        octmnist.load_npz(path)


def test_load_npz_rejects_non_npz(tmp_path):
    path = tmp_path / "octmnist.npz"
    path.write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        octmnist.load_npz(path)


def test_download_from_file_origin_checks_md5(tmp_path, monkeypatch):
    source = _fake_octmnist(tmp_path / "source.npz")
    monkeypatch.setitem(octmnist.FILES, 28, ("octmnist.npz", _md5(source)))
    got = octmnist.download(28, origin=source.as_uri(), cache_dir=str(tmp_path / "cache"))
    assert got.is_file() and _md5(got) == _md5(source)
    assert octmnist.load_npz(got)["train"][0].shape == (40, 28, 28, 1)


def test_download_with_wrong_checksum_fails_and_keeps_nothing(tmp_path, monkeypatch):
    source = _fake_octmnist(tmp_path / "source.npz")
    monkeypatch.setitem(octmnist.FILES, 28, ("octmnist.npz", "0" * 32))
    with pytest.raises(ValueError, match="(?i)hash|checksum|corrupt|incomplete"):
        octmnist.download(28, origin=source.as_uri(), cache_dir=str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").rglob("octmnist.npz"))


def test_local_copy_in_medrobust_data_is_found_without_download(tmp_path, monkeypatch):
    _fake_octmnist(tmp_path / "octmnist.npz")
    monkeypatch.setitem(octmnist.FILES, 28, ("octmnist.npz", _md5(tmp_path / "octmnist.npz")))
    monkeypatch.setenv("MEDROBUST_DATA", str(tmp_path))
    monkeypatch.setattr(octmnist, "download", lambda *a, **k: pytest.fail("must not download"))
    data = load_data("auto")
    assert not data.synthetic and data.source.startswith("octmnist:")
    assert len(data["test"][1]) == 12


def _truncated_download(tmp_path, monkeypatch):
    """The release (a stand-in, its MD5 patched in) behind a file:// origin, and a killed download of it in
    the Keras cache where get_file keeps it."""
    import functools

    source = _fake_octmnist(tmp_path / "source.npz")
    monkeypatch.setitem(octmnist.FILES, 28, ("octmnist.npz", _md5(source)))
    monkeypatch.setenv("MEDROBUST_DATA", str(tmp_path / "nothing_here"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cached = tmp_path / "keras" / "datasets" / "medrobust" / "octmnist.npz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(source.read_bytes()[:1000])
    monkeypatch.setattr(octmnist, "download", functools.partial(octmnist.download, origin=source.as_uri()))
    return source, cached


def test_a_killed_download_in_the_cache_is_fetched_again(tmp_path, monkeypatch):
    source, cached = _truncated_download(tmp_path, monkeypatch)
    data = load_data("auto")
    assert not data.synthetic and data.source == f"octmnist:{cached}" and len(data["test"][1]) == 12
    assert _md5(cached) == _md5(source)


def test_a_killed_download_offline_is_named(tmp_path, monkeypatch):
    _, cached = _truncated_download(tmp_path, monkeypatch)
    monkeypatch.setattr(octmnist, "download", lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    with pytest.warns(UserWarning, match=f"{re.escape(str(cached))} failed its MD5 check.*SYNTHETIC"):
        assert load_data("auto", phantom_size=(40, 8, 8)).synthetic
    with pytest.raises(ValueError, match=f"{re.escape(str(cached))} failed its MD5 check.*delete it"):
        load_data("octmnist")


def test_a_copy_in_medrobust_data_that_is_not_the_release_is_an_error_naming_it(tmp_path, monkeypatch):
    path = _fake_octmnist(tmp_path / "octmnist.npz")
    monkeypatch.setenv("MEDROBUST_DATA", str(tmp_path))
    monkeypatch.setattr(octmnist, "download", lambda *a, **k: pytest.fail("must not download over the user's file"))
    for name in ("auto", "octmnist"):
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}: not the OCTMNIST release .*--data"):
            load_data(name)
    assert path.is_file()  # the user's file: named, never deleted
    assert load_data(str(path)).source == f"octmnist:{path}"  # given as a path, it is used as it is


def test_auto_falls_back_to_phantom_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDROBUST_DATA", str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(octmnist, "download", offline)
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        data = load_data("auto", phantom_size=(40, 8, 8))
    assert data.synthetic and data.source == "phantom"
    with pytest.raises(ValueError, match="could not be downloaded"):
        load_data("octmnist")


@pytest.mark.network
def test_real_octmnist_download():
    """The true download from the MedMNIST record; skipped when the machine is offline."""
    import socket

    try:
        socket.create_connection(("zenodo.org", 443), timeout=3).close()
    except OSError:
        pytest.skip("offline: zenodo.org unreachable")
    path = octmnist.download(28)
    assert octmnist.load_npz(path)["test"][0].shape[1:] == (28, 28, 1)


def test_load_data_rejects_unknown_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_data(str(tmp_path / "nope"))
    (tmp_path / "scan.txt").write_text("x")
    with pytest.raises(ValueError, match="must be an OCTMNIST-style .npz"):
        load_data(str(tmp_path / "scan.txt"))


def test_npz_without_val_gets_a_stratified_val_split(tmp_path):
    path = tmp_path / "o.npz"
    x = np.zeros((40, 28, 28), np.uint8)
    y = np.arange(40) % 4
    np.savez(path, train_images=x, train_labels=y, test_images=x[:8], test_labels=y[:8])
    data = load_data(str(path))
    assert len(data["val"][1]) == 4 and len(data["train"][1]) == 36
    assert np.bincount(data["val"][1]).tolist() == [1, 1, 1, 1]


@pytest.mark.realdata
def test_unsplit_real_folder_is_split_by_patient(real_scans):
    from medrobust.data import patient_split
    from medrobust.data.folders import load_image_tree, patient_id

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_data(str(real_scans), image_size=28)
    assert sum(len(data[s][1]) for s in ("train", "val", "test")) == 90 and not data.synthetic
    files = load_image_tree(real_scans, 28).files
    which = patient_split(files, seed=0)
    patients = np.array([patient_id(f.rsplit("/", 1)[-1]) for f in files])
    for p in np.unique(patients):
        assert len(set(which[patients == p])) == 1, f"patient {p} is in two splits"
    assert set(which) == {"train", "val", "test"}


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_labeled_split_is_stratified_and_disjoint(fraction):
    y = np.repeat(np.arange(4), [500, 300, 150, 50])
    labeled, unlabeled = labeled_unlabeled_split(y, fraction, seed=3)
    assert len(np.intersect1d(labeled, unlabeled)) == 0 and len(labeled) + len(unlabeled) == len(y)
    counts = np.bincount(y[labeled], minlength=4)
    expected = np.maximum(1, np.round(fraction * np.array([500, 300, 150, 50])))
    assert counts.tolist() == expected.astype(int).tolist()
    again, _ = labeled_unlabeled_split(y, fraction, seed=3)
    assert np.array_equal(labeled, again)


def test_labeled_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="label_fraction"):
        labeled_unlabeled_split(np.zeros(10), 0.0)


def test_train_pipeline_batches_and_zips_unlabeled():
    from medrobust.data.pipeline import eval_dataset, steps_per_epoch, train_dataset

    x = np.random.rand(50, 28, 28, 1).astype(np.float32)
    y = np.arange(50) % 4
    (xl, xu), yl = next(iter(train_dataset(x[:20], y[:20], 8, seed=0, x_unlabeled=x[20:], unlabeled_batch_size=16)))
    assert xl.shape == (8, 28, 28, 1) and xu.shape == (16, 28, 28, 1) and yl.shape == (8,)
    seen = np.concatenate([b[1].numpy() for b in train_dataset(x, y, 10, seed=1).take(5)])
    assert len(seen) == 50 and sorted(seen.tolist()) == sorted(y.tolist())  # one epoch = every image once
    assert steps_per_epoch(50, 8) == 7
    assert sum(len(b[1]) for b in eval_dataset(x, y, 16)) == 50
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_dataset(x[:4], y[:4], 8)


# -- patient-safe folders ----------------------------------------------------------------------------


def _kermany_tree(root, splits: dict, images_per_patient: int = 3):
    """root/<split>/<CLASS>/<CLASS>-<patient>-<n>.jpeg; splits: {split: {class: [patient ids]}}."""
    from PIL import Image

    for split, by_class in splits.items():
        for cls, patients in by_class.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for p in patients:
                for n in range(1, images_per_patient + 1):
                    Image.new("L", (20, 16), 30 + 7 * n).save(folder / f"{cls}-{p}-{n}.jpeg")
    return root


def _classes_with(patients_per_class: int, start: int) -> dict:
    from medrobust.classes import CLASSES

    return {c: [str(start + 100 * k + i) for i in range(patients_per_class)] for k, c in enumerate(CLASSES)}


def test_kermany_folder_without_val_carves_val_by_patient(tmp_path):
    """Every image of a patient lands in the same split (main's image-level carve leaked patients)."""
    root = _kermany_tree(tmp_path / "k", {"train": _classes_with(10, 1000), "test": _classes_with(2, 5000)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overlap warning, no unknown patient ids
        data = load_data(str(root), image_size=16, seed=0)
    assert len(data["train"][1]) + len(data["val"][1]) == 120 and len(data["test"][1]) == 24
    train, val = set(data.patients["train"]), set(data.patients["val"])
    assert not train & val, f"patients in train and val: {sorted(train & val)}"
    assert len(val) == 4 and len(data["val"][1]) == 12  # a tenth of the 40 patients, with all their images
    assert np.bincount(data["val"][1], minlength=4).tolist() == [3, 3, 3, 3]  # one patient per class
    assert data.patient_counts() == {"train": 36, "val": 4, "test": 8}
    assert "train 108 (36 patients), val 12 (4 patients), test 24 (8 patients)" in data.describe()
    again = load_data(str(root), image_size=16, seed=0)
    assert again.patients == data.patients
    other = load_data(str(root), image_size=16, seed=1)
    assert set(other.patients["val"]) != val


def test_files_without_patient_ids_are_their_own_patients_with_a_warning(tmp_path):
    from PIL import Image

    root = _kermany_tree(tmp_path / "k", {"train": _classes_with(10, 1000), "test": _classes_with(1, 5000)})
    for i in range(5):
        Image.new("L", (20, 16), 99).save(root / "train" / "CNV" / f"scan{i}.png")
    with pytest.warns(UserWarning, match="5 of 125 training files have no patient id"):
        data = load_data(str(root), image_size=16)
    assert len(data["train"][1]) + len(data["val"][1]) == 125


def test_given_splits_that_share_patients_are_warned_naming_the_ids(tmp_path):
    train = _classes_with(4, 1000)
    test = _classes_with(1, 5000)
    test["CNV"] += ["1000", "1001"]  # two training patients again in test
    val = {"NORMAL": ["1301", "7000"]}  # one training patient in val
    root = _kermany_tree(tmp_path / "k", {"train": train, "test": test, "val": val}, images_per_patient=1)
    with pytest.warns(UserWarning) as record:
        load_data(str(root), image_size=16)
    messages = [str(w.message) for w in record]
    assert any("2 patient(s) appear in both train/ and test/ (ids 1000, 1001)" in m for m in messages), messages
    assert any("1 patient(s) appear in both train/ and val/ (ids 1301)" in m for m in messages), messages
    assert not any("val/ and test/" in m for m in messages)


def test_a_long_list_of_shared_patients_is_truncated_with_a_count(tmp_path):
    train = _classes_with(5, 1000)
    root = _kermany_tree(tmp_path / "k", {"train": train, "test": train}, images_per_patient=1)
    with pytest.warns(UserWarning, match=r"20 patient\(s\) appear in both train/ and test/ \(ids 1000, 1001, "
                                         r"1002, 1003, 1004, 1100, 1101, 1102, 1103, 1104 and 10 more\)"):
        load_data(str(root), image_size=16)


def test_sources_without_patients_say_nothing_about_them(tmp_path):
    path = _fake_octmnist(tmp_path / "o.npz")
    data = load_data(str(path))
    assert data.patients == {} and data.patient_counts() == {} and "patients)" not in data.describe()


# -- the shared real data sets ----------------------------------------------------------------------


def _shared(name):
    import os
    from pathlib import Path

    path = Path(os.environ.get("MEDROBUST_DATA", "")) / name
    if not os.environ.get("MEDROBUST_DATA") or not path.exists():
        pytest.skip(f"{name} not found (set MEDROBUST_DATA to the folder holding it)")
    return path


@pytest.mark.realdata
def test_shared_kermany_counts_and_patients(report):
    import time

    root = _shared("kermany")
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patient-disjoint, nothing skipped
        data = load_data(str(root), image_size=28)
    seconds = time.perf_counter() - started
    counts = {s: np.bincount(data[s][1], minlength=4).tolist() for s in ("train", "val", "test")}
    assert counts == {"train": [395, 110, 76, 462], "val": [67, 16, 17, 89], "test": [154, 30, 25, 187]}
    assert data.patient_counts() == {"train": 675, "val": 126, "test": 227}
    assert data.skipped == [] and not data.synthetic
    assert data["train"][0].shape == (1043, 28, 28, 1)
    report(f"loaded 1,628 native Kermany JPEGs at 28 px in {seconds:.1f} s")


@pytest.mark.realdata
def test_shared_octmnist_subset_counts():
    data = load_data(str(_shared("octmnist_subset/octmnist_subset.npz")), image_size=28)
    counts = {s: np.bincount(data[s][1], minlength=4).tolist() for s in ("train", "val", "test")}
    assert counts == {"train": [491, 148, 105, 643], "val": [278, 74, 61, 360], "test": [14, 27, 30, 23]}
    x = data["test"][0]
    assert x.shape == (94, 28, 28, 1) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
