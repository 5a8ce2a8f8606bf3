"""The classifiers (medrobust.models): the contract every architecture keeps, initial weights, edge export."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from medrobust.models import (ARCHITECTURES, FEATURE_LAYER, ProbabilityAverage, build_classifier, feature_model,
                              load_classifier)

SIZE = 64


def _images(n=4, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, SIZE, SIZE, 1)).astype(np.float32)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_is_a_differentiable_logits_model_with_features(arch, tmp_path):
    keras.utils.set_random_seed(0)
    model = build_classifier(arch, SIZE, width=16)
    x = tf.constant(_images())
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x, training=False)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant([0, 1, 2, 3]), logits))
    grad = tape.gradient(loss, x).numpy()
    assert logits.shape == (4, 4) and np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    logits_again, features = feature_model(model)(x)
    np.testing.assert_allclose(logits_again, logits, atol=1e-5)
    assert features.shape[0] == 4 and len(features.shape) == 2  # the penultimate layer, flat
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(load_classifier(tmp_path / "m.keras")(x, training=False), logits, atol=1e-5)


def test_strided_cnn_costs_a_quarter_of_small_cnn():
    small, strided = build_classifier("small_cnn", SIZE), build_classifier("strided_cnn", SIZE)
    assert small.count_params() == strided.count_params()
    assert strided.get_layer(index=1).strides == (2, 2) and small.get_layer(index=1).strides == (1, 1)


def test_mobilenet_backbone_is_minimalistic_with_fast_batchnorm():
    model = build_classifier("mobilenet_v3_small", SIZE)
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    kinds = {type(layer).__name__ for layer in backbone.layers}
    assert "DepthwiseConv2D" in kinds and "Multiply" not in kinds  # no squeeze-and-excite, no hard-swish
    assert {layer.momentum for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}
    with pytest.raises(ValueError, match="image_size >= 32"):
        build_classifier("mobilenet_v3_small", 28)


def test_initial_weights_from_a_classifier_file(tmp_path):
    keras.utils.set_random_seed(1)
    source = build_classifier("strided_cnn", SIZE, width=8)
    source.save(tmp_path / "classifier.keras")
    source.save_weights(tmp_path / "init.weights.h5")
    x = _images()
    for path in (tmp_path / "classifier.keras", tmp_path / "init.weights.h5"):
        model = build_classifier("strided_cnn", SIZE, width=8, weights=str(path))
        np.testing.assert_allclose(model(x), source(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"classifier\.keras: does not fit .* has shape"):
        build_classifier("strided_cnn", SIZE, width=16, weights=str(tmp_path / "classifier.keras"))
    with pytest.raises(ValueError, match="no such weights file"):
        build_classifier("strided_cnn", SIZE, weights=str(tmp_path / "missing.keras"))
    with pytest.raises(ValueError, match="fits only mobilenet_v3_small"):
        build_classifier("strided_cnn", SIZE, weights=str(tmp_path / "backbone.h5"))


def test_mobilenet_loads_a_keras_applications_backbone_file(tmp_path):
    """keras.applications ships ImageNet weights as legacy .h5 files of the no-top backbone."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(2)
    backbone = keras.applications.MobileNetV3Small(input_shape=(SIZE, SIZE, 3), minimalistic=True, include_top=False,
                                                   weights=None, include_preprocessing=False, pooling="avg")
    with h5py.File(tmp_path / "mobilenet_v3_small_no_top.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    model = build_classifier("mobilenet_v3_small", SIZE, weights=str(tmp_path / "mobilenet_v3_small_no_top.h5"))
    loaded = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    for a, b in zip(loaded.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["strided_cnn", "mobilenet_v3_small"])
def test_edge_architectures_convert_to_full_int8_tflite_and_onnx(arch):
    """The edge candidates use only int8-friendly ops: a fully int8 TFLite model (no float fallback)
    agrees with Keras on most random images, and tf2onnx converts them."""
    from export.converters import run_onnx, run_tflite, to_onnx, to_tflite, tflite_op_summary

    keras.utils.set_random_seed(3)
    model = build_classifier(arch, SIZE)
    x = _images(32, seed=4)
    reference = np.asarray(model(x, training=False))
    int8 = to_tflite(model, "int8", calibration=x, int8_scope="full")
    ops = tflite_op_summary(int8)
    assert "int8" in ops and "float32" not in ops, ops
    lite = run_tflite(int8, x)["output"]
    onnx = run_onnx(to_onnx(model), x)["output"]
    np.testing.assert_allclose(onnx, reference, atol=1e-4)
    assert np.corrcoef(lite.ravel(), reference.ravel())[0, 1] > 0.9


def test_probability_average_predicts_the_members_mean_probability_and_refuses_mismatched_members():
    keras.utils.set_random_seed(0)
    members = [build_classifier("strided_cnn", 32) for _ in range(3)]
    x = np.random.default_rng(0).random((6, 32, 32, 1), dtype=np.float32)
    mean = np.mean([keras.ops.convert_to_numpy(keras.ops.softmax(m(x), axis=-1)) for m in members], axis=0)
    ensemble = ProbabilityAverage(members)
    got = keras.ops.convert_to_numpy(keras.ops.softmax(ensemble(x), axis=-1))
    np.testing.assert_allclose(got, mean, atol=1e-6)
    assert not np.allclose(mean, keras.ops.convert_to_numpy(keras.ops.softmax(members[0](x), axis=-1)), atol=1e-3)
    with tf.GradientTape() as tape:  # attacks and SSAT's teacher need it differentiable in the input
        xt = tf.constant(x)
        tape.watch(xt)
        loss = tf.reduce_sum(ensemble(xt))
    assert float(tf.reduce_sum(tf.abs(tape.gradient(loss, xt)))) > 0
    with pytest.raises(ValueError, match="at least one member"):
        ProbabilityAverage([])
    with pytest.raises(ValueError, match="different inputs"):
        ProbabilityAverage([members[0], build_classifier("strided_cnn", 64)])
