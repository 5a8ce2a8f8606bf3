"""The TensorFlow-free edge runtime (medrobust-screen): bundle checks, odd files, outputs, no TF import.

The bundle here is built in-process from an untrained width-8 classifier and a stand-in detector
(the runtime does not care how good the models are), so this module needs no training run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGE_SIZE = 28
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
REAL_DATA = Path(os.environ.get("MEDROBUST_DATA", "/nonexistent")) / "oct2017_subset"
if not REAL_DATA.is_dir():
    REAL_DATA = Path("/work/shared/data/oct2017_subset")

# Run the runtime with TensorFlow (and the other heavy packages) made impossible to import.
NO_TF = """
import sys
for name in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "tf_keras", "jax", "torch"):
    sys.modules[name] = None  # any import of these now raises ImportError
import export
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "onnx", "onnxruntime")
               and sys.modules[m] is not None)
assert not heavy, heavy
import runpy
sys.argv = ["medrobust-screen"] + sys.argv[1:]
runpy.run_module("export.runtime", run_name="__main__", alter_sys=True)
"""


class _StandInDetector:
    """An untrained conv autoencoder; combined score = reconstruction MSE; threshold = median score."""

    def __init__(self, x):
        import keras
        from keras import layers

        keras.utils.set_random_seed(1)
        inp = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
        h = layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
        out = layers.Conv2D(1, 3, padding="same", activation="sigmoid")(h)
        self.autoencoder = keras.Model(inp, out)
        rec = self.autoencoder.predict(x, verbose=0)
        self.threshold = float(np.median(np.mean((rec - x) ** 2, axis=(1, 2, 3))))

    def score_model(self):
        import keras
        from keras import ops

        inp = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
        return keras.Model(inp, [ops.mean(ops.square(self.autoencoder(inp) - inp), axis=(1, 2, 3))])


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from medrobust.io import atomic_save_model, atomic_write_json
    from medrobust.models import build_classifier

    from export.bundle import export_bundle

    root = tmp_path_factory.mktemp("runtime")
    run = root / "run"
    run.mkdir()
    classifier = build_classifier("small_cnn", IMAGE_SIZE, width=8)
    atomic_save_model(classifier, run / "classifier.keras")
    atomic_write_json(run / "config.json", {"image_size": IMAGE_SIZE, "data": "phantom", "seed": 0})
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, (64, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    detector = _StandInDetector(calib)
    export_bundle(run, root / "bundle", quantize="int8", onnx=False, data=calib, detector=detector,
                  log=lambda m: None)
    return root / "bundle"


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A folder tree of good and odd files."""
    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    real = sorted(REAL_DATA.rglob("*.jpeg"))[:3] if REAL_DATA.is_dir() else []
    for i, src in enumerate(real):
        shutil.copy(src, root / f"real_{i}.jpeg")
    for i in range(3):
        _png(root / "nested" / "deeper" / f"grey_{i}.png", rng.integers(0, 256, (64, 80), dtype=np.uint8))
    _png(root / "rgba.png", rng.integers(0, 256, (40, 40, 4), dtype=np.uint8))  # alpha composited on black
    Image.fromarray(rng.integers(0, 65536, (40, 50), dtype=np.uint16).astype(np.uint16)).save(root / "sixteen.png")
    (root / "zero.jpeg").write_bytes(b"")
    (root / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(good, "JPEG")
    (root / "truncated.jpeg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    _png(root / "tiny.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))  # below MIN_SIDE
    (root / "notes.txt").write_text("not an image")  # ignored in folders
    _png(root / ".hidden.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))  # hidden: skipped
    return root


GOOD = {"rgba.png", "sixteen.png", "grey_0.png", "grey_1.png", "grey_2.png"}
BAD = {"zero.jpeg", "corrupt.jpeg", "truncated.jpeg", "tiny.png"}


def _main(*args: str) -> int:
    from export.runtime import main

    return main(list(args))


def _rows_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_screens_folder_with_odd_files_and_goes_on(bundle_dir, scans, tmp_path, capsys):
    out = tmp_path / "results.csv"
    assert _main("--bundle", str(bundle_dir), str(scans), "--out", str(out)) == 0
    rows = _rows_csv(out)
    by_name = {Path(r["file"]).name: r for r in rows}
    n_real = len([n for n in by_name if n.startswith("real_")])
    assert set(by_name) == GOOD | BAD | {f"real_{i}.jpeg" for i in range(n_real)}
    assert list(rows[0]) == ["file", "verdict", "class", "confidence", "anomaly_score", "error"]
    threshold = json.loads((bundle_dir / "manifest.json").read_text())["threshold"]
    for name, row in by_name.items():
        if name in BAD:
            assert row["verdict"] == "error" and row["error"] and row["class"] == "", row
        else:
            assert row["verdict"] in ("classify", "refer") and not row["error"], row
            assert row["class"] in ("CNV", "DME", "DRUSEN", "NORMAL")
            assert 0.25 <= float(row["confidence"]) <= 1.0
            assert (row["verdict"] == "refer") == (float(row["anomaly_score"]) > threshold)
    assert "empty file" in by_name["zero.jpeg"]["error"]
    assert "too small" in by_name["tiny.png"]["error"]
    assert "corrupt" in by_name["corrupt.jpeg"]["error"] or "not an image" in by_name["corrupt.jpeg"]["error"]
    err = capsys.readouterr().err
    assert "4 errors" in err and "1 non-image files ignored" in err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_output_explicit_files_and_missing_path(bundle_dir, scans, tmp_path):
    out = tmp_path / "results.json"
    files = [str(scans / "rgba.png"), str(scans / "notes.txt"), str(tmp_path / "nope.png")]
    assert _main("--bundle", str(bundle_dir), *files, "--out", str(out), "--quiet") == 0
    doc = json.loads(out.read_text())
    assert [Path(r["file"]).name for r in doc["results"]] == ["rgba.png", "notes.txt", "nope.png"]
    ok, txt, missing = doc["results"]
    assert ok["verdict"] in ("classify", "refer") and ok["error"] is None and isinstance(ok["anomaly_score"], float)
    assert txt["verdict"] == "error" and "not an image" in txt["error"]  # named explicitly: screened, fails
    assert missing["verdict"] == "error" and "not found" in missing["error"]
    assert doc["summary"]["images"] == 3 and doc["summary"]["error"] == 2
    assert doc["classes"] == ["CNV", "DME", "DRUSEN", "NORMAL"] and "refer" in doc["verdict_rule"]


def test_stdout_csv_and_threads(bundle_dir, scans, capsys):
    assert _main("--bundle", str(bundle_dir), str(scans / "nested"), "--threads", "2", "--quiet") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and all(r["verdict"] in ("classify", "refer") for r in rows)


def test_runtime_matches_keras_preprocessing(bundle_dir, scans):
    from medrobust.data.images import load_image

    from export import converters
    from export.runtime import Screener

    screener = Screener(bundle_dir)
    x = load_image(scans / "rgba.png", IMAGE_SIZE)
    probs, score, flag = screener.predict(x)
    ref = converters.run_tflite((bundle_dir / "screening.tflite").read_bytes(), x[None])
    np.testing.assert_allclose(probs, ref["probabilities"][0], atol=1e-6)
    assert score == pytest.approx(float(ref["anomaly_score"][0]), abs=1e-6)
    assert flag == (score > screener.threshold)
    rows = screener.screen([str(scans)])
    assert isinstance(rows, types.GeneratorType)  # streaming: one image at a time


def test_no_images_found_is_an_error(bundle_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _main("--bundle", str(bundle_dir), str(tmp_path / "empty")) == 2
    assert "no image files found" in capsys.readouterr().err


def test_bad_out_extension(bundle_dir, scans, capsys):
    assert _main("--bundle", str(bundle_dir), str(scans), "--out", "results.xlsx") == 2
    assert ".csv or .json" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bundle integrity

def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


@pytest.mark.parametrize("name", ["screening.tflite", "detector.tflite"])
def test_one_changed_byte_is_refused(bundle_dir, scans, tmp_path, capsys, name):
    bad = _copy(bundle_dir, tmp_path)
    data = bytearray((bad / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / name).write_bytes(bytes(data))
    assert _main("--bundle", str(bad), str(scans)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert name in err and "sha256" in err


def test_missing_file_is_refused(bundle_dir, scans, tmp_path, capsys):
    bad = _copy(bundle_dir, tmp_path)
    (bad / "classifier.tflite").unlink()
    assert _main("--bundle", str(bad), str(scans)) == 2
    err = capsys.readouterr().err
    assert "classifier.tflite" in err and "missing" in err


@pytest.mark.parametrize("field", ["threshold", "files", "classes", "preprocessing.image_size",
                                   "models.screening.file"])
def test_manifest_missing_field_is_refused(bundle_dir, scans, tmp_path, capsys, field):
    bad = _copy(bundle_dir, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    node = manifest
    *parents, last = field.split(".")
    for key in parents:
        node = node[key]
    del node[last]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert _main("--bundle", str(bad), str(scans)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "missing field" in err and last in err


def test_no_manifest_and_broken_manifest_are_refused(bundle_dir, scans, tmp_path, capsys):
    bad = _copy(bundle_dir, tmp_path)
    (bad / "manifest.json").write_text("{ not json")
    assert _main("--bundle", str(bad), str(scans)) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (bad / "manifest.json").unlink()
    assert _main("--bundle", str(bad), str(scans)) == 2
    assert "no manifest.json" in capsys.readouterr().err
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"]["../escape.tflite"] = {"sha256": "0" * 64}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert _main("--bundle", str(bad), str(scans)) == 2
    assert "plain file name" in capsys.readouterr().err


# ------------------------------------------------------------------------------- no TensorFlow

def test_runtime_runs_without_tensorflow(bundle_dir, scans, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", NO_TF, "--bundle", str(bundle_dir), str(scans), "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["summary"]["error"] == len(BAD) and doc["summary"]["images"] >= len(GOOD | BAD)
    assert "screened" in proc.stderr


def test_console_script_and_module_help():
    script = Path(sys.executable).with_name("medrobust-screen")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "export.runtime"]
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and "--bundle" in proc.stdout and "refer" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "export.runtime"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 2 and "--bundle" in proc.stderr


def test_export_package_import_is_light():
    code = ("import sys, export, export.runtime; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'onnx', 'onnxruntime', "
            "'tf2onnx', 'sklearn')]; print(heavy); assert not heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("bad, words", [
    (np.zeros((3, 3, 1), np.float32), "shape"),
    (np.zeros((2, 28, 28, 1), np.float32), "shape"),
    (np.full((28, 28, 1), np.nan, np.float32), "finite"),
    (np.full((28, 28, 1), 7.0, np.float32), "in \\[0, 1\\]"),
    (np.zeros((28, 28, 1), np.complex64), "dtype"),
])
def test_predict_refuses_wrong_tensors_with_a_clear_message(bundle_dir, bad, words):
    from export.runtime import Screener

    screener = Screener(bundle_dir)
    if bad.shape[1:3] == (28, 28) and screener.image_size != 28:
        pytest.skip("bundle image size differs")
    with pytest.raises(ValueError, match=words):
        screener.predict(bad)
    probs, score, flag = screener.predict(np.zeros((screener.image_size,) * 2 + (1,), np.float32))
    assert probs.shape == (4,) and np.isfinite(score)
