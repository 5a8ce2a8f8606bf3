"""Tests for medrobust.attacks.inference: the frozen inference graph the attacks differentiate, and when
an attack uses it."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from medrobust.attacks import APGD, FMN, PGD, CarliniWagnerL2, SquareAttack, cross_entropy
from medrobust.attacks import inference
from medrobust.attacks.inference import ModelInference
from medrobust.attacks.square import keras_predict_fn
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
    call, _ = ModelInference(model).current(x)
    assert call.kind == "constant-folded"
    ops = {op.type for op in call.function.graph.get_operations()}
    assert not ops & {"Mul", "Rsqrt", "ReadVariableOp"}, f"batch norms not folded or weights read: {sorted(ops)}"
    np.testing.assert_allclose(call(tf.constant(x)).numpy(), model(x, training=False).numpy(), atol=1e-5)
    ours, reference = input_gradient(call, x, y), input_gradient(lambda v: model(v, training=False), x, y)
    relative = (np.linalg.norm((ours - reference).reshape(len(x), -1), axis=1)
                / np.linalg.norm(reference.reshape(len(x), -1), axis=1))
    # float rounding can flip a ReLU or a max-pool choice in the odd image, nothing more
    assert np.mean(relative < 1e-3) >= 0.9, relative


def test_frozen_at_once_dropped_when_the_weights_change_and_refrozen_when_they_settle():
    model = model_with_batch_norm_statistics()
    x, _ = images(4)
    source = ModelInference(model)
    frozen, frozen_version = source.current(x)
    assert frozen.kind == "constant-folded" and source.current(x) == (frozen, frozen_version)
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([kernel, bias + 1.0])
    plain, plain_version = source.current(x)  # the stale copy is not used, nor frozen again yet
    assert plain.kind == "model" and plain_version != frozen_version
    refrozen, newer = source.current(x)
    assert refrozen.kind == "constant-folded" and newer not in (plain_version, frozen_version)
    np.testing.assert_allclose(refrozen(tf.constant(x)).numpy(), model(x, training=False).numpy(), atol=1e-5)


def test_a_train_then_attack_loop_freezes_once():
    """The new-user trial: re-freezing at every round of such a loop leaked GBs and was 5-9x slower."""
    model = model_with_batch_norm_statistics()
    x, y = images(8)
    attack = PGD(model, steps=2)
    versions = []
    for step in range(4):
        attack.run(x, y, 0.01)
        versions.append(attack._logits_version)
        model.get_layer("logits").set_weights([w + 0.01 for w in model.get_layer("logits").get_weights()])
    assert attack._logits.kind == "model" and len(set(versions)) == 2 and len(set(versions[1:])) == 1


def always_class_3(model) -> None:
    """Make `model` predict class 3 for every image (logits layer: no kernel, bias favouring class 3)."""
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([np.zeros_like(kernel), np.array([0.0, 0.0, 0.0, 5.0], np.float32)])


@pytest.mark.parametrize("name", ["pgd", "apgd", "fmn", "cw", "square"])
def test_an_attack_sees_weights_changed_after_it_froze_them(name):
    """A reused attack object must attack the model as it is now, not the copy it froze: after the model
    was changed to predict class 3 everywhere, every image of class 0 is already misclassified."""
    model = model_with_batch_norm_statistics()
    x, _ = images(16)
    y = np.zeros(len(x), np.int32)
    attack = {"pgd": lambda: PGD(model, steps=2), "apgd": lambda: APGD(model, steps=2),
              "fmn": lambda: FMN(model, steps=2), "cw": lambda: CarliniWagnerL2(model, steps=2, binary_search_steps=1),
              "square": lambda: SquareAttack(model, n_queries=2)}[name]()

    def fooled():
        if name == "fmn":
            return attack.find(x, y)[1] == 0  # distance 0: misclassified as it is
        if name == "cw":
            return attack.find(x, y)[1]
        return attack.run(x, y, 0.01)[-1]

    fooled()
    source = attack.predict_fn.inference if name == "square" else attack.inference
    assert source._frozen is not None
    always_class_3(model)
    assert fooled().all()


def test_keras_predict_fn_always_reads_the_current_weights():
    model = model_with_batch_norm_statistics()
    x, _ = images(4)
    predict = keras_predict_fn(model)
    predict(x)
    always_class_3(model)
    np.testing.assert_allclose(predict(x), model(x, training=False).numpy(), atol=1e-5)


def test_a_logits_attack_refuses_a_probability_model_every_time():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(inputs)))
    x, y = images(8)
    for attack in (FMN(model, steps=2), CarliniWagnerL2(model, steps=2, binary_search_steps=1)):
        for _ in range(2):
            with pytest.raises(ValueError, match="needs logits"):
                attack.find(x, y)


def test_a_model_whose_softmax_was_removed_is_attacked_as_it_is_now():
    """Stripping the softmax is what the refusal asks for; a new attack must see the logits, whatever an
    earlier attack object froze."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(inputs)))
    x, y = images(8)
    earlier = PGD(model, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the log-probability warning
        earlier.run(x, y, 0.01), earlier.run(x, y, 0.01)
    model.layers[-1].activation = keras.activations.linear
    attack = FMN(model, steps=2)
    attack.find(x, y)
    np.testing.assert_allclose(attack._logits(tf.constant(x)).numpy(), model(x, training=False).numpy(), atol=1e-5)


def test_a_model_with_two_outputs_is_refused_with_the_way_out():
    inputs = keras.Input((SIZE, SIZE, 1))
    h = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(4)(h), keras.layers.Dense(1)(h)])
    x, y = images(4)
    for attack in (PGD(model, steps=1), FMN(model, steps=1)):
        with pytest.raises(ValueError, match="2 outputs.*model.outputs"):
            attack(x, y, 0.01)
    with pytest.raises(ValueError, match="2 outputs"):
        SquareAttack(model)


def test_a_model_that_cannot_be_frozen_is_attacked_through_its_variables(monkeypatch):
    def refuse(_):
        raise RuntimeError("no converter here")

    monkeypatch.setattr(inference, "convert_variables_to_constants_v2", refuse)
    model = model_with_batch_norm_statistics()
    x, _ = images(8)
    y = np.argmax(model(x, training=False).numpy(), axis=1)
    attack = PGD(model, steps=3)
    with pytest.warns(UserWarning, match="could not freeze .*no converter here.*only slower"):
        x_adv, _ = attack.run(x, y, 0.05)
    assert attack._logits.kind == "model" and np.abs(x_adv - x).max() <= 0.05 + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once, not at every run
        attack.run(x, y, 0.05)


def test_xla_attacks_and_the_model_form_never_freeze():
    model = model_with_batch_norm_statistics()
    x, y = images(4)
    attack = PGD(model, steps=1, jit_compile=True)
    attack.run(x, y, 0.01), attack.run(x, y, 0.01)
    assert attack._logits.kind == "model"
    source = ModelInference(model, form="model")
    assert source.current(x)[0].kind == source.current(x)[0].kind == "model"
    with pytest.raises(ValueError, match="form must be one of"):
        ModelInference(model, form="fast")
