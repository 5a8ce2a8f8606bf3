"""train --unlabeled PATH: a pool of never-labeled scans for SSAT (medrobust/data/unlabeled.py), on real data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medrobust.data import OCTData
from medrobust.data.folders import load_class_folder
from medrobust.data.unlabeled import leaks, load_unlabeled

pytestmark = pytest.mark.realdata


def _octmnist_subset(real_scans: Path) -> Path:
    path = real_scans.parent / "octmnist_subset" / "octmnist_subset.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_a_folder_is_read_recursively_labels_ignored_and_corrupt_files_named(real_scans, tmp_path):
    whole = load_unlabeled(real_scans, 28)
    assert len(whole) == 90 and not whole.skipped and whole.x.shape == (90, 28, 28, 1)
    # Any names and depths; a file that does not decode is skipped and named, not fatal.
    sources = sorted((real_scans / "val").rglob("*.jpeg"))[:3]
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(sources[0], tmp_path / "scan_one.jpeg")
    shutil.copy(sources[1], tmp_path / "a" / "whatever.jpeg")
    shutil.copy(sources[2], tmp_path / "a" / "b" / "x.jpeg")
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("not an image")
    pool = load_unlabeled(tmp_path, 28)
    assert len(pool) == 3 and [Path(f).name for f, _ in pool.skipped] == ["broken.png"]
    from medrobust.data.images import load_image

    np.testing.assert_array_equal(pool.x[pool.files.index(str(tmp_path / "a" / "whatever.jpeg"))],
                                  load_image(sources[1], 28))  # the project's own loader and resize
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_unlabeled(tmp_path / "empty", 28)


def test_an_npz_gives_its_train_images(real_scans):
    pool = load_unlabeled(_octmnist_subset(real_scans), 28)
    assert len(pool) == 1387 and pool.x.dtype == np.float32 and 0.0 <= pool.x.min() <= pool.x.max() <= 1.0
    assert pool.patients == [None] * 1387


def test_leaks_into_val_or_test_are_found_by_patient_and_by_pixels(real_scans, tmp_path):
    val = load_class_folder(real_scans / "val", 28)
    data = OCTData({"train": (val.x[:0], val.y[:0]), "val": (val.x, val.y), "test": (val.x[:0], val.y[:0])},
                   source="test", synthetic=False, image_size=28, patients={"val": val.patients, "test": []})
    # Another scan of a val patient, under its Kermany name: the same patient.
    whole = load_unlabeled(real_scans, 28)
    found = leaks(whole, data)
    assert set(found) == {"val"} and set(found["val"]["patients"]) == {p for p in val.patients if p}
    # A val image under a new name (no patient id left): the same pixels.
    shutil.copy(val.files[0], tmp_path / "renamed.jpeg")
    found = leaks(load_unlabeled(tmp_path, 28), data)
    assert found == {"val": {"patients": [], "images": [str(tmp_path / "renamed.jpeg")]}}
    # Scans of other patients: no leak.
    others = tmp_path / "others"
    others.mkdir()
    for f in sorted((real_scans / "unsplit").rglob("*.jpeg")):
        if f.name.split("-")[1] not in set(val.patients):
            shutil.copy(f, others / f.name)
    assert leaks(load_unlabeled(others, 28), data) == {}


def _run(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "medrobust.train", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("args, words", [
    (["--method", "standard", "--unlabeled", "{scans}"], "--unlabeled is for --method ssat"),
    (["--unlabeled", "/no/such/pool"], "--unlabeled /no/such/pool: no such file or folder"),
])
def test_bad_unlabeled_options_are_one_line_errors(real_scans, tmp_path, args, words):
    args = [a.replace("{scans}", str(real_scans)) for a in args]
    result = _run("--data", "phantom", *args, "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "r").exists()


def test_a_pool_sharing_patients_with_val_or_test_is_refused_before_work(real_scans, tmp_path):
    """oct2017_subset's 90 scans are inside kermany/ (some in its val and test splits)."""
    kermany = real_scans.parent / "kermany"
    if not kermany.is_dir():
        pytest.skip("kermany/ not found")
    result = _run("--data", str(kermany), "--unlabeled", str(real_scans), "--epochs", "1",
                  "--out", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --unlabeled") and "val:" in line and "test:" in line and "patients" in line
    assert not (tmp_path / "r").exists()


def test_ssat_trains_with_the_pool_and_records_it(real_scans, tmp_path):
    npz = _octmnist_subset(real_scans)
    out = tmp_path / "r"
    result = _run("--data", "phantom", "--unlabeled", str(npz), "--ssat-loss", "ce", "--teacher", "snapshot",
                  "--epochs", "1", "--batch-size", "200", "--width", "8", "--detector", "false",
                  "--pretrain-epochs", "0.2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["unlabeled"] == str(npz) and config["n_unlabeled"] == 3600
    pool = config["unlabeled_pool"]
    assert pool["count"] == 1387 and pool["skipped"] == [] and pool["source"].startswith("npz:")
    assert "+ 1387 unlabeled from --unlabeled" in result.stdout
    assert "names no patients" in result.stderr  # the phantom: only identical images could be checked
