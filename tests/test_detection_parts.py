"""The UAD parts that look for small perturbations: multi-layer Mahalanobis (intermediate-layer taps),
the dark-region noise residual, feature squeezing (bit depth with BPDA, median smoothing); the image
filters they are built from; part selection, legacy loading and TFLite conversion of the score graph.

Fast units run on toy arrays; the module fixtures (marked slow) train one width-16 small CNN on the
SYNTHETIC phantom (28x28) for 4 epochs and fit an all-parts detector on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

IMAGE_SIZE = 28


def _toy_scans(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """OCT-like toy B-scans: dark speckled vitreous above, a bright band (the retina) with structure, a dim
    region below; float32 [n, size, size, 1] in [0, 1]."""
    rng = np.random.default_rng(seed)
    rows = np.arange(size)[:, None]
    out = np.empty((n, size, size, 1), np.float32)
    for i in range(n):
        top = rng.integers(size // 4, size // 2)
        band = ((rows >= top) & (rows < top + size // 4)).astype(np.float32)
        profile = 0.08 + 0.6 * band + 0.15 * (rows >= top + size // 4)
        texture = 0.1 * np.sin(np.arange(size)[None, :] / rng.uniform(2, 5)) * band
        speckle = rng.normal(0, 0.004, (size, size))
        out[i, :, :, 0] = np.clip(profile + texture + speckle, 0, 1)
    return out


# --------------------------------------------------------------------------------------- image filters

def test_median_filters_match_scipy_and_their_definition():
    from scipy import ndimage

    from medrobust.detection import scores as S

    x = np.random.default_rng(0).random((3, 9, 11, 1)).astype(np.float32)
    ref3 = ndimage.median_filter(x, size=(1, 3, 3, 1), mode="nearest")
    np.testing.assert_allclose(np.asarray(S.median3x3(x)), ref3, atol=1e-7)
    # 2x2: mean of the two middle values of the window reaching one pixel up and left (edges replicated).
    padded = np.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)), mode="edge")
    windows = np.stack([padded[:, i:i + 9, j:j + 11] for i in (0, 1) for j in (0, 1)], -1)
    ref2 = np.sort(windows, -1)[..., 1:3].mean(-1)
    np.testing.assert_allclose(np.asarray(S.median2x2(x)), ref2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(S.box_filter(x, 5)),
                               ndimage.uniform_filter(x, size=(1, 5, 5, 1), mode="nearest"), atol=1e-6)


def test_bit_depth_rounds_forward_and_passes_gradients_straight_through():
    import tensorflow as tf

    from medrobust.detection import scores as S

    x = tf.constant(np.random.default_rng(1).random((2, 6, 6, 1)).astype(np.float32))
    levels = 2 ** 5 - 1
    np.testing.assert_allclose(S.bit_depth(x, 5).numpy(), np.round(x.numpy() * levels) / levels, atol=1e-7)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        bpda = tf.reduce_sum(S.bit_depth(x, 5) * 3.0)
        masked = tf.reduce_sum(S.bit_depth(x, 5, bpda=False) * 3.0)
    np.testing.assert_allclose(tape.gradient(bpda, x).numpy(), 3.0)  # BPDA: identity backward
    masked_grad = tape.gradient(masked, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    assert np.all(masked_grad.numpy() == 0)  # what an attacker would see without BPDA: nothing


def test_dark_residual_sees_noise_in_the_vitreous_not_on_the_retina():
    """L-inf noise of 2/255 over the whole image raises the residual energy of every toy scan; the same noise
    confined to the bright band (outside the per-image dark region) does not."""
    from medrobust.detection import scores as S

    x = _toy_scans(64)
    rng = np.random.default_rng(2)
    noise = (2 / 255) * rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32)
    dark = S.dark_mask(x)
    assert 0.1 < dark.mean() < 0.7
    clean = np.asarray(S.dark_residual_energy(x))
    everywhere = np.asarray(S.dark_residual_energy(np.clip(x + noise, 0, 1)))
    bright_only = np.asarray(S.dark_residual_energy(np.clip(x + noise * ~dark, 0, 1)))
    assert np.all(everywhere > clean)
    assert everywhere.min() > clean.max()  # perfectly separated on this toy
    assert np.median(bright_only / clean) < 1.5 < np.median(everywhere / clean)


# ----------------------------------------------------------------------------------------------- taps

def test_stage_ends_pick_early_and_middle_layers_of_each_architecture():
    from medrobust.detection.taps import default_taps, stage_ends, tap_model
    from medrobust.models import build_classifier

    for arch, size in (("small_cnn", 28), ("small_cnn", 64), ("resnet18", 64)):
        model = build_classifier(arch, size, width=8)
        ends = stage_ends(model)
        assert len(ends) >= 3, (arch, ends)
        taps = default_taps(model)
        assert taps["early"] == ends[0] and taps["middle"] in ends[1:-1]
        shapes = [tuple(model.get_layer(taps[k]).output.shape) for k in ("early", "middle")]
        assert shapes[0][1] > shapes[1][1]  # the early tap has the finer resolution
        x = np.random.default_rng(0).random((2, size, size, 1)).astype(np.float32)
        outs = tap_model(model, taps)(x, training=False)
        np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(model(x, training=False)), atol=1e-5)


def test_taps_reach_into_a_nested_backbone_and_share_its_weights():
    """A classifier whose convolutions sit in a nested functional model (as a keras.applications backbone)."""
    import keras
    from keras import layers

    from medrobust.detection.taps import default_taps, tap_model

    inner_in = keras.Input((32, 32, 3))
    h = inner_in
    for filters in (4, 8, 16):
        h = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(h)
    backbone = keras.Model(inner_in, layers.GlobalAveragePooling2D()(h), name="backbone")
    image = keras.Input((32, 32, 1), name="image")
    rgb = layers.Concatenate()([image, image, image])
    features = layers.Dense(8, activation="relu", name="features")(backbone(rgb))
    model = keras.Model(image, layers.Dense(4, name="logits")(features))
    taps = default_taps(model)
    tapped = tap_model(model, taps)
    x = np.random.default_rng(0).random((3, 32, 32, 1)).astype(np.float32)
    logits, feats, early, middle = tapped(x, training=False)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(x)), atol=1e-5)
    assert tuple(early.shape) == (3, 16, 16, 4) and tuple(middle.shape)[1] < 16
    # Shared weights: changing the classifier changes the tap model.
    backbone.layers[1].kernel.assign(backbone.layers[1].kernel * 2.0)
    np.testing.assert_allclose(np.asarray(tapped(x)[0]), np.asarray(model(x)), atol=1e-5)
    with pytest.raises(ValueError, match="no layer named"):
        tap_model(model, {"early": "nope"})


# ------------------------------------------------------------------------------------ trained detector

@pytest.fixture(scope="module")
def phantom():
    from medrobust.data.phantom import phantom_splits

    return phantom_splits(IMAGE_SIZE, n_train=2000, n_val=1000, n_test=1000, seed=3)


@pytest.fixture(scope="module")
def classifier(phantom):
    from builders import standard_trained_cnn

    return standard_trained_cnn(*phantom["train"], IMAGE_SIZE, epochs=4)


@pytest.fixture(scope="module")
def detector(classifier, phantom):
    from medrobust.detection import ALL_PARTS, Detector

    return Detector.fit(classifier, phantom["train"][0], phantom["val"][0], epochs=2, seed=0, parts=ALL_PARTS)


@pytest.fixture(scope="module")
def clean_test_scores(detector, phantom):
    return detector.score(phantom["test"][0])


def _auroc(clean, attacked):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(attacked))], np.r_[clean, attacked])


@pytest.mark.slow
def test_every_part_keeps_clean_false_alarms_near_the_target(detector, clean_test_scores, report):
    flags = detector.part_flags(clean_test_scores)
    rates = {name: float(f.mean()) for name, f in flags.items()}
    combined = float((clean_test_scores["combined"] > detector.threshold).mean())
    report("clean FPR on 1000 held-out phantom images [SYNTHETIC]: combined "
           f"{combined:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    # 1000 held-out images, threshold from 1000 others: the binomial spread is about +-0.014.
    assert abs(combined - 0.05) <= 0.03
    for name, rate in rates.items():
        assert rate <= 0.09, name


@pytest.mark.slow
def test_each_new_part_flags_its_intended_perturbation(detector, phantom, clean_test_scores, report):
    """mahalanobis_early: strong pixel noise (texture the early filters see); residual: 2/255 noise over the
    whole image; squeeze_bits: sub-quantum PGD steps that only just cross a decision boundary."""
    from medrobust.attacks import PGD, attack_batches, predict_labels

    x, y = phantom["test"]
    rng = np.random.default_rng(5)
    noisy = np.clip(x[:300] + rng.uniform(-0.1, 0.1, x[:300].shape), 0, 1).astype(np.float32)
    fine = np.clip(x[:300] + (2 / 255) * rng.choice([-1, 1], x[:300].shape), 0, 1).astype(np.float32)
    s_noisy, s_fine = detector.score(noisy), detector.score(fine)
    auc_early = _auroc(clean_test_scores["mahalanobis_early"], s_noisy["mahalanobis_early"])
    auc_residual = _auroc(clean_test_scores["residual"], s_fine["residual"])
    clf = detector.classifier
    adv = attack_batches(PGD(clf, steps=20, step_size=0.1), x[:400], y[:400], 0.004, progress=False)
    fooled = (predict_labels(clf, x[:400]) == y[:400]) & (predict_labels(clf, adv) != y[:400])
    assert fooled.sum() >= 20
    auc_squeeze = _auroc(clean_test_scores["squeeze_bits"], detector.score(adv[fooled])["squeeze_bits"])
    report(f"AUROC [SYNTHETIC]: mahalanobis_early vs U(-0.1, 0.1) noise {auc_early:.3f}; residual vs +-2/255 "
           f"noise {auc_residual:.3f}; squeeze_bits vs PGD eps 0.004 ({fooled.sum()} adversaries) {auc_squeeze:.3f}")
    assert auc_early >= 0.95
    assert auc_residual >= 0.9
    assert auc_squeeze >= 0.7


@pytest.mark.slow
def test_every_part_has_a_nonzero_gradient(detector, phantom):
    """score_tensor is what the adaptive attacker differentiates: no part may mask its gradient (bit-depth
    squeezing goes through BPDA)."""
    import tensorflow as tf

    x = tf.constant(phantom["test"][0][:6])
    for name in detector.score_names:
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(detector.score_tensor(x)[name])
        grad = tape.gradient(total, x).numpy()
        assert np.all(np.isfinite(grad)), name
        assert (np.abs(grad).reshape(len(grad), -1).max(axis=1) > 0).all(), name
    out = detector.score_tensor(x, with_logits=True)  # the adaptive attack reads the logits of the same pass
    assert set(out) == set(detector.score_names) | {"logits"}
    np.testing.assert_allclose(out["logits"].numpy(), detector.classifier(x, training=False).numpy(), atol=1e-4)


@pytest.mark.slow
def test_save_load_round_trip_with_every_part_and_without_the_autoencoder(detector, classifier, phantom, tmp_path):
    from medrobust.detection import Detector

    x = phantom["test"][0][:200]
    path = detector.save(tmp_path / "all")
    config = json.loads((path / "detector.json").read_text())
    assert config["format"] == "medrobust-uad/2" and config["parts"] == list(detector.parts)
    with np.load(path / "stats.npz", allow_pickle=False) as npz:
        assert {"means", "early_means", "middle_whitening"} <= set(npz.files)
    loaded = Detector.load(path, classifier)
    before, after = detector.score(x), loaded.score(x)
    for name in detector.score_names:  # a fresh trace may fuse float ops in another order: 1 ulp-level changes
        np.testing.assert_allclose(before[name], after[name], rtol=1e-5, atol=1e-6, err_msg=name)

    lean = detector.with_parts(["mahalanobis_early", "residual", "squeeze_bits", "boundary"], phantom["val"][0])
    assert lean.autoencoder is None and lean.score_names == ("combined", "mahalanobis_early", "residual",
                                                             "squeeze_bits", "boundary")
    path = lean.save(tmp_path / "lean")
    assert not (path / "autoencoder.keras").exists()
    again = Detector.load(path, classifier)
    np.testing.assert_allclose(again.score(x)["combined"], lean.score(x)["combined"], rtol=1e-5, atol=1e-6)
    for name in ("residual", "squeeze_bits", "boundary"):  # the restricted detector computes parts identically
        np.testing.assert_allclose(lean.score(x)[name], before[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="subset"):
        lean.with_parts(["feature"], phantom["val"][0])


@pytest.mark.slow
def test_taps_follow_the_layer_position_when_layer_names_differ(detector, classifier, phantom, tmp_path):
    """Keras numbers unnamed layers per session (re_lu_7 here, re_lu_31 there): the same network rebuilt
    with other names is tapped at the same stage ends; a network of another width is refused."""
    from medrobust.detection import Detector
    from medrobust.models import build_classifier

    path = detector.save(tmp_path / "d")
    twin = build_classifier("small_cnn", IMAGE_SIZE, width=16)
    twin.set_weights(classifier.get_weights())
    assert {layer.name for layer in twin.layers} != {layer.name for layer in classifier.layers}
    x = phantom["test"][0][:100]
    np.testing.assert_allclose(Detector.load(path, twin).score(x)["combined"], detector.score(x)["combined"],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="wrong classifier"):
        Detector.load(path, build_classifier("small_cnn", IMAGE_SIZE, width=8))


@pytest.mark.slow
def test_a_format_1_detector_still_loads_with_its_four_parts(detector, classifier, phantom, tmp_path):
    from medrobust.detection import Detector

    legacy = detector.with_parts(["reconstruction", "feature", "mahalanobis", "boundary"], phantom["val"][0])
    path = legacy.save(tmp_path / "v1")
    config = json.loads((path / "detector.json").read_text())
    for key in ("parts", "taps", "tap_dims", "tap_stages", "squeeze_bits", "residual"):
        config.pop(key, None)
    config["format"] = "medrobust-uad/1"
    (path / "detector.json").write_text(json.dumps(config))
    loaded = Detector.load(path, classifier)
    assert loaded.parts == ("reconstruction", "feature", "mahalanobis", "boundary")
    x = phantom["test"][0][:100]
    np.testing.assert_allclose(loaded.score(x)["combined"], legacy.score(x)["combined"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_rules_and_parts_are_validated_before_any_work(classifier, phantom):
    from medrobust.detection import Detector

    x = phantom["val"][0][:20]
    with pytest.raises(ValueError, match="part"):
        Detector.fit(classifier, x, x, parts=["boundary", "nonsense"])
    with pytest.raises(ValueError, match="squeeze_bits"):
        Detector.fit(classifier, x, x, parts=["squeeze_bits"], squeeze_bits=9)
    with pytest.raises(ValueError, match="combination"):
        Detector.fit(classifier, x, x, parts=["boundary"], combination="mean")


@pytest.mark.slow
def test_combination_rules_give_a_calibrated_threshold(detector, phantom, clean_test_scores):
    from medrobust.detection import COMBINATIONS

    x_val, x_test = phantom["val"][0], phantom["test"][0]
    for rule in COMBINATIONS:
        det = detector.with_parts(detector.parts, x_val, combination=rule)
        assert det.config["val_fpr"] <= 0.05
        fpr = float(det.predict(x_test).mean())
        assert abs(fpr - 0.05) <= 0.03, (rule, fpr)


@pytest.mark.slow
def test_score_model_converts_to_tflite_and_matches(detector, phantom):
    """The exported score graph (float32 TFLite) gives the Keras numbers; int8 (mixed scope) converts and its
    combined score keeps ranking images like the Keras one."""
    from scipy.stats import spearmanr

    from export import converters, screening

    x = phantom["test"][0][:64]
    ref = detector.score(x)
    graph = screening.detector_model(detector, IMAGE_SIZE)
    flat = converters.to_tflite(graph, "none")
    got = converters.run_tflite(flat, x)["anomaly_score"]
    np.testing.assert_allclose(got, ref["combined"], rtol=1e-3, atol=1e-3)
    ops_used = converters.tflite_op_summary(flat)
    assert not any("Flex" in op for ops in ops_used.values() for op in ops)
    int8 = converters.to_tflite(graph, "int8", calibration=phantom["train"][0][:100])
    got8 = converters.run_tflite(int8, x)["anomaly_score"]
    assert np.all(np.isfinite(got8))
    assert spearmanr(got8, ref["combined"]).statistic > 0.8


@pytest.mark.slow
def test_part_scores_combine_to_the_combined_score_by_every_rule(detector, phantom):
    """The standardised part scores (Detector.part_scores, and the graph's part_scores output) give the combined
    score back by Detector.combine, for every combination rule; they name the detector's parts in order."""
    import tensorflow as tf

    from medrobust.detection import COMBINATIONS

    x_val, x = phantom["val"][0], phantom["test"][0][:64]
    for rule in COMBINATIONS:
        det = detector.with_parts(detector.parts, x_val, combination=rule)
        scores = det.score(x)
        z = det.part_scores(scores)
        assert z.shape == (len(x), len(det.parts))
        np.testing.assert_allclose(det.combine(z), scores["combined"], rtol=1e-4, atol=1e-4)
        graph = det.score_tensor(tf.constant(x), with_part_scores=True)
        np.testing.assert_allclose(graph["part_scores"].numpy(), z, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(graph["combined"].numpy(), det.score_tensor(tf.constant(x))["combined"].numpy())
        shifted = z.copy()
        shifted[:, -1] += 5.0  # a part score that is off changes the combination (the check can fail)
        assert np.max(np.abs(det.combine(shifted) - scores["combined"])) > 0.5
    assert [p["name"] for p in detector.describe_parts()] == list(detector.parts)
    with pytest.raises(ValueError, match="part scores must be"):
        detector.combine(np.zeros((3, len(detector.parts) + 1)))


@pytest.mark.slow
def test_the_part_scores_output_leaves_the_int8_screening_scores_bit_for_bit(detector, classifier, phantom):
    """Adding the part_scores output to the fused screening model changes none of its other outputs in int8
    (mixed scope, compacted), with every part; its part scores combine to its own anomaly score."""
    from export import converters, screening

    x, calib = phantom["test"][0][:64], phantom["train"][0][:100]
    without = converters.run_tflite(converters.to_tflite(
        screening.screening_model(classifier, detector, part_scores=False), "int8", calib), x)
    model = screening.screening_model(classifier, detector)
    assert "part_scores" in model.export_outputs
    got = converters.run_tflite(converters.to_tflite(model, "int8", calib), x)
    assert sorted(got) == sorted([*without, "part_scores"])
    for name, value in without.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    score = got["anomaly_score"]
    assert np.all(np.abs(detector.combine(got["part_scores"]) - score) <= 1e-4 * np.maximum(1.0, np.abs(score)))
