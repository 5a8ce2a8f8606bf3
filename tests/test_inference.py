"""Tests for medrobust.attacks.inference: the frozen, constant-folded graph the attacks differentiate."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from medrobust.attacks import APGD, FMN, PGD, SquareAttack, cross_entropy
from medrobust.attacks import inference
from medrobust.attacks.inference import inference_function
from medrobust.models import build_classifier

SIZE = 16


def model_with_batch_norm_statistics(seed: int = 0) -> keras.Model:
    """The small CNN with batch-norm statistics and scales away from their initial values (which fold
    to the identity), as after training."""
    keras.utils.set_random_seed(seed)
    model = build_classifier("small_cnn", SIZE, width=8)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return model


def images(n: int = 32, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, SIZE, SIZE, 1)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


def input_gradient(call, x, y):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = cross_entropy(call(x), y)
    return tape.gradient(loss, x).numpy()


def test_the_folded_graph_computes_the_model_and_its_gradient():
    model = model_with_batch_norm_statistics()
    x, y = images()
    call, _ = inference_function(model)
    assert call.kind == "constant-folded"
    ops = {op.type for op in call.function.graph.get_operations()}
    assert "Mul" not in ops and "Rsqrt" not in ops, f"the batch norms were not folded: {sorted(ops)}"
    np.testing.assert_allclose(call(tf.constant(x)).numpy(), model(x, training=False).numpy(), atol=1e-5)
    ours, reference = input_gradient(call, x, y), input_gradient(lambda v: model(v, training=False), x, y)
    relative = (np.linalg.norm((ours - reference).reshape(len(x), -1), axis=1)
                / np.linalg.norm(reference.reshape(len(x), -1), axis=1))
    # float rounding can flip a ReLU or a max-pool choice in the odd image, nothing more
    assert np.mean(relative < 1e-3) >= 0.9, relative


def test_the_same_weights_give_the_same_function_and_changed_weights_a_new_one():
    model = model_with_batch_norm_statistics()
    first, version = inference_function(model)
    assert inference_function(model) == (first, version)
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([kernel, bias + 1.0])
    second, newer = inference_function(model)
    assert newer != version and second is not first
    x, _ = images(4)
    np.testing.assert_allclose(second(tf.constant(x)).numpy(), model(x, training=False).numpy(), atol=1e-5)


def always_class_3(model) -> None:
    """Make `model` predict class 3 for every image (logits layer: no kernel, bias favouring class 3)."""
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([np.zeros_like(kernel), np.array([0.0, 0.0, 0.0, 5.0], np.float32)])


@pytest.mark.parametrize("name", ["pgd", "apgd", "fmn", "square"])
def test_an_attack_sees_weights_changed_after_its_first_run(name):
    """A reused attack object must attack the model as it is now, not a snapshot of its first run: after
    the model was changed to predict class 3 everywhere, every image of class 0 is already misclassified."""
    model = model_with_batch_norm_statistics()
    x, _ = images(16)
    y = np.zeros(len(x), np.int32)
    attack = {"pgd": lambda: PGD(model, steps=2), "apgd": lambda: APGD(model, steps=2),
              "fmn": lambda: FMN(model, steps=2), "square": lambda: SquareAttack(model, n_queries=2)}[name]()

    def fooled():
        if name == "fmn":
            return attack.find(x, y)[1] == 0  # distance 0: misclassified as it is
        return attack.run(x, y, 0.01)[-1]

    fooled()
    always_class_3(model)
    assert fooled().all()


def test_a_model_that_cannot_be_frozen_is_attacked_through_its_variables(monkeypatch):
    def refuse(_):
        raise RuntimeError("no converter here")

    monkeypatch.setattr(inference, "convert_variables_to_constants_v2", refuse)
    model = model_with_batch_norm_statistics()
    x, _ = images(8)
    y = np.argmax(model(x, training=False).numpy(), axis=1)
    with pytest.warns(UserWarning, match="could not freeze .*no converter here.*only slower"):
        call, _ = inference_function(model)
    assert call.kind == "model"
    x_adv, _ = PGD(model, steps=3).run(x, y, 0.05)
    assert np.abs(x_adv - x).max() <= 0.05 + 1e-6


def test_forms_can_be_capped_for_benchmarks():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capped form is chosen, not a fallback
        assert inference_function(model_with_batch_norm_statistics(), form="frozen")[0].kind == "frozen"
        assert inference_function(model_with_batch_norm_statistics(), form="model")[0].kind == "model"
    with pytest.raises(ValueError, match="form must be one of"):
        inference_function(model_with_batch_norm_statistics(), form="fast")
