"""The TensorFlow-free edge runtime (medrobust-screen): signatures, bundle checks, odd files, outputs,
the command line, no TF import, and the light install.

The bundle here is built in-process from an untrained width-8 classifier and a stand-in detector
(the runtime does not care how good the models are), and signed with a key made for the module, so
this module needs no training run.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGE_SIZE = 28
REPO = Path(__file__).resolve().parents[1]
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

# The project modules a screening run of the installed command (medrobust_screen.cli:main, run as
# `python -m medrobust_screen`) loads, printed as JSON at exit, with TensorFlow made impossible.
LOADED = NO_TF.replace("import export\n", "").replace("import runpy", """import atexit, json
atexit.register(lambda: print(json.dumps(sorted(m for m in sys.modules
                                                if m.split(".")[0] in ("medrobust", "export", "medrobust_screen")))))
import runpy""").replace('run_module("export.runtime"', 'run_module("medrobust_screen"')
DEVICE = REPO / "medrobust_screen"


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
def keys(tmp_path_factory):
    """(private key, public key) of the bundle's publisher, and (private, public) of someone else."""
    from export.signing import generate_keypair

    root = tmp_path_factory.mktemp("keys")
    publisher = generate_keypair(root / "publisher")[:2]
    other = generate_keypair(root / "mallory")[:2]
    return types.SimpleNamespace(private=publisher[0], public=publisher[1], other_private=other[0],
                                 other_public=other[1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from medrobust.io import atomic_save_model, atomic_write_json
    from medrobust.models import build_classifier

    run = tmp_path_factory.mktemp("runtime") / "run"
    run.mkdir()
    classifier = build_classifier("small_cnn", IMAGE_SIZE, width=8)
    atomic_save_model(classifier, run / "classifier.keras")
    atomic_write_json(run / "config.json", {"image_size": IMAGE_SIZE, "data": "phantom", "data_source": "phantom",
                                            "synthetic_data": True, "seed": 0})
    return run


@pytest.fixture(scope="module")
def bundle_dir(run_dir, keys):
    from export.bundle import export_bundle

    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, (64, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    detector = _StandInDetector(calib)
    export_bundle(run_dir, run_dir.parent / "bundle", quantize="int8", onnx=False, data=calib, detector=detector,
                  signing_key=keys.private, log=lambda m: None)
    return run_dir.parent / "bundle"


@pytest.fixture(scope="module")
def trust(keys):
    """The options that make medrobust-screen check the publisher's signature."""
    return ["--trusted-key", str(keys.public)]


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


def test_screens_folder_with_odd_files_and_goes_on(bundle_dir, scans, trust, tmp_path, capsys):
    out = tmp_path / "results.csv"
    assert _main("--bundle", str(bundle_dir), *trust, str(scans), "--out", str(out)) == 1
    rows = _rows_csv(out)
    by_name = {Path(r["file"]).name: r for r in rows}
    n_real = len([n for n in by_name if n.startswith("real_")])
    assert set(by_name) == GOOD | BAD | {f"real_{i}.jpeg" for i in range(n_real)}
    assert list(rows[0]) == ["file", "verdict", "class", "confidence", "anomaly_score", "error", "training_data",
                             "bundle_signature"]
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
    assert "4 of " in err and "could not be screened" in err and "exit status 1" in err  # said, and in the status
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert _main("--bundle", str(bundle_dir), *trust, str(scans / "nested"), "--quiet") == 0  # all screened: 0


def test_json_output_explicit_files(bundle_dir, scans, trust, tmp_path):
    out = tmp_path / "results.json"
    files = [str(scans / "rgba.png"), str(scans / "notes.txt")]
    assert _main("--bundle", str(bundle_dir), *trust, *files, "--out", str(out), "--quiet") == 1
    doc = json.loads(out.read_text())
    assert [Path(r["file"]).name for r in doc["results"]] == ["rgba.png", "notes.txt"]
    ok, txt = doc["results"]
    assert ok["verdict"] in ("classify", "refer") and ok["error"] is None and isinstance(ok["anomaly_score"], float)
    assert txt["verdict"] == "error" and "not an image" in txt["error"]  # named explicitly: screened, fails
    assert doc["summary"]["images"] == 2 and doc["summary"]["error"] == 1
    assert doc["classes"] == ["CNV", "DME", "DRUSEN", "NORMAL"] and "refer" in doc["verdict_rule"]
    assert doc["bundle_signature"]["status"] == "verified"


def test_missing_input_path_is_a_usage_error_before_any_output(bundle_dir, scans, trust, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert _main("--bundle", str(bundle_dir), *trust, str(scans / "rgba.png"), str(tmp_path / "nope.png"),
                 "--out", str(out)) == 2
    captured = capsys.readouterr()
    assert "nope.png" in captured.err and "no such file or folder" in captured.err
    assert captured.out == "" and not list(tmp_path.iterdir())  # no output file, no temporary file
    assert _main("--bundle", str(bundle_dir), *trust, str(tmp_path / "nope")) == 2  # CSV on stdout: no header
    assert capsys.readouterr().out == ""


def test_stdout_csv_and_threads(bundle_dir, scans, trust, capsys):
    assert _main("--bundle", str(bundle_dir), *trust, str(scans / "nested"), "--threads", "2", "--quiet") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and all(r["verdict"] in ("classify", "refer") for r in rows)


def test_output_file_follows_the_umask(bundle_dir, scans, trust, tmp_path):
    old = os.umask(0o022)
    try:
        for name in ("r.csv", "r.json"):
            assert _main("--bundle", str(bundle_dir), *trust, str(scans / "nested"), "--out", str(tmp_path / name),
                         "--quiet") == 0
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)


def test_outputs_name_the_training_data_and_the_signature(bundle_dir, scans, trust, tmp_path, capsys):
    """The manifest records synthetic training data: stderr, every CSV row and the JSON header say so."""
    assert _main("--bundle", str(bundle_dir), *trust, str(scans / "nested"), "--quiet") == 0
    captured = capsys.readouterr()
    assert "SYNTHETIC" in captured.err  # a warning: printed even with --quiet
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert all("SYNTHETIC" in r["training_data"] and r["bundle_signature"].startswith("verified") for r in rows)
    out = tmp_path / "r.json"
    assert _main("--bundle", str(bundle_dir), *trust, str(scans / "nested"), "--out", str(out), "--quiet") == 0
    doc = json.loads(out.read_text())
    assert doc["training_data"]["synthetic"] is True and doc["training_data"]["source"] == "phantom"
    assert "SYNTHETIC" in doc["training_data"]["label"]


def test_runtime_matches_keras_preprocessing(bundle_dir, scans, keys):
    from medrobust.data.images import load_image

    from export import converters
    from export.runtime import Screener

    screener = Screener(bundle_dir, trusted_key=keys.public)
    x = load_image(scans / "rgba.png", IMAGE_SIZE)
    probs, score, flag = screener.predict(x)
    ref = converters.run_tflite((bundle_dir / "screening.tflite").read_bytes(), x[None])
    np.testing.assert_allclose(probs, ref["probabilities"][0], atol=1e-6)
    assert score == pytest.approx(float(ref["anomaly_score"][0]), abs=1e-6)
    assert flag == (score > screener.threshold)
    rows = screener.screen([str(scans)])
    assert isinstance(rows, types.GeneratorType)  # streaming: one image at a time


def test_no_images_found_is_an_error_with_no_output(bundle_dir, trust, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _main("--bundle", str(bundle_dir), *trust, str(tmp_path / "empty")) == 2
    captured = capsys.readouterr()
    assert "no image files found" in captured.err
    assert captured.out == ""  # no CSV header before the error


def test_bad_out_extension(bundle_dir, scans, trust, capsys):
    assert _main("--bundle", str(bundle_dir), *trust, str(scans), "--out", "results.xlsx") == 2
    assert ".csv or .json" in capsys.readouterr().err


@pytest.mark.parametrize("typo, meant", [("--thread", "--threads"), ("--bundel", "--bundle"),
                                         ("--trusted-keys", "--trusted-key"), ("--allow", "--allow-unsigned"),
                                         ("--qiet", "--quiet")])
def test_unknown_or_abbreviated_option_names_the_closest_one(bundle_dir, scans, trust, typo, meant, capsys):
    """No prefix matching (--allow must not silently become --allow-unsigned): every unknown option fails
    before any work, naming the option it most likely meant."""
    argv = ["--bundle", str(bundle_dir), *trust, str(scans / "nested")]
    argv = [typo if a == "--bundle" and typo == "--bundel" else a for a in argv]
    if typo != "--bundel":
        argv += [typo, "2"] if typo == "--thread" else [typo]
    with pytest.raises(SystemExit) as exc:
        _main(*argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert f"unknown option {typo} (did you mean {meant}?)" in captured.err and captured.out == ""


# ------------------------------------------------------------------------------ bundle integrity

def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


@pytest.mark.parametrize("name", ["screening.tflite", "detector.tflite"])
def test_one_changed_byte_is_refused(bundle_dir, scans, trust, tmp_path, capsys, name):
    bad = _copy(bundle_dir, tmp_path)
    data = bytearray((bad / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / name).write_bytes(bytes(data))
    assert _main("--bundle", str(bad), *trust, str(scans)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert name in err and "sha256" in err


def test_missing_file_is_refused(bundle_dir, scans, trust, tmp_path, capsys):
    bad = _copy(bundle_dir, tmp_path)
    (bad / "classifier.tflite").unlink()
    assert _main("--bundle", str(bad), *trust, str(scans)) == 2
    err = capsys.readouterr().err
    assert "classifier.tflite" in err and "missing" in err


@pytest.mark.parametrize("field", ["threshold", "files", "classes", "preprocessing.image_size",
                                   "models.screening.file"])
def test_manifest_missing_field_is_refused(bundle_dir, scans, keys, tmp_path, capsys, field):
    """Also when the bundle is re-signed after the edit (the manifest itself must be complete)."""
    bad = _copy(bundle_dir, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    node = manifest
    *parents, last = field.split(".")
    for key in parents:
        node = node[key]
    del node[last]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "signature.json").unlink()  # unsigned: --allow-unsigned reaches the manifest checks
    assert _main("--bundle", str(bad), "--allow-unsigned", str(scans)) == 2
    err = capsys.readouterr().err.strip()
    assert "missing field" in err and last in err
    (bad / "signature.json").write_text(json.dumps(_signature_over(bad, keys.private)))
    assert _main("--bundle", str(bad), "--trusted-key", str(keys.public), str(scans)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "missing field" in err and last in err


def test_no_manifest_and_broken_manifest_are_refused(bundle_dir, scans, tmp_path, capsys):
    bad = _copy(bundle_dir, tmp_path)
    (bad / "signature.json").unlink()
    (bad / "manifest.json").write_text("{ not json")
    assert _main("--bundle", str(bad), "--allow-unsigned", str(scans)) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (bad / "manifest.json").unlink()
    assert _main("--bundle", str(bad), "--allow-unsigned", str(scans)) == 2
    assert "no manifest.json" in capsys.readouterr().err
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"]["../escape.tflite"] = {"sha256": "0" * 64}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert _main("--bundle", str(bad), "--allow-unsigned", str(scans)) == 2
    assert "plain file name" in capsys.readouterr().err


# ----------------------------------------------------------------------------- signatures (issue 12)

def _signature_over(bundle: Path, private_key) -> dict:
    """A valid signature.json for the bundle's current manifest bytes, made with `private_key`."""
    from export.signing import load_private_key, sign_manifest

    return sign_manifest((bundle / "manifest.json").read_bytes(), load_private_key(private_key))


def test_signed_bundle_is_verified_and_needs_a_key_or_an_explicit_flag(bundle_dir, scans, keys, capsys):
    from export.runtime import Screener

    screener = Screener(bundle_dir, trusted_key=keys.public)
    assert screener.signature["status"] == "verified"
    assert screener.signature["key_fingerprint"] == json.loads((bundle_dir / "signature.json").read_text())[
        "key_fingerprint"]
    assert _main("--bundle", str(bundle_dir), str(scans / "nested")) == 2  # neither flag: refused
    err = capsys.readouterr().err
    assert "--trusted-key" in err and "--allow-unsigned" in err
    assert _main("--bundle", str(bundle_dir), "--trusted-key", str(keys.public), "--allow-unsigned",
                 str(scans / "nested")) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert _main("--bundle", str(bundle_dir), "--trusted-key", str(keys.private), str(scans / "nested")) == 2
    assert "private key" in capsys.readouterr().err  # the operator passed the wrong file


def test_a_provisioned_device_takes_the_trusted_key_from_the_environment(bundle_dir, scans, keys, tmp_path,
                                                                          monkeypatch, capsys):
    """INTERFACE's bare `medrobust-screen --bundle B IMAGES` works on a device set up with
    $MEDROBUST_TRUSTED_KEY; it still refuses a bundle signed by someone else, and an explicit
    --allow-unsigned is not overridden by the variable."""
    monkeypatch.setenv("MEDROBUST_TRUSTED_KEY", str(keys.public))
    assert _main("--bundle", str(bundle_dir), str(scans / "nested"), "--quiet") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows and all(r["bundle_signature"].startswith("verified") for r in rows)
    monkeypatch.setenv("MEDROBUST_TRUSTED_KEY", str(keys.other_public))
    assert _main("--bundle", str(bundle_dir), str(scans / "nested")) == 2
    capsys.readouterr()
    unsigned = _copy(bundle_dir, tmp_path)
    (unsigned / "signature.json").unlink()
    assert _main("--bundle", str(unsigned), "--allow-unsigned", str(scans / "nested"), "--quiet") == 0
    assert "NOT VERIFIED" in capsys.readouterr().err


def test_unsigned_bundle_works_only_with_allow_unsigned_and_every_output_says_so(bundle_dir, scans, trust,
                                                                                  tmp_path, capsys):
    unsigned = _copy(bundle_dir, tmp_path)
    (unsigned / "signature.json").unlink()
    assert _main("--bundle", str(unsigned), *trust, str(scans / "nested")) == 2
    assert "not signed" in capsys.readouterr().err
    assert _main("--bundle", str(unsigned), "--allow-unsigned", str(scans / "nested"), "--quiet") == 0
    captured = capsys.readouterr()
    assert "NOT VERIFIED" in captured.err  # printed even with --quiet
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert rows and all(r["bundle_signature"] == "NOT VERIFIED (--allow-unsigned)" for r in rows)
    out = tmp_path / "r.json"
    assert _main("--bundle", str(unsigned), "--allow-unsigned", str(scans / "nested"), "--out", str(out)) == 0
    assert json.loads(out.read_text())["bundle_signature"]["status"] == "not verified"


def test_edited_threshold_is_refused_signed_or_not(bundle_dir, scans, keys, tmp_path, capsys):
    """Issue 12: a manifest whose threshold was set to 1000 was accepted (the baked-in one still decided)."""
    bad = _copy(bundle_dir, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["threshold"] = 1000.0
    (bad / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert _main("--bundle", str(bad), "--trusted-key", str(keys.public), str(scans / "nested")) == 2
    assert "signature does not verify" in capsys.readouterr().err
    assert _main("--bundle", str(bad), "--allow-unsigned", str(scans / "nested")) == 2
    assert "is signed" in capsys.readouterr().err  # a present signature is never skipped
    (bad / "signature.json").unlink()
    assert _main("--bundle", str(bad), "--allow-unsigned", str(scans / "nested")) == 2
    err = capsys.readouterr().err
    assert "threshold 1000.0" in err and "baked in" in err
    # Even re-signed by the publisher's own key, the manifest does not describe its model.
    (bad / "signature.json").write_text(json.dumps(_signature_over(bad, keys.private)))
    assert _main("--bundle", str(bad), "--trusted-key", str(keys.public), str(scans / "nested")) == 2
    assert "baked in" in capsys.readouterr().err


def test_swapped_model_with_its_sha256_and_someone_elses_signature_is_refused(bundle_dir, scans, keys, tmp_path,
                                                                             capsys):
    """Issue 12: replacing screening.tflite together with its sha256 in the manifest was accepted."""
    from export.runtime import sha256_file

    bad = _copy(bundle_dir, tmp_path)
    data = bytearray((bad / "screening.tflite").read_bytes())
    data[len(data) // 2] ^= 0x01  # stands for a backdoored model (still the same graph here)
    (bad / "screening.tflite").write_bytes(bytes(data))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["screening.tflite"]["sha256"] = sha256_file(bad / "screening.tflite")
    (bad / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert _main("--bundle", str(bad), "--trusted-key", str(keys.public), str(scans / "nested")) == 2
    assert "signature does not verify" in capsys.readouterr().err
    # The attacker re-signs with their own key: still refused against the publisher's key.
    (bad / "signature.json").write_text(json.dumps(_signature_over(bad, keys.other_private)))
    assert _main("--bundle", str(bad), "--trusted-key", str(keys.public), str(scans / "nested")) == 2
    err = capsys.readouterr().err
    assert "signature does not verify" in err and "not by the trusted key" in err
    # ...and a forged fingerprint in signature.json changes nothing.
    doc = _signature_over(bad, keys.other_private)
    doc["key_fingerprint"] = json.loads((bundle_dir / "signature.json").read_text())["key_fingerprint"]
    (bad / "signature.json").write_text(json.dumps(doc))
    assert _main("--bundle", str(bad), "--trusted-key", str(keys.public), str(scans / "nested")) == 2
    assert "signature does not verify" in capsys.readouterr().err


def test_sign_refuses_a_bundle_whose_files_changed(bundle_dir, keys, tmp_path):
    from medrobust import cli

    from export.bundle import sign_bundle

    bad = _copy(bundle_dir, tmp_path)
    (bad / "classifier.tflite").write_bytes(b"not the exported model")
    with pytest.raises(cli.UsageError, match="not signing.*classifier.tflite"):
        sign_bundle(bad, keys.private, log=lambda m: None)


def test_keygen_and_sign_commands(bundle_dir, tmp_path):
    env = {**ENV, "H12_PASS": "correct horse"}
    key = tmp_path / "k"
    old = os.umask(0o022)
    try:
        proc = subprocess.run([sys.executable, "-m", "export", "keygen", "--out", str(key), "--passphrase-env",
                               "H12_PASS"], capture_output=True, text=True, env=env, timeout=120)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert "SHA256:" in proc.stdout and "--trusted-key" in proc.stdout
    assert key.stat().st_mode & 0o777 == 0o600 and (tmp_path / "k.pub").stat().st_mode & 0o777 == 0o644
    assert b"ENCRYPTED" in key.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "export", "keygen", "--out", str(key)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "already exists" in proc.stderr  # never overwrites a key
    bundle = _copy(bundle_dir, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "export", "sign", "--bundle", str(bundle), "--key", str(key)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "passphrase" in proc.stderr  # encrypted key, no passphrase given
    proc = subprocess.run([sys.executable, "-m", "export", "sign", "--bundle", str(bundle), "--key", str(key),
                           "--passphrase-env", "H12_PASS"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from export.runtime import Screener

    assert Screener(bundle, trusted_key=tmp_path / "k.pub").signature["status"] == "verified"


# ------------------------------------------------------------------------------- no TensorFlow

def test_runtime_runs_without_tensorflow(bundle_dir, scans, trust, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", NO_TF, "--bundle", str(bundle_dir), *trust, str(scans),
                           "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["summary"]["error"] == len(BAD) and doc["summary"]["images"] >= len(GOOD | BAD)
    assert "screened" in proc.stderr and doc["bundle_signature"]["status"] == "verified"


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
def test_predict_refuses_wrong_tensors_with_a_clear_message(bundle_dir, keys, bad, words):
    from export.runtime import Screener

    screener = Screener(bundle_dir, trusted_key=keys.public)
    if bad.shape[1:3] == (28, 28) and screener.image_size != 28:
        pytest.skip("bundle image size differs")
    with pytest.raises(ValueError, match=words):
        screener.predict(bad)
    probs, score, flag = screener.predict(np.zeros((screener.image_size,) * 2 + (1,), np.float32))
    assert probs.shape == (4,) and np.isfinite(score)


def test_light_install_has_no_tensorflow_and_ships_every_module_the_runtime_loads(bundle_dir, scans, trust, tmp_path):
    """Issue 12: the TF-free screening install printed a pip conflict (medrobust requires tensorflow).
    `pip install ./edge` is its own distribution: its requirements hold no TensorFlow, and it ships every
    project module a screening run (signature check included) actually loads.
    Issue 24: it ships the medrobust_screen package whole (every module in its folder, no hand-kept
    list), its command is medrobust_screen's, and a screening run loads nothing outside that package."""
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                          cwd=REPO / "edge", capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = next(tmp_path.glob("*.egg-info"))
    assert "Name: medrobust-screen" in (info / "PKG-INFO").read_text()
    base = (info / "requires.txt").read_text().split("\n[")[0]  # before the extras' sections
    requires = {re.split(r"[<>=!~;\[ ]", line)[0].lower() for line in base.split()}
    assert requires == {"numpy", "pillow", "ai-edge-litert", "cryptography", "pydicom"}
    assert "medrobust-screen = medrobust_screen.cli:main" in (info / "entry_points.txt").read_text()
    shipped = {line[len("../"):-len(".py")].replace("/", ".").removesuffix(".__init__")
               for line in (info / "SOURCES.txt").read_text().splitlines() if line.startswith("../")}
    in_folder = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for p in DEVICE.rglob("*.py")}
    assert shipped == in_folder, (sorted(in_folder - shipped), sorted(shipped - in_folder))
    run = subprocess.run([sys.executable, "-c", LOADED, "--bundle", str(bundle_dir), *trust, str(scans / "nested"),
                          "--quiet"], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = set(json.loads(run.stdout.strip().splitlines()[-1]))
    assert "medrobust_screen.signing" in loaded and loaded <= shipped, sorted(loaded - shipped)


def test_device_package_imports_no_tensorflow_and_nothing_of_the_training_side():
    """Issue 24: medrobust_screen imports no TensorFlow (nor Keras, ONNX) and nothing from medrobust or
    export, in its code (every import statement) and in fact (every module imported, TensorFlow installed)."""
    offenders = []
    for path in DEVICE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name} imports {n}" for n in names
                          if n.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "medrobust",
                                                 "export")]
    assert not offenders, offenders
    code = ("import importlib, pkgutil, sys, medrobust_screen\n"
            "for m in pkgutil.walk_packages(medrobust_screen.__path__, 'medrobust_screen.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "import medrobust_screen.cli, medrobust_screen.signing, cryptography.hazmat.primitives.asymmetric.ed25519\n"
            "medrobust_screen.cli.build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'onnx', 'onnxruntime', "
            "'tf2onnx', 'medrobust', 'export'))\n"
            "print(len([m for m in sys.modules if m.startswith('medrobust_screen.')]), bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout.split()[0]) >= len(list(DEVICE.glob("*.py"))) - 2  # all but __init__ and __main__


def test_old_and_new_command_paths_write_the_same_bytes(bundle_dir, scans, trust, tmp_path):
    """Issue 24: `python -m export.runtime` (kept for existing users) is the same command as the
    medrobust_screen package's: the same rows, byte for byte."""
    outputs = {}
    for module in ("export.runtime", "medrobust_screen"):
        out = tmp_path / f"{module}.csv"
        proc = subprocess.run([sys.executable, "-m", module, "--bundle", str(bundle_dir), *trust, str(scans),
                               "--out", str(out), "--quiet"],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        outputs[module] = out.read_bytes()
    assert outputs["export.runtime"] == outputs["medrobust_screen"] and outputs["export.runtime"].count(b"\n") > 10


def test_a_closed_pipe_ends_the_run_quietly(bundle_dir, scans, trust):
    """`medrobust-screen ... | head -1`: exit 141 (as after SIGPIPE), no traceback."""
    many = [str(scans)] * 40  # ~600 rows: more than a pipe buffer holds
    proc = subprocess.Popen([sys.executable, "-m", "export.runtime", "--bundle", str(bundle_dir), *trust, *many,
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout.readline().startswith(b"file,verdict")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err[-2000:]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def referral_bundle(run_dir, tmp_path_factory):
    """An unsigned float bundle of a run whose metrics.json carries a referral operating point."""
    from export.bundle import export_bundle
    from medrobust.io import atomic_write_json

    run = tmp_path_factory.mktemp("referral") / "run"
    shutil.copytree(run_dir, run)
    atomic_write_json(run / "metrics.json", {"referral": {
        "target_sensitivity": 0.95, "threshold": 0.74, "score": "1 - P(NORMAL)", "chosen_on": "val",
        "val": {"sensitivity": 0.96, "specificity": 0.5, "n_disease": 100, "n_normal": 50}}})
    calib = np.random.default_rng(0).uniform(0, 1, (16, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    export_bundle(run, run.parent / "bundle", quantize="none", onnx=False, data=calib,
                  detector=_StandInDetector(calib), log=lambda m: None)
    return run.parent / "bundle"


def test_the_referral_threshold_of_the_run_is_applied_on_the_device(referral_bundle, scans, tmp_path, capsys):
    from medrobust_screen.screener import Screener

    manifest = json.loads((referral_bundle / "manifest.json").read_text())
    assert manifest["referral"]["threshold"] == 0.74 and manifest["referral"]["target_sensitivity"] == 0.95
    out = tmp_path / "r.csv"
    assert _main("--bundle", str(referral_bundle), "--allow-unsigned", str(scans), "--out", str(out)) == 1
    rows = _rows_csv(out)
    assert list(rows[0])[-2:] == ["p_disease", "disease_screen"]
    screener = Screener(referral_bundle, allow_unsigned=True)
    normal = screener.classes.index("NORMAL")
    seen = set()
    for row in rows:
        if row["verdict"] == "error":
            assert row["p_disease"] == "" and row["disease_screen"] == ""
            continue
        probs, _, _ = screener.predict(screener.load(row["file"]))
        assert float(row["p_disease"]) == pytest.approx(1 - probs[normal], abs=2e-6)
        assert row["disease_screen"] == ("positive" if float(row["p_disease"]) >= 0.74 else "negative")
        seen.add(row["disease_screen"])
    positives = sum(r["disease_screen"] == "positive" for r in rows)
    assert f"{positives} screen positive" in capsys.readouterr().err
    doc_path = tmp_path / "r.json"
    assert _main("--bundle", str(referral_bundle), "--allow-unsigned", str(scans), "--out", str(doc_path),
                 "--quiet") == 1
    doc = json.loads(doc_path.read_text())
    assert doc["referral"]["threshold"] == 0.74 and "1 - P(NORMAL)" in doc["referral"]["rule"]
    assert doc["summary"]["screen_positive"] == positives
    assert all(r["disease_screen"] is None for r in doc["results"] if r["verdict"] == "error")


def test_a_signed_bundle_is_never_screened_unchecked(referral_bundle, scans, keys, tmp_path, capsys):
    """New-user finding: --allow-unsigned on a signed bundle skipped the check, so an edited referral threshold
    (in the manifest only, not baked into a model) was used: 0.99 made every screen negative."""
    signed = _copy(referral_bundle, tmp_path)
    (signed / "signature.json").write_text(json.dumps(_signature_over(signed, keys.private)))
    assert _main("--bundle", str(signed), "--allow-unsigned", str(scans)) == 2  # signed: the flag is refused
    err = capsys.readouterr().err
    assert "is signed" in err and "--trusted-key" in err and len(err.strip().splitlines()) == 1
    manifest = json.loads((signed / "manifest.json").read_text())
    manifest["referral"]["threshold"] = 0.99
    (signed / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "r.csv"
    assert _main("--bundle", str(signed), "--allow-unsigned", str(scans), "--out", str(out)) == 2
    assert _main("--bundle", str(signed), "--trusted-key", str(keys.public), str(scans), "--out", str(out)) == 2
    assert "signature does not verify" in capsys.readouterr().err
    assert not out.exists()
    (signed / "signature.json").write_text("{ not json")  # a broken signature is no way around the check
    assert _main("--bundle", str(signed), "--allow-unsigned", str(scans)) == 2
    assert "signature.json" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.5", True])
def test_a_referral_threshold_that_is_no_probability_is_refused(referral_bundle, scans, tmp_path, capsys, bad):
    broken = _copy(referral_bundle, tmp_path)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["referral"]["threshold"] = bad
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert _main("--bundle", str(broken), "--allow-unsigned", str(scans)) == 2
    assert "referral.threshold" in capsys.readouterr().err


# ------------------------------------------------------------------------- detector part scores (issue 23)

@pytest.fixture(scope="module")
def parts_detector(run_dir):
    """A real medrobust Detector (the default parts, no autoencoder) for the run's classifier, fitted on phantom
    images: (detector, clean test images)."""
    from medrobust.data import load_data
    from medrobust.detection import Detector
    from medrobust.models import load_classifier

    data = load_data("phantom", image_size=IMAGE_SIZE, seed=0)
    classifier = load_classifier(run_dir / "classifier.keras")
    detector = Detector.fit(classifier, data["train"][0][:300], data["val"][0][:200], epochs=1)
    return detector, data["test"][0][:32]


@pytest.fixture(scope="module")
def parts_bundle(run_dir, parts_detector, tmp_path_factory):
    """An unsigned float bundle whose screening model has the part_scores output."""
    from export.bundle import export_bundle

    detector, x = parts_detector
    out = tmp_path_factory.mktemp("parts") / "bundle"
    export_bundle(run_dir, out, quantize="none", onnx=False, data=x, detector=detector, log=lambda m: None)
    return out


def test_the_bundle_lists_the_detector_parts_and_its_part_scores_make_the_anomaly_score(parts_bundle, parts_detector):
    from medrobust_screen.screener import Screener

    detector, x = parts_detector
    manifest = json.loads((parts_bundle / "manifest.json").read_text())
    parts = manifest["detector"]["parts"]
    assert [p["name"] for p in parts] == list(detector.parts) and all(p["description"] for p in parts)
    assert manifest["detector"]["combination"]["rule"] == detector.combination
    assert "part_scores" in manifest["outputs"] and "part_scores" in manifest["files"]["screening.tflite"]["outputs"]
    screener = Screener(parts_bundle, allow_unsigned=True)
    assert screener.part_names == tuple(detector.parts) and screener.columns[-1] == "top_part"
    keras_scores = detector.score(x[:8])
    keras_parts = detector.part_scores(keras_scores)  # numpy standardisation of the Keras detector's parts
    for i in range(8):
        probs, score, flag, z = screener.predict_parts(x[i])
        assert z.shape == (len(detector.parts),) and z.dtype == np.float32
        # the device's part scores are the Keras detector's, and combine to the device's own anomaly score
        np.testing.assert_allclose(z, keras_parts[i], rtol=1e-3, atol=5e-3)
        assert abs(detector.combine(z[None])[0] - score) <= 1e-4 * max(1.0, abs(score))  # float32 rounding
        p3, s3, f3 = screener.predict(x[i])  # predict: the same first three values
        assert np.array_equal(p3, probs) and (s3, f3) == (score, flag)
    # a changed part score would not give the combined score back: the check above can fail
    z = screener.predict_parts(x[0])[3]
    assert abs(detector.combine((z + np.eye(len(z), dtype=np.float32)[int(np.argmax(z))])[None])[0]
               - detector.combine(z[None])[0]) > 0.1


def test_rows_name_the_top_part_only_for_bundles_with_part_scores(parts_bundle, bundle_dir, scans, trust, keys,
                                                                 tmp_path):
    from medrobust_screen.screener import Screener

    out, old = tmp_path / "new.csv", tmp_path / "old.csv"
    assert _main("--bundle", str(parts_bundle), "--allow-unsigned", str(scans), "--out", str(out), "--quiet") == 1
    assert _main("--bundle", str(bundle_dir), *trust, str(scans), "--out", str(old), "--quiet") == 1
    rows, old_rows = _rows_csv(out), _rows_csv(old)
    assert list(rows[0])[-1] == "top_part" and "top_part" not in old_rows[0]
    screener = Screener(parts_bundle, allow_unsigned=True)
    assert Screener(bundle_dir, trusted_key=keys.public).parts is None
    for row in rows:
        if row["verdict"] == "error":
            assert row["top_part"] == ""
            continue
        z = screener.predict_parts(screener.load(row["file"]))[3]
        assert row["top_part"] == screener.part_names[int(np.argmax(z))]
    doc_path = tmp_path / "new.json"
    assert _main("--bundle", str(parts_bundle), "--allow-unsigned", str(scans), "--out", str(doc_path), "--quiet") == 1
    doc = json.loads(doc_path.read_text())
    assert [p["name"] for p in doc["detector_parts"]] == list(screener.part_names)
    assert all(("top_part" in r) and (r["top_part"] or r["verdict"] == "error") for r in doc["results"])
    old_doc = tmp_path / "old.json"
    assert _main("--bundle", str(bundle_dir), *trust, str(scans), "--out", str(old_doc), "--quiet") == 1
    old_doc = json.loads(old_doc.read_text())
    assert "detector_parts" not in old_doc and not any("top_part" in r for r in old_doc["results"])


def test_the_report_shows_the_part_scores_and_names_the_top_part(parts_bundle, bundle_dir, scans, trust, tmp_path):
    html_path, out = tmp_path / "r.html", tmp_path / "r.csv"
    assert _main("--bundle", str(parts_bundle), "--allow-unsigned", str(scans), "--out", str(out), "--report",
                 str(html_path), "--quiet") == 1
    text = html_path.read_text(encoding="utf-8")
    rows = [r for r in _rows_csv(out) if r["verdict"] != "error"]
    names = json.loads((parts_bundle / "manifest.json").read_text())["detector"]["parts"]
    assert "only the combined anomaly score" not in text and "no per-part scores" not in text
    assert text.count('<table class="parts">') == len(rows)
    for row in rows:
        assert f"top part <b>{row['top_part']}</b>" in text
    for part in names:
        assert f">{part['name']}</td>" in text and part["name"] in text
    old = tmp_path / "old.html"
    assert _main("--bundle", str(bundle_dir), *trust, str(scans), "--report", str(old), "--quiet") == 1
    old_text = old.read_text(encoding="utf-8")
    assert "only the combined anomaly score" in old_text and '<table class="parts">' not in old_text


@pytest.mark.parametrize("change", ["drop", "extra", "bad"])
def test_a_manifest_whose_parts_do_not_match_the_model_is_refused(parts_bundle, bundle_dir, scans, tmp_path, capsys,
                                                                  change):
    broken = _copy(bundle_dir if change == "extra" else parts_bundle, tmp_path)
    manifest = json.loads((broken / "manifest.json").read_text())
    if change == "drop":
        del manifest["detector"]["parts"]
    elif change == "extra":  # an old model (no part_scores output) with a manifest claiming parts
        manifest["detector"]["parts"] = [{"name": "boundary", "description": ""}]
    else:
        manifest["detector"]["parts"] = manifest["detector"]["parts"][:-1]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "signature.json").unlink(missing_ok=True)
    assert _main("--bundle", str(broken), "--allow-unsigned", str(scans)) == 2
    assert "part" in capsys.readouterr().err
