"""UAD detector: score maths, clean false-alarm rate, PGD detection, off-distribution images,
save/load, the Keras score graph, the train CLI, and (realdata) a detector fitted on real scans.

One standard-trained small CNN and one detector are trained for the whole module on the SYNTHETIC
phantom (28x28): train 2500, val 2000, test 2000 images. The CLI test reuses the session's
`phantom_system_run` (conftest.py), a `python -m medrobust.train ... --detector true` run.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

IMAGE_SIZE = 28
TARGET_FPR = 0.05


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def phantom():
    from medrobust.data.phantom import phantom_splits

    return phantom_splits(IMAGE_SIZE, n_train=2500, n_val=2000, n_test=2000, seed=0)


@pytest.fixture(scope="module")
def classifier(phantom):
    """Standard training (cross-entropy) of a width-16 small CNN, 5 epochs with a cosine learning-rate decay."""
    from builders import standard_trained_cnn

    return standard_trained_cnn(*phantom["train"], IMAGE_SIZE, epochs=5)


@pytest.fixture(scope="module")
def detector(classifier, phantom):
    from medrobust.detection import Detector

    return Detector.fit(classifier, phantom["train"][0], phantom["val"][0], epochs=4, seed=0, target_fpr=TARGET_FPR)


@pytest.fixture(scope="module")
def test_scores(detector, phantom):
    return detector.score(phantom["test"][0])


# ------------------------------------------------------------------------------------- fast units

def test_autoencoder_is_small_and_keeps_the_image_shape():
    from medrobust.detection import build_autoencoder

    for size in (28, 30, 64):
        ae = build_autoencoder(size)
        x = np.random.default_rng(0).random((2, size, size, 1), dtype=np.float32)
        out = np.asarray(ae(x))
        assert out.shape == x.shape
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert 5_000 < build_autoencoder(28).count_params() < 60_000


def test_conformal_threshold_keeps_false_alarms_at_or_under_the_target():
    from medrobust.detection.scores import threshold_at_fpr

    scores = np.arange(1.0, 100.0)  # n = 99: the ceil(100 * 0.9) = 90th smallest
    assert threshold_at_fpr(scores, 0.1) == 90.0
    assert threshold_at_fpr(np.arange(19.0), 0.05) == 18.0  # too few for the guarantee: the largest
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([1.0, np.nan]), 0.05)
    # Over many calibration sets of 40 clean scores, fresh clean scans are flagged at most 5% of the
    # time; the plain empirical quantile flags more (about 5% + 1/n).
    rng = np.random.default_rng(0)
    calibration, fresh = rng.normal(size=(4000, 40)), rng.normal(size=(4000, 200))
    conformal = np.array([threshold_at_fpr(c, 0.05) for c in calibration])
    plain = np.quantile(calibration, 0.95, axis=1)
    assert (fresh > conformal[:, None]).mean() <= 0.05
    assert (fresh > plain[:, None]).mean() > 0.05


def test_score_functions_match_their_definitions():
    from medrobust.detection import scores as S

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    js = np.asarray(S.js_divergence(a, b))
    np.testing.assert_allclose(js, np.asarray(S.js_divergence(b, a)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(S.js_divergence(a, a)), 0.0, atol=1e-6)
    assert np.all(js > 0) and np.all(js <= math.log(2) + 1e-6)
    p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(1, keepdims=True)
    m = (p + q) / 2
    ref = 0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)
    np.testing.assert_allclose(js, ref, rtol=1e-4, atol=1e-6)

    # Mahalanobis: min over classes of sqrt((f - mu)^T P (f - mu)) with the fitted precision.
    feats = rng.normal(size=(300, 6)) * np.array([1, 2, 3, 0.5, 1, 0.0])  # a dead unit: still invertible
    labels = rng.integers(0, 3, 300)
    g = S.fit_class_gaussians(feats, labels, num_classes=3)
    np.testing.assert_allclose(g["whitening"] @ g["whitening"].T, g["precision"], rtol=1e-3, atol=1e-3)
    f = rng.normal(size=(7, 6)).astype(np.float32)
    diff = f[:, None, :] - g["means"][None]
    ref = np.sqrt(np.einsum("nkd,de,nke->nk", diff, g["precision"].astype(np.float64), diff).min(1))
    got = np.asarray(S.mahalanobis_distance(f, g["means"], g["whitening"]))
    np.testing.assert_allclose(got, ref, rtol=1e-3)

    logits = np.array([[3.0, 1.0, 0.0, -1.0], [2.0, 1.999, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(np.asarray(S.boundary_closeness(logits)), -np.log([2.0 + 0.01, 0.001 + 0.01]),
                               rtol=1e-3)


# ------------------------------------------------------------------------------- trained detector

@pytest.mark.slow
def test_clean_false_alarm_rate_matches_the_target(detector, test_scores, phantom, report):
    flags = test_scores["combined"] > detector.threshold
    fpr = float(flags.mean())
    report(f"clean FPR {fpr:.4f} on {len(flags)} held-out phantom test images "
           f"(target {TARGET_FPR}, val {detector.config['val_fpr']:.4f}) [SYNTHETIC]")
    assert abs(fpr - TARGET_FPR) <= 0.02
    np.testing.assert_array_equal(detector.predict(phantom["test"][0][:200]), flags[:200])


@pytest.mark.slow
def test_detects_small_pgd_adversaries(classifier, detector, phantom, test_scores, report):
    """AUROC of the combined score, clean test images vs successful PGD-Linf adversaries at eps 0.004
    (20 steps) of images the classifier got right."""
    from sklearn.metrics import roc_auc_score

    from medrobust.attacks import PGD, attack_batches, predict_labels

    x, y = phantom["test"][0][:600], phantom["test"][1][:600]
    x_adv = attack_batches(PGD(classifier, steps=20), x, y, 0.004, progress=False)
    correct = predict_labels(classifier, x) == y
    fooled = correct & (predict_labels(classifier, x_adv) != y)
    assert fooled.sum() >= 30, f"only {fooled.sum()} successful adversaries: the attack or classifier is off"
    adv_scores = detector.score(x_adv[fooled])
    labels = np.r_[np.zeros(len(test_scores["combined"])), np.ones(fooled.sum())]
    auroc = {k: roc_auc_score(labels, np.r_[test_scores[k], adv_scores[k]]) for k in test_scores}
    report("PGD eps=0.004 AUROC [SYNTHETIC]: " + ", ".join(f"{k} {v:.3f}" for k, v in auroc.items())
           + f" ({fooled.sum()} adversaries, clean accuracy {correct.mean():.3f})")
    assert auroc["combined"] >= 0.90


def _off_distribution_images(phantom, n: int = 100) -> dict[str, np.ndarray]:
    from scipy import ndimage

    rng = np.random.default_rng(1)
    s = IMAGE_SIZE
    blobs = ndimage.gaussian_filter(rng.random((n, s, s, 1)), (0, 3, 3, 0))
    lo, hi = blobs.min(axis=(1, 2, 3), keepdims=True), blobs.max(axis=(1, 2, 3), keepdims=True)
    yy, xx = np.mgrid[:s, :s]
    checker = np.stack([(((yy // k) + (xx // k)) % 2)[..., None] for k in rng.integers(2, 8, n)])
    return {
        "uniform noise": rng.random((n, s, s, 1)),
        "inverted OCT": 1.0 - phantom["test"][0][:n],
        "smooth blobs": (blobs - lo) / (hi - lo),
        "checkerboard": checker,
    }


@pytest.mark.slow
def test_flags_images_that_are_not_oct_scans(detector, phantom, report):
    rates = {}
    for name, x in _off_distribution_images(phantom).items():
        rates[name] = float(detector.predict(x.astype(np.float32)).mean())
    report("flag rate on non-OCT images: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))
    for name, rate in rates.items():
        assert rate >= 0.95, name


@pytest.mark.slow
def test_save_load_round_trip_gives_identical_scores(detector, classifier, phantom, tmp_path):
    from medrobust.detection import Detector

    x = phantom["test"][0][:300]
    path = detector.save(tmp_path / "detector")
    own = {"detector.json", "stats.npz"} | ({"autoencoder.keras"} if detector.autoencoder is not None else set())
    assert {p.name for p in path.iterdir()} == own
    config = json.loads((path / "detector.json").read_text())
    assert config["threshold"] == detector.threshold and config["target_fpr"] == TARGET_FPR
    assert config["combination"] == "max" and "versions" in config and "standardise" in config
    with np.load(path / "stats.npz", allow_pickle=False) as npz:
        assert {"means", "precision"} <= set(npz.files)
    loaded = Detector.load(path, classifier)
    before, after = detector.score(x), loaded.score(x)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert loaded.threshold == detector.threshold


@pytest.mark.slow
def test_load_rejects_a_broken_folder_or_the_wrong_classifier(detector, tmp_path):
    from medrobust.detection import Detector
    from medrobust.models import build_classifier

    with pytest.raises(ValueError, match="not a saved detector"):
        Detector.load(tmp_path, detector.classifier)
    path = detector.save(tmp_path / "d")
    with pytest.raises(ValueError, match="classes|features|shape"):
        Detector.load(path, build_classifier("small_cnn", IMAGE_SIZE, width=8))


@pytest.mark.slow
def test_score_model_and_score_tensor_agree_with_score(detector, phantom):
    import tensorflow as tf

    x = phantom["test"][0][:128]
    ref = detector.score(x)
    model = detector.score_model()
    outputs = model(x, training=False)
    assert list(model.output_names) == list(detector.score_names)
    tensors = detector.score_tensor(tf.constant(x))
    assert set(tensors) == set(detector.score_names)
    for name, out in zip(detector.score_names, outputs):
        scale = max(1.0, float(np.abs(ref[name]).max()))
        np.testing.assert_allclose(np.asarray(out), ref[name], atol=1e-5 * scale, err_msg=name)
        np.testing.assert_allclose(tensors[name].numpy(), ref[name], atol=1e-5 * scale, err_msg=name)
    # Differentiable: an adaptive attacker gets a finite, non-zero gradient of the combined score.
    xt = tf.constant(x[:8])
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(detector.score_tensor(xt)["combined"])
    grad = tape.gradient(total, xt).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


@pytest.mark.slow
def test_train_cli_writes_the_detector_and_its_metrics(phantom_system_run):
    from medrobust.detection import Detector
    from medrobust.models import load_classifier

    out = phantom_system_run
    from medrobust.detection import DEFAULT_PARTS

    # The default parts (no autoencoder part): no autoencoder is trained or written.
    assert {p.name for p in (out / "detector").iterdir()} == {"detector.json", "stats.npz"}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("detector_threshold", "detector_clean_fpr", "detector_target_fpr"):
        assert key in metrics, key
    assert metrics["detector_target_fpr"] == 0.05 and 0.0 <= metrics["detector_clean_fpr"] <= 1.0
    assert all(0.0 <= metrics[f"detector_clean_fpr_{p}"] <= 1.0
               for p in DEFAULT_PARTS)
    detector = Detector.load(out / "detector", load_classifier(out / "classifier.keras"))
    assert detector.threshold == metrics["detector_threshold"]


# ----------------------------------------------------------------------------------------- real scans

@pytest.mark.realdata
def test_detector_fitted_on_real_scans_reports_its_false_alarm_rate(real_scans, report):
    """A detector fitted on app_samples/ + unsplit/ (threshold from a held-out quarter of them),
    false alarms counted on val/. Only checks that cannot fail by chance; the rate is reported."""
    import keras

    from medrobust.data.folders import load_image_tree
    from medrobust.detection import Detector
    from medrobust.models import build_classifier

    scans = load_image_tree(real_scans, IMAGE_SIZE)
    groups = np.array(scans.groups)
    fit_x, val_x = scans.x[groups != "val"], scans.x[groups == "val"]
    assert len(fit_x) > 8 and len(val_x) > 0
    order = np.random.default_rng(0).permutation(len(fit_x))
    held = order[: max(2, len(fit_x) // 4)]
    keras.utils.set_random_seed(0)
    classifier = build_classifier("small_cnn", IMAGE_SIZE, width=8)  # untrained: a fixed random feature map
    det = Detector.fit(classifier, fit_x[np.setdiff1d(order, held)], fit_x[held], epochs=2, seed=0)
    flags = det.predict(val_x)
    assert flags.shape == (len(val_x),) and flags.dtype == bool
    fpr = float(flags.mean())
    assert 0.0 <= fpr <= 1.0 and math.isfinite(det.threshold)
    report(f"real scans: detector fitted on {len(fit_x) - len(held)} + calibrated on {len(held)} "
           f"(app_samples+unsplit), false alarms on val/ {int(flags.sum())}/{len(val_x)} = {fpr:.3f} "
           "(untrained width-8 CNN features, 2 AE epochs)")
