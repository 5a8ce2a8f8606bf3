"""Edge export: converters round-trip, bundle + manifest, parity with Keras (phantom and real scans).

One small run is trained for the whole module (width-16 small CNN, 3 epochs on the phantom: a
weaker model has so many near-tie predictions that int8 rounding flips more than 2%); it gets
the real UAD detector when medrobust.detection provides one, else a stand-in built the same way
(an autoencoder whose reconstruction MSE is the combined score).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REAL_DATA = Path(os.environ.get("MEDROBUST_DATA", "/nonexistent")) / "oct2017_subset"
if not REAL_DATA.is_dir():
    REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "oct2017_subset"
if not REAL_DATA.is_dir():
    REAL_DATA = Path("/work/shared/data/oct2017_subset")

IMAGE_SIZE = 28
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def real_detector_available() -> bool:
    try:
        from medrobust.detection import Detector  # noqa: F401
    except ImportError:
        return False
    return True


class StandInDetector:
    """Stand-in for medrobust.detection.Detector: a tiny conv autoencoder, combined score = MSE."""

    def __init__(self, x_train, x_val, epochs: int = 2, fpr: float = 0.05):
        import keras
        from keras import layers

        keras.utils.set_random_seed(0)
        inp = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
        h = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
        h = layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu")(h)
        out = layers.Conv2D(1, 3, padding="same", activation="sigmoid")(h)
        self.autoencoder = keras.Model(inp, out)
        self.autoencoder.compile("adam", "mse")
        self.autoencoder.fit(x_train, x_train, epochs=epochs, batch_size=64, verbose=0)
        self.threshold = float(np.quantile(self.score(x_val)["combined"], 1 - fpr))

    def score_model(self):
        import keras
        from keras import ops

        inp = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
        mse = ops.mean(ops.square(self.autoencoder(inp) - inp), axis=(1, 2, 3))
        return keras.Model(inp, {"combined": mse, "reconstruction": mse})

    def score(self, x):
        rec = self.autoencoder.predict(x, verbose=0, batch_size=256)
        return {"combined": np.mean((rec - x) ** 2, axis=(1, 2, 3))}


@pytest.fixture(scope="module")
def phantom():
    from medrobust.data import load_data

    return load_data("phantom", image_size=IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    cmd = [sys.executable, "-m", "medrobust.train", "--data", "phantom", "--method", "standard",
           "--label-fraction", "1.0", "--epochs", "3", "--width", "16", "--out", str(out), "--progress", "false",
           "--detector", "true" if real_detector_available() else "false"]
    if real_detector_available():
        cmd += ["--detector-epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def detector(run_dir, phantom):
    """None = the run's own detector/ (real one); else the stand-in."""
    if (run_dir / "detector").exists():
        return None
    return StandInDetector(phantom["train"][0][:2000], phantom["val"][0])


@pytest.fixture(scope="module")
def bundle_dir(run_dir, phantom, detector, tmp_path_factory):
    """int8 + ONNX bundle: through the CLI when the run has its real detector, else in-process."""
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "b"
    if detector is not None:
        export_bundle(run_dir, out, quantize="int8", onnx=True, data=phantom, detector=detector,
                      calibration=500, log=lambda m: None)
        return out
    proc = subprocess.run([sys.executable, "-m", "export", "bundle", "--run", str(run_dir), "--out", str(out),
                           "--quantize", "int8", "--onnx", "true", "--calibration", "500"],
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/9] screening.tflite: converting (int8)..." in proc.stdout  # progress lines
    assert "wrote" in proc.stdout
    return out


@pytest.fixture(scope="module")
def parity(bundle_dir, phantom, detector):
    from export.verify import verify_bundle

    return verify_bundle(bundle_dir, data=phantom, square_queries=100, square_limit=50,
                         detector=detector, log=lambda m: None)


@pytest.fixture(scope="module")
def keras_models(run_dir, detector):
    from medrobust.models import load_classifier

    from export import screening
    from export.bundle import load_detector

    classifier = load_classifier(run_dir / "classifier.keras")
    det = detector if detector is not None else load_detector(run_dir, classifier)
    return classifier, det


# ------------------------------------------------------------------------------------ converters

def test_tflite_converters_round_trip(keras_models, phantom, bundle_dir):
    from ai_edge_litert.interpreter import Interpreter

    from export import converters, screening

    classifier, _ = keras_models
    model = screening.classifier_model(classifier)
    x = phantom["test"][0][:64]
    ref = converters.run_keras(model, x)
    calib = converters.representative_batches(phantom["train"][0], 50)
    tolerance = {"none": 1e-4, "float16": 5e-2, "int8": None}
    for quantize, tol in tolerance.items():
        content = converters.to_tflite(model, quantize, calib)
        interpreter = Interpreter(model_content=content, num_threads=1)  # loads in LiteRT
        runner = interpreter.get_signature_runner("serving_default")
        out = runner(image=x)
        assert set(out) == {"logits", "probabilities"}
        assert out["logits"].shape == (64, 4) and out["logits"].dtype == np.float32
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-3)
        if tol is not None:
            assert np.max(np.abs(out["logits"] - ref["logits"])) <= tol, quantize
    # int8 really runs int8 kernels, behind float32 I/O.
    details = converters.tflite_io_details((bundle_dir / "classifier.tflite").read_bytes())
    assert "int8" in details["tensor_dtypes"]
    assert details["inputs"]["image"]["dtype"] == "float32"
    assert all(o["dtype"] == "float32" for o in details["outputs"].values())


