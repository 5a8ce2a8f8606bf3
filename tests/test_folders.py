"""Tests for medrobust.data.folders on a tiny generated Kermany-style tree and on real scans."""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrobust.classes import CLASSES
from medrobust.data.folders import (
    FolderImages,
    has_class_folders,
    is_kermany_root,
    load_class_folder,
    load_image_tree,
    load_kermany_splits,
    patient_id,
)

SIZE = 16
# each class gets its own grey level so labels can be checked against pixels
LEVEL = {label: 40 + 50 * label for label in range(len(CLASSES))}
NON_ASCII = "NORMAL-Ünïcødé_scan-ß.jpeg"


def _img(path: Path, level: int, ext_format: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (24, 20), level).save(path, format=ext_format, quality=95)


@pytest.fixture
def kermany(tmp_path) -> Path:
    """train/test/val x 4 classes x 3 images, plus the awkward extras described below."""
    root = tmp_path / "OCT2017"
    for split in ("train", "test", "val"):
        for label, cls in enumerate(CLASSES):
            # the test split uses a lower-case folder for DRUSEN
            folder = root / split / (cls.lower() if (split, cls) == ("test", "DRUSEN") else cls)
            for k in range(3):
                name = f"{cls}-{100 + label * 10 + k}-{k + 1}.jpeg"
                if split == "train" and cls == "DME" and k == 2:
                    name = f"{cls}-{100 + label * 10 + k}-{k + 1}.JPG"  # mixed-case extension
                if split == "train" and cls == "NORMAL" and k == 2:
                    name = NON_ASCII  # non-ASCII name
                if split == "train" and cls == "DRUSEN" and k == 1:
                    _img(folder / f"{cls}-{100 + label * 10 + k}-{k + 1}.Png", LEVEL[label], "PNG")
                    continue
                _img(folder / name, LEVEL[label])
    train = root / "train"
    # a corrupt JPEG: a real one cut in half
    good = (train / "CNV" / "CNV-100-1.jpeg").read_bytes()
    (train / "CNV" / "CNV-999-1.jpeg").write_bytes(good[: len(good) // 2])
    # noise that must be ignored silently
    (train / "README.txt").write_text("not an image\n")
    (train / "MANIFEST.sha256").write_text("abc  CNV/CNV-100-1.jpeg\n")
    (train / "CNV" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (train / "CNV" / "._CNV-100-1.jpeg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (train / "CNV" / "notes.txt").write_text("hello")
    (train / ".hidden_dir").mkdir()
    # an unknown folder beside the class folders: warned about, not loaded
    _img(train / "OTHER" / "OTHER-1-1.jpeg", 255)
    return root


def _check_arrays(fi: FolderImages, n: int) -> None:
    assert fi.x.shape == (n, SIZE, SIZE, 1) and fi.x.dtype == np.float32
    assert fi.y.shape == (n,) and fi.y.dtype == np.int64
    assert len(fi) == n == len(fi.files) == len(fi.groups)
    assert np.all(np.isfinite(fi.x)) and fi.x.min() >= 0 and fi.x.max() <= 1
    # labels come from the folders: every image's grey level is its class level
    for x, y in zip(fi.x, fi.y):
        assert abs(float(x.mean()) * 255 - LEVEL[int(y)]) < 3


def test_load_kermany_splits(kermany):
    with pytest.warns(UserWarning) as rec:
        splits = load_kermany_splits(kermany, SIZE)
    other = [w for w in rec if "OTHER" in str(w.message)]
    assert len(other) == 1 and "train" in str(other[0].message)
    assert len(rec) == 1  # README, MANIFEST, hidden files and folders: silent

    assert set(splits) == {"train", "test", "val"}
    for name, fi in splits.items():
        _check_arrays(fi, 12)
        assert Counter(fi.y.tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}
        assert fi.groups == [name] * 12
        assert list(fi.y) == sorted(fi.y)  # class order, deterministic
    train = splits["train"]
    assert len(train.skipped) == 1
    path, reason = train.skipped[0]
    assert Path(path).name == "CNV-999-1.jpeg" and "truncated" in reason
    assert not any("OTHER" in f for f in train.files)
    names = [Path(f).name for f in train.files]
    assert "DME-112-3.JPG" in names and "DRUSEN-121-2.Png" in names and NON_ASCII in names
    assert all(os.path.isfile(f) for f in train.files)
    assert splits["test"].skipped == [] and splits["val"].skipped == []


def test_load_class_folder_order_and_files(kermany):
    with pytest.warns(UserWarning, match="OTHER"):
        a = load_class_folder(kermany / "train", SIZE)
    with pytest.warns(UserWarning, match="OTHER"):
        b = load_class_folder(str(kermany / "train"), SIZE)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.files == b.files and a.groups == [""] * 12
    per_class = [[Path(f).name for f, y in zip(a.files, a.y) if y == k] for k in range(4)]
    assert all(names == sorted(names) for names in per_class)
    assert per_class[0] == ["CNV-100-1.jpeg", "CNV-101-2.jpeg", "CNV-102-3.jpeg"]


def test_clean_folder_loads_without_warnings(kermany):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fi = load_class_folder(kermany / "val", SIZE, progress=True)
    _check_arrays(fi, 12)


def test_load_image_tree_on_kermany_root(kermany):
    with pytest.warns(UserWarning, match="OTHER"):
        fi = load_image_tree(kermany, SIZE)
    _check_arrays(fi, 36)
    assert Counter(fi.groups) == {"test": 12, "train": 12, "val": 12}
    assert len(fi.skipped) == 1


def test_load_image_tree_on_class_folder(kermany):
    fi = load_image_tree(kermany / "test", SIZE)
    _check_arrays(fi, 12)
    assert fi.groups == [""] * 12


def test_tree_warns_about_folders_without_classes(kermany, tmp_path):
    (kermany / "docs").mkdir()
    with pytest.warns(UserWarning) as rec:
        load_image_tree(kermany, SIZE)
    assert any("'docs'" in str(w.message) for w in rec)


def test_detection_helpers(kermany, tmp_path):
    assert is_kermany_root(kermany)
    assert not is_kermany_root(kermany / "train")
    assert not has_class_folders(kermany)
    assert has_class_folders(kermany / "train") and has_class_folders(kermany / "test")
    assert not has_class_folders(tmp_path / "does-not-exist")
    assert not is_kermany_root(tmp_path / "does-not-exist")


def test_kermany_splits_without_val(kermany):
    import shutil

    shutil.rmtree(kermany / "val")
    shutil.rmtree(kermany / "train" / "OTHER")
    splits = load_kermany_splits(kermany, SIZE)
    assert set(splits) == {"train", "test"}


@pytest.mark.parametrize("remove", [["test"], ["train"], ["train", "val"], ["val", "test"]])
def test_a_folder_missing_a_split_is_refused_not_re_split(kermany, remove):
    """New-user finding: train/ + val/ without test/ was pooled and re-split 70/15/15 without a word."""
    import shutil

    from medrobust.data import load_data
    from medrobust.data.folders import split_layout_problem

    assert split_layout_problem(kermany) is None
    for split in remove:
        shutil.rmtree(kermany / split)
    problem = split_layout_problem(kermany)
    assert problem and str(kermany) in problem and "no " in problem and "re-split" in problem
    assert all(f"{s}/" in problem.split("but no")[1] for s in remove if s != "val")
    with pytest.raises(ValueError, match="but no"):
        load_data(str(kermany), image_size=SIZE, seed=0)
    assert split_layout_problem(kermany / ("val" if "val" not in remove else "test" if "test" not in remove
                                           else "train")) is None  # a folder of class folders


def test_a_lone_val_folder_among_groups_is_pooled_with_a_warning(kermany):
    import shutil

    from medrobust.data import load_data

    shutil.rmtree(kermany / "train")
    (kermany / "test").rename(kermany / "clinic_b")
    with pytest.warns(UserWarning, match="val/ included"):
        data = load_data(str(kermany), image_size=SIZE, seed=0)
    assert sum(len(data[s][1]) for s in ("train", "val", "test")) == 24


def test_not_a_kermany_root(kermany):
    with pytest.raises(ValueError, match="train"):
        load_kermany_splits(kermany / "val", SIZE)


def test_empty_root(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    for fn in (load_class_folder, load_image_tree):
        with pytest.raises(ValueError) as info:
            fn(root, SIZE)
        msg = str(info.value)
        assert str(root) in msg and "no class folders" in msg and "\n" not in msg


def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_class_folder(tmp_path / "nope", SIZE)
    f = tmp_path / "file.jpeg"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        load_image_tree(f, SIZE)


def test_class_folders_without_images(tmp_path):
    root = tmp_path / "noimg"
    (root / "CNV").mkdir(parents=True)
    (root / "NORMAL").mkdir()
    (root / "NORMAL" / "README.md").write_text("nothing here")
    with pytest.raises(ValueError) as info:
        load_class_folder(root, SIZE)
    msg = str(info.value)
    assert str(root) in msg and "no loadable images" in msg and "\n" not in msg


def test_class_folders_with_only_broken_images(tmp_path):
    root = tmp_path / "broken"
    (root / "DME").mkdir(parents=True)
    (root / "DME" / "DME-1-1.jpeg").write_text("not a jpeg")
    (root / "DME" / "DME-1-2.jpeg").write_bytes(b"")
    with pytest.raises(ValueError) as info:
        load_image_tree(root, SIZE)
    msg = str(info.value)
    assert "2 image files failed" in msg and "DME-1-1.jpeg" in msg and "\n" not in msg


def test_partial_class_set_is_fine(tmp_path):
    _img(tmp_path / "one" / "drusen" / "x.jpeg", LEVEL[2])
    fi = load_class_folder(tmp_path / "one", SIZE)
    assert fi.y.tolist() == [2]


def test_patient_id():
    assert patient_id("CNV-9890872-21.jpeg") == "9890872"
    assert patient_id("DRUSEN-228939-1.jpeg") == "228939"
    assert patient_id("/some/dir/NORMAL-12494-3.JPG") == "12494"
    assert patient_id(Path("val") / "DME" / "DME-9583225-2.jpeg") == "9583225"
    assert patient_id("dme-11053-1.jpeg") == "11053"
    assert patient_id("scan.jpeg") is None
    assert patient_id("OTHER-1-1.jpeg") is None
    assert patient_id("CNV-123.jpeg") is None
    assert patient_id(NON_ASCII) is None


# --------------------------------------------------------------------------- real data


def _real_subset() -> Path:
    env = os.environ.get("MEDROBUST_DATA")
    if env:
        return Path(env) / "oct2017_subset"
    repo = Path(__file__).resolve().parents[1]
    return repo.parent / "shared" / "data" / "oct2017_subset"


@pytest.mark.realdata
def test_real_oct2017_subset():
    root = _real_subset()
    if not root.is_dir():
        pytest.skip(f"real OCT subset not found at {root}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown folders, no Pillow warnings
        t0 = time.perf_counter()
        fi = load_image_tree(root, 28)
        elapsed = time.perf_counter() - t0
    assert elapsed < 30, elapsed  # ~0.1-1 s normally; generous for a shared machine
    assert len(fi) == 90 and fi.skipped == []
    assert fi.x.shape == (90, 28, 28, 1) and fi.x.dtype == np.float32
    assert np.all(np.isfinite(fi.x)) and fi.x.min() >= 0 and fi.x.max() <= 1
    counts = Counter(CLASSES[int(y)] for y in fi.y)
    assert counts == {"CNV": 24, "DME": 22, "DRUSEN": 21, "NORMAL": 23}
    assert Counter(fi.groups) == {"app_samples": 10, "unsplit": 48, "val": 32}
    # folder label agrees with the file-name prefix, and every name parses
    for f, y in zip(fi.files, fi.y):
        assert Path(f).name.split("-")[0] == CLASSES[int(y)]
    pids = fi.patients
    assert all(p is not None and p.isdigit() for p in pids)
    # documented leakage: patient 9928043 is in both val/ and unsplit/
    groups_of = {}
    for p, g in zip(pids, fi.groups):
        groups_of.setdefault(p, set()).add(g)
    assert groups_of["9928043"] == {"val", "unsplit"}
    # deterministic
    again = load_image_tree(root, 28)
    assert again.files == fi.files
    np.testing.assert_array_equal(again.x, fi.x)