def test_full_integer_scope_converts(keras_models, phantom):
    from export import converters, screening

    classifier, _ = keras_models
    calib = converters.representative_batches(phantom["train"][0], 50)
    content = converters.to_tflite(screening.classifier_model(classifier), "int8", calib, int8_scope="full")
    ops = converters.tflite_op_summary(content)
    assert "CONV_2D" in ops["int8"] and "SOFTMAX" in ops["int8"]
    out = converters.run_tflite(content, phantom["test"][0][:8])
    assert out["logits"].shape == (8, 4)


def test_onnx_round_trip(bundle_dir, keras_models, phantom):
    import onnx
    import onnxruntime as ort

    from export import converters, screening

    classifier, det = keras_models
    x = phantom["test"][0][:128]
    for name in ("classifier", "detector", "screening"):
        for suffix in (".onnx", ".int8.onnx"):
            content = (bundle_dir / f"{name}{suffix}").read_bytes()
            proto = onnx.load_from_string(content)
            assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
            session = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == ["image"]
            outs = session.run(None, {"image": x})
            assert all(np.all(np.isfinite(o)) for o in outs)
    # Float ONNX matches Keras to 1e-4.
    ref = converters.run_keras(screening.screening_model(classifier, det, det.threshold), x)
    out = converters.run_onnx((bundle_dir / "screening.onnx").read_bytes(), x)
    assert np.max(np.abs(out["probabilities"] - ref["probabilities"])) <= 1e-4
    assert np.max(np.abs(out["anomaly_score"] - ref["anomaly_score"]) / np.maximum(1, np.abs(ref["anomaly_score"]))) <= 1e-4
    clear = np.abs(ref["anomaly_score"] - det.threshold) > 1e-4  # not a float tie at the threshold
    np.testing.assert_array_equal(out["flag"][clear], ref["flag"][clear])
    ref_c = converters.run_keras(screening.classifier_model(classifier), x)
    out_c = converters.run_onnx((bundle_dir / "classifier.onnx").read_bytes(), x)
    assert np.max(np.abs(out_c["logits"] - ref_c["logits"])) <= 1e-4


def test_fused_model_applies_the_verdict_rule(bundle_dir, phantom):
    from export import converters

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    out = converters.run_tflite((bundle_dir / "screening.tflite").read_bytes(), phantom["test"][0][:200])
    assert set(out) == {"probabilities", "anomaly_score", "flag"}
    np.testing.assert_array_equal(out["flag"] > 0.5, out["anomaly_score"] > manifest["threshold"])


# ----------------------------------------------------------------------------------------- bundle

def test_bundle_files_and_manifest(bundle_dir, run_dir, keras_models):
    from export.runtime import read_manifest, sha256_file, verify_files

    names = {p.name for p in bundle_dir.iterdir()}
    models = {f"{m}{s}" for m in ("screening", "classifier", "detector") for s in (".tflite", ".onnx", ".int8.onnx")}
    assert models <= names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    assert set(manifest["files"]) == models
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(bundle_dir / name)
        assert entry["bytes"] == (bundle_dir / name).stat().st_size
    assert manifest["classes"] == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert manifest["input"]["shape"] == [None, IMAGE_SIZE, IMAGE_SIZE, 1]
    assert manifest["input"]["range"] == [0.0, 1.0] and manifest["input"]["dtype"] == "float32"
    assert manifest["preprocessing"]["module"] == "medrobust.data.images"
    # int8 shifts the anomaly score: the edge threshold is set again on the exported model's own clean
    # validation scores; the Keras one is kept beside it, and every scoring file names its threshold.
    assert manifest["detector"]["keras_threshold"] == pytest.approx(float(keras_models[1].threshold))
    screening_entry = manifest["files"]["screening.tflite"]
    assert manifest["threshold"] == screening_entry["threshold"]
    calibration = screening_entry["threshold_calibration"]
    assert calibration["val_fpr"] <= calibration["target_fpr"] and calibration["images"] >= 20
    for name, entry in manifest["files"].items():
        assert ("threshold" in entry) == (entry["model"] in ("screening", "detector")), name
    assert manifest["quantization"]["mode"] == "int8"
    assert manifest["quantization"]["calibration"]["images"] > 0
    assert manifest["quantization"]["tflite"]["io_dtype"] == "float32"
    assert manifest["models"]["screening"]["file"] == "screening.tflite"
    assert "refer" in manifest["verdict_rule"] and "classify" in manifest["verdict_rule"]
    assert manifest["versions"]["tensorflow"] and manifest["versions"]["tf2onnx"]
    assert Path(manifest["source_run"]["path"]) == run_dir.resolve()
    io = manifest["files"]["screening.tflite"]["inputs"]["image"]
    assert io["dtype"] == "float32" and "quantization" in io


def test_interrupted_export_leaves_no_manifest_or_half_file(run_dir, detector, bundle_dir, tmp_path, monkeypatch):
    import shutil

    from export import converters
    from export.bundle import export_bundle

    out = tmp_path / "b"
    shutil.copytree(bundle_dir, out)
    real = converters.to_tflite
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(converters, "to_tflite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(run_dir, out, quantize="float16", onnx=False, detector=detector, log=lambda m: None)
    names = {p.name for p in out.iterdir()}
    assert "manifest.json" not in names  # the folder is no bundle any more: the runtime refuses it
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    assert "screening.onnx" not in names  # stale files of the old export are gone


# ----------------------------------------------------------------------------------------- parity

def _check_parity(report: dict) -> None:
    models = report["models"]
    for name in ("classifier.tflite", "screening.tflite"):
        row = models[name]
        assert row["precision"] == "int8"
        assert row["top1_agreement"] >= 0.98, (name, row)
        assert row["accuracy_delta"] >= -0.01, (name, row)
    for name in ("detector.tflite", "screening.tflite"):
        row = models[name]
        assert row["auroc_delta"] is not None and row["auroc_delta"] >= -0.02, (name, row)
    for name in ("classifier.onnx", "detector.onnx", "screening.onnx"):
        row = models[name]
        for key, diff in row["max_abs_diff"].items():
            if key != "anomaly_score":
                assert diff <= 1e-4, (name, key, diff)
        # The anomaly score is in z-units through logs and exps (values up to tens): 1e-4 relative.
        assert row.get("max_rel_diff_anomaly_score", 0.0) <= 1e-4, (name, row)
        assert row.get("top1_agreement", 1.0) == 1.0


def test_parity_on_phantom(parity, bundle_dir, phantom, report):
    _check_parity(parity)
    # With its recalibrated threshold the int8 screening model refers about as many clean scans as Keras.
    keras_rate = parity["keras"]["clean_flag_rate"]
    edge_rate = parity["models"]["screening.tflite"]["clean_flag_rate"]
    report(f"clean scans referred on the phantom test split: Keras {keras_rate:.3f}, int8 screening.tflite "
           f"{edge_rate:.3f}; flag agreement {parity['models']['screening.tflite']['flag_agreement']:.3f} [SYNTHETIC]")
    assert abs(edge_rate - keras_rate) <= 0.03
    on_disk = json.loads((bundle_dir / "parity.json").read_text())
    assert on_disk["n_images"] == len(phantom["test"][1]) and set(on_disk["models"]) == set(parity["models"])
    robust = parity["robust_accuracy"]
    assert robust["file"] == "classifier.tflite" and 0 <= robust["pgd_transfer"] <= 1
    assert robust["square"] is not None and 0 <= robust["square"] <= robust["square_clean_accuracy"] + 1e-9
    assert parity["synthetic_data"] is True


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no real scans at {REAL_DATA}")
def test_parity_on_real_scans(bundle_dir, detector):
    from medrobust.data.folders import load_image_tree

    from export.verify import verify_bundle

    real = load_image_tree(REAL_DATA, IMAGE_SIZE)
    assert len(real) >= 80
    report = verify_bundle(bundle_dir, data=(real.x, real.y), square_queries=0, detector=detector,
                           log=lambda m: None, write=False)
    assert report["n_images"] == len(real)
    _check_parity(report)


# -------------------------------------------------------------------------------------------- CLI

def test_cli_verify(bundle_dir, tmp_path):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(bundle_dir, bundle)
    (bundle / "parity.json").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "export", "verify", "--bundle", str(bundle), "--limit", "64",
                           "--square-queries", "20", "--square-limit", "8"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-1 agr%" in proc.stdout and "screening.tflite" in proc.stdout and "Square Attack" in proc.stdout
    report = json.loads((bundle / "parity.json").read_text())
    assert report["n_images"] == 64 and set(report["models"]) == set(json.loads(
        (bundle / "manifest.json").read_text())["files"])


def test_cli_refuses_run_without_detector(run_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare_run"
    bare.mkdir()
    for name in ("classifier.keras", "config.json"):
        shutil.copy(run_dir / name, bare / name)
    proc = subprocess.run([sys.executable, "-m", "export", "bundle", "--run", str(bare), "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error:") and "detector" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_cli_rejects_bad_options(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export", "bundle", "--run", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "b")], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "no such run folder" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "export", "bundle", "--run", str(run_dir),
                           "--out", str(tmp_path / "b"), "--quantize", "int4"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "--quantize" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "export", "verify", "--bundle", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "manifest.json" in proc.stderr
