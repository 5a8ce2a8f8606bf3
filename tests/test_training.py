"""Tests for the training methods (medrobust.training): SSAT, PGD-AT, TRADES and the train CLI's resume."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from medrobust.data.phantom import make_phantom
from medrobust.models import build_classifier
from medrobust.training import TRAINERS, make_trainer
from medrobust.training.base import Trainer
from medrobust.training.ssat import SSATTrainer
from medrobust.training.supervised import MARTTrainer, PGDATTrainer, TRADESTrainer, kl_divergence, pgd_linf

SIZE, BATCH = 28, 16
TOL = 1e-6  # float32 rounding of x + delta


def _data(n=BATCH, seed=0):
    x, y = make_phantom(n, SIZE, seed=seed)
    # Saturated pixels make the [0, 1] clipping matter.
    x[:, :2] = 0.0
    x[:, -2:] = 1.0
    return x, y.astype(np.int64)


def _classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return build_classifier("small_cnn", SIZE, width=8)


def _copy(model):
    clone = _classifier(123)
    clone.set_weights(model.get_weights())
    return clone


def _bn_moving_stats(model):
    return [w.numpy().copy() for w in model.non_trainable_weights]


def _one_step(trainer, dataset, optimizer=None):
    trainer.compile(optimizer=optimizer or keras.optimizers.SGD(0.1))
    return trainer.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False).history


def _check_in_ball(x_adv, x, eps_max):
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.shape == x.shape
    assert np.all(np.abs(x_adv - x) <= eps_max + TOL)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


# -- registry ------------------------------------------------------------------------------------
def test_registry_has_all_methods_and_accepts_cli_options():
    from medrobust.train import METHODS, trainer_options

    assert set(METHODS) <= set(TRAINERS)
    assert TRAINERS["ssat"] is SSATTrainer and TRAINERS["pgd_at"] is PGDATTrainer
    assert TRAINERS["trades"] is TRADESTrainer and TRAINERS["mart"] is MARTTrainer
    cli = dict(eps=(0.001, 0.003), lam=3.0, attack="fgsm", pgd_steps=10, confidence=0.0, teacher=None,
               train_eps=0.004, beta=6.0)
    for method in METHODS:
        trainer = make_trainer(method, _classifier(), **trainer_options({**cli, "method": method}, None))
        assert trainer.method == method
    with pytest.raises(ValueError, match="unknown method"):
        make_trainer("nope", _classifier())


@pytest.mark.parametrize("kwargs", [dict(eps_range=(0.003, 0.001)), dict(eps_range=(0.0, 2.0)),
                                    dict(attack="cw"), dict(lam=-1.0), dict(confidence=1.0),
                                    dict(teacher="bogus"), dict(pretrain_steps=-1), dict(teacher="snapshot")])
def test_ssat_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        SSATTrainer(_classifier(), **kwargs)


# -- SSAT adversaries ----------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_ssat_craft_in_eps_ball_and_unit_range(attack):
    x, _ = _data(32)
    eps_min, eps_max = 0.01, 0.03  # large enough to see the per-image draw clearly
    trainer = SSATTrainer(_classifier(), eps_range=(eps_min, eps_max), attack=attack, pgd_steps=3)
    x_adv, pseudo, kept = trainer.craft(x)
    _check_in_ball(x_adv, x, eps_max)
    assert pseudo.shape == (32,) and pseudo.dtype == tf.int32 and bool(tf.reduce_all(kept))
    delta = np.abs(x_adv.numpy() - x)
    interior = (x > eps_max) & (x < 1 - eps_max)  # pixels the [0, 1] clip cannot touch
    per_image = np.array([d[m].max() for d, m in zip(delta, interior)])
    assert np.all(per_image <= eps_max + TOL)
    if attack == "fgsm":
        # One full signed step of the image's own eps: every interior pixel with a nonzero gradient
        # moves by exactly that eps (max-pooling leaves some gradients exactly zero).
        moved = delta > 1e-7
        assert moved.mean() > 0.5
        per_image_min = np.array([d[m & k].min() for d, m, k in zip(delta, interior, moved)])
        np.testing.assert_allclose(per_image_min, per_image, atol=1e-5)
        assert np.all(per_image >= eps_min - TOL)
        assert per_image.std() > 1e-3, "eps must be drawn per image"


def test_ssat_fgsm_follows_the_pseudo_label_gradient():
    x, _ = _data()
    clf = _classifier()
    trainer = SSATTrainer(clf, eps_range=(0.01, 0.01))
    x_adv, pseudo, _ = trainer.craft(x)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(pseudo, clf(xt, training=False)))
    expected = np.clip(x + 0.01 * np.sign(tape.gradient(loss, xt).numpy()), 0, 1)
    np.testing.assert_allclose(x_adv.numpy(), expected, atol=1e-6)


def test_train_step_uses_craft_and_its_adversaries_are_in_the_ball():
    x, y = _data()
    x_u, _ = _data(seed=1)
    trainer = SSATTrainer(_classifier(), eps_range=(0.001, 0.003))
    seen = []
    craft = trainer.craft

    def spy(x_in):
        out = craft(x_in)
        seen.append((np.asarray(x_in), out[0].numpy()))
        return out

    trainer.craft = spy
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)
    history = trainer.fit(tf.data.Dataset.from_tensors(((x, x_u), y)).repeat(), epochs=1, steps_per_epoch=2,
                          shuffle=False, verbose=0).history
    assert len(seen) == 2
    for x_in, x_adv in seen:
        np.testing.assert_array_equal(x_in, x_u)  # the unlabeled batch is the one attacked
        _check_in_ball(x_adv, x_u, 0.003)
    assert set(history) == {"loss", "labeled_ce", "adv_ce", "pseudo_kept", "accuracy"}


def test_ssat_without_unlabeled_batch_attacks_the_labeled_batch_against_its_true_labels():
    x, y = _data()
    trainer = SSATTrainer(_classifier(), eps_range=(0.01, 0.01))
    prepared = trainer.prepare(tf.constant(x), tf.constant(y), None)
    _check_in_ball(prepared["x_adv"], x, 0.01)
    assert float(prepared["n_total"]) == BATCH and float(prepared["n_kept"]) == BATCH
    np.testing.assert_array_equal(prepared["pseudo"].numpy(), y)  # labels known: no pseudo-labels
    # FGSM on the true labels: x + eps * sign(grad CE(f(x), y)), clipped to [0, 1].
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, trainer.classifier(xt, training=False)))
    expected = np.clip(x + 0.01 * np.sign(tape.gradient(loss, xt).numpy()), 0, 1)
    np.testing.assert_allclose(prepared["x_adv"].numpy(), expected, atol=1e-6)


# -- pseudo-labels come from inference mode -------------------------------------------------------
class _Spy(keras.Model):
    """Records the `training` flag of every call to the wrapped model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.flags = inner, []

    def call(self, x, training=None):
        self.flags.append(training)
        return self.inner(x, training=training)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_ssat_craft_runs_in_inference_mode(attack):
    x, _ = _data()
    clf = _classifier()
    clf(x[:4], training=True)  # BatchNorm moving statistics away from their initial values
    spy = _Spy(clf)
    trainer = SSATTrainer(spy, attack=attack, pgd_steps=2)
    before = _bn_moving_stats(clf)
    _, pseudo, _ = trainer.craft(x)
    assert spy.flags and all(flag is False for flag in spy.flags)
    for b, a in zip(before, _bn_moving_stats(clf)):
        np.testing.assert_array_equal(a, b)
    inference = np.argmax(clf(x, training=False).numpy(), axis=-1)
    np.testing.assert_array_equal(pseudo.numpy(), inference)


def test_ssat_pseudo_labels_from_frozen_teacher():
    x, _ = _data()
    student, teacher = _classifier(0), _classifier(7)
    teacher_labels = np.argmax(teacher(x, training=False).numpy(), axis=-1)
    student_labels = np.argmax(student(x, training=False).numpy(), axis=-1)
    assert not np.array_equal(teacher_labels, student_labels), "pick seeds whose predictions differ"
    trainer = SSATTrainer(student, teacher=teacher)
    _, pseudo, _ = trainer.craft(x)
    np.testing.assert_array_equal(pseudo.numpy(), teacher_labels)
    assert not teacher.trainable
    # The teacher is frozen: a training step changes only the student.
    before = [w.numpy().copy() for w in teacher.weights]
    _one_step(trainer, tf.data.Dataset.from_tensors(((x, x), _data()[1])))
    for b, w in zip(before, teacher.weights):
        np.testing.assert_array_equal(w.numpy(), b)


def test_ssat_confidence_mask_and_masked_mean():
    x, y = _data(32)
    clf = _classifier()
    probs = tf.nn.softmax(clf(x, training=False)).numpy().max(axis=-1)
    tau = float(np.median(probs))
    trainer = SSATTrainer(clf, confidence=tau, eps_range=(0.002, 0.002))
    prepared = trainer.prepare(tf.constant(x), tf.constant(y), tf.constant(x))
    expected_mask = probs >= tau
    assert 0 < expected_mask.sum() < len(x)
    np.testing.assert_array_equal(prepared["mask"].numpy() > 0, expected_mask)
    parts, _ = trainer.objective(tf.constant(x), tf.constant(y), prepared)
    # Recompute the adversarial CE in training mode (BatchNorm batch statistics of the whole x_adv batch).
    adv_logits = clf(prepared["x_adv"], training=True)
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(prepared["pseudo"], adv_logits).numpy()
    np.testing.assert_allclose(float(parts["adv_ce"]), per_example[expected_mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(parts["pseudo_kept"]), expected_mask.mean())
    np.testing.assert_allclose(float(parts["loss"]), float(parts["labeled_ce"]) + 3.0 * float(parts["adv_ce"]),
                               rtol=1e-6)


# -- class balance -------------------------------------------------------------------------------
def test_balanced_class_weights():
    from medrobust.training.base import balanced_class_weights

    y = np.array([0, 0, 0, 1, 1, 3])
    weights = balanced_class_weights(y, 4)
    assert weights == [0.5, 0.75, 0.0, 1.5]  # n / (4 n_c); an absent class weighs 0
    full = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    assert np.mean(np.array(balanced_class_weights(full, 4))[full]) == pytest.approx(1.0)  # loss scale kept
    for bad in (np.array([], int), np.array([0, 4])):
        with pytest.raises(ValueError, match="labels in"):
            balanced_class_weights(bad, 4)
    with pytest.raises(ValueError, match="class_weights"):
        Trainer(_classifier(), class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="class_weights"):
        Trainer(_classifier(), class_weights=[0.0, 0.0, 0.0, 0.0])


CLASS_WEIGHTS = [1.0, 2.0, 0.5, 3.0]


def _weighted(per_example, y, weights=CLASS_WEIGHTS):
    w = np.asarray(weights)[y]
    return float(np.sum(w * np.asarray(per_example)) / np.sum(w))


def _ce(clf, x, y):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(y, clf(x, training=True)).numpy()


@pytest.mark.parametrize("method, options", [
    ("standard", {}), ("pgd_at", dict(eps=0.01, steps=2)), ("trades", dict(eps=0.01, steps=2)),
    ("ssat", dict(eps_range=(0.01, 0.01)))])
def test_class_weights_make_every_labeled_term_a_weighted_mean(method, options):
    x, y = _data()
    assert len(set(y.tolist())) > 1
    clf = _classifier()
    trainer = make_trainer(method, clf, class_weights=CLASS_WEIGHTS, **options)
    xt, yt = tf.constant(x), tf.constant(y)
    prepared = trainer.prepare(xt, yt, None)
    parts, _ = trainer.objective(xt, yt, prepared)
    if method == "standard":
        np.testing.assert_allclose(float(parts["loss"]), _weighted(_ce(clf, x, y), y), rtol=1e-5)
    elif method == "pgd_at":
        np.testing.assert_allclose(float(parts["loss"]), _weighted(_ce(clf, prepared["x_adv"], y), y), rtol=1e-5)
    elif method == "trades":
        kl = kl_divergence(clf(xt, training=True), clf(prepared["x_adv"], training=True)).numpy()
        np.testing.assert_allclose(float(parts["natural_ce"]), _weighted(_ce(clf, x, y), y), rtol=1e-5)
        np.testing.assert_allclose(float(parts["robust_kl"]), _weighted(kl, y), rtol=1e-4, atol=1e-7)
    else:  # no unlabeled pool: the labeled batch's adversaries carry their class weights too
        np.testing.assert_allclose(float(parts["labeled_ce"]), _weighted(_ce(clf, x, y), y), rtol=1e-5)
        np.testing.assert_allclose(float(parts["adv_ce"]), _weighted(_ce(clf, prepared["x_adv"], y), y), rtol=1e-5)
        assert float(parts["pseudo_kept"]) == 1.0


def test_pseudo_labeled_adversaries_are_not_class_weighted():
    x, y = _data()
    x_u, _ = _data(seed=1)
    clf = _classifier()
    trainer = SSATTrainer(clf, eps_range=(0.002, 0.002), class_weights=CLASS_WEIGHTS)
    prepared = trainer.prepare(tf.constant(x), tf.constant(y), tf.constant(x_u))
    parts, _ = trainer.objective(tf.constant(x), tf.constant(y), prepared)
    adv = tf.nn.sparse_softmax_cross_entropy_with_logits(prepared["pseudo"], clf(prepared["x_adv"], training=True))
    np.testing.assert_allclose(float(parts["adv_ce"]), float(tf.reduce_mean(adv)), rtol=1e-5)


def test_equal_class_weights_train_exactly_like_no_weights():
    x, y = _data()
    start = _classifier()
    dataset = tf.data.Dataset.from_tensors((x, y))
    plain, _ = _weights_after_one_step(Trainer, _copy(start), dataset)
    equal, _ = _weights_after_one_step(Trainer, _copy(start), dataset, class_weights=[2.0] * 4)
    for a, b in zip(plain, equal):
        np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.parametrize("method", ["standard", "ssat"])
def test_ema_saves_the_moving_average_of_the_weights_each_step_left(method):
    """--ema m: after fit() the classifier holds avg_1 = w_1, avg_t = m * avg_(t-1) + (1 - m) * w_t over the
    weights w_t each step left (Keras' use_ema), not the last step's weights; through the trainer wrapper."""
    from medrobust.train import make_optimizer

    x, y = _data(4 * BATCH)
    classifier = _classifier()
    options = {"eps_range": (0.01, 0.01), "lam": 1.0, "teacher": None} if method == "ssat" else {}
    trainer = make_trainer(method, classifier, **options)
    trainer.compile(optimizer=make_optimizer({"lr": 1e-2, "lr_schedule": "constant", "ema": 0.5}, 4))
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: seen.append([v.numpy().copy() for v in classifier.trainable_variables]))
    data = (x, y) if method == "standard" else ((x, x[::-1]), y)
    trainer.fit(*data, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    expected = seen[0]
    for weights in seen[1:]:
        expected = [0.5 * a + 0.5 * w for a, w in zip(expected, weights)]
    final = [v.numpy() for v in classifier.trainable_variables]
    assert len(seen) == 4
    for got, want, last in zip(final, expected, seen[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(g - last).max()) for g, last in zip(final, seen[-1])) > 1e-4


def test_training_recipe_resolves_augmentation_and_class_weights():
    from types import SimpleNamespace

    from medrobust.data.pipeline import AUGMENTATION
    from medrobust.train import training_recipe

    real, phantom = SimpleNamespace(synthetic=False, classes="ABCD"), SimpleNamespace(synthetic=True, classes="ABCD")
    y = np.array([0, 0, 0, 1, 1, 3])
    recipe = training_recipe({"augment": "auto", "class_weight": "balanced"}, real, y)
    assert recipe == {"augmentation": AUGMENTATION, "class_weights": [0.5, 0.75, 0.0, 1.5]}
    assert training_recipe({"augment": "auto", "class_weight": "none"}, phantom, y) == {
        "augmentation": None, "class_weights": None}
    assert training_recipe({"augment": "true", "class_weight": "none"}, phantom, y)["augmentation"] == AUGMENTATION
    assert training_recipe({"augment": "false", "class_weight": "none"}, real, y)["augmentation"] is None


def test_augmentation_is_per_image_label_preserving_and_in_unit_range():
    from medrobust.data.pipeline import AUGMENTATION, augmenter, train_dataset

    x, y = _data(64)
    (xa, xu), ya = next(iter(train_dataset(x, y, 64, seed=0, x_unlabeled=x, augment=AUGMENTATION)))
    xa, xu = xa.numpy(), xu.numpy()
    assert xa.shape == x.shape and 0.0 <= xa.min() and xa.max() <= 1.0 and xu.min() >= 0.0 and xu.max() <= 1.0
    assert sorted(ya.numpy().tolist()) == sorted(y.tolist())
    assert not any(np.allclose(a, b) for a in xa[:8] for b in x)  # every image changed
    same = np.repeat(x[:1], 16, axis=0)
    copies = augmenter(AUGMENTATION, seed=0)(same, training=True).numpy()
    assert len({round(float(c.mean()), 5) for c in copies}) > 8  # each image draws its own transform
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmenter({"shear": 10})


def test_cli_architectures_match_the_model_registry_and_auto_picks_by_size(tmp_path, monkeypatch):
    import medrobust.train as train_module
    from medrobust.models import ARCHITECTURES

    from medrobust.models.mobilenet import MIN_SIZE

    assert set(train_module.ARCHS) == {"auto", *ARCHITECTURES}
    assert set(train_module.ARCH_MIN_SIZE) == set(ARCHITECTURES)
    assert train_module.ARCH_MIN_SIZE["mobilenet_v3_small"] == MIN_SIZE
    from medrobust.models import build_classifier

    for arch, smallest in train_module.ARCH_MIN_SIZE.items():  # the smallest size the CLI allows builds and runs
        model = build_classifier(arch, image_size=smallest, width=8 if arch != "mobilenet_v3_small" else None)
        assert model(np.zeros((1, smallest, smallest, 1), np.float32)).shape == (1, 4)
    seen = {}
    monkeypatch.setattr(train_module, "_train", lambda o, out_dir, *pool: seen.update({o["image_size"]: o["arch"]}) or {})
    for size in (28, train_module.STRIDED_FROM):  # standard: ssat would first train its teacher run
        train_module.train(data="phantom", method="standard", image_size=size, out=str(tmp_path / str(size)))
    assert seen == {28: "small_cnn", train_module.STRIDED_FROM: "strided_cnn"}
    with pytest.raises(ValueError, match="needs --image-size >= 32"):  # refused before any work
        train_module.train(data="phantom", arch="mobilenet_v3_small", image_size=28, out=str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


# -- lambda = 0 is standard training -------------------------------------------------------------
def _weights_after_one_step(trainer_cls, clf, dataset, **kwargs):
    trainer = trainer_cls(clf, **kwargs)
    history = _one_step(trainer, dataset)
    return [w.numpy() for w in clf.trainable_weights], history


def test_ssat_lambda_zero_equals_standard_training():
    x, y = _data()
    x_u, _ = _data(seed=1)
    start = _classifier()
    initial = [w.numpy().copy() for w in start.trainable_weights]
    standard, _ = _weights_after_one_step(Trainer, _copy(start), tf.data.Dataset.from_tensors((x, y)))
    semi = tf.data.Dataset.from_tensors(((x, x_u), y))
    ssat0, history = _weights_after_one_step(SSATTrainer, _copy(start), semi, lam=0.0)
    ssat3, _ = _weights_after_one_step(SSATTrainer, _copy(start), semi, lam=3.0)
    assert history["adv_ce"][0] > 0  # the adversarial branch ran, with weight 0
    for w0, ws, wz, w3 in zip(initial, standard, ssat0, ssat3):
        np.testing.assert_allclose(wz, ws, atol=1e-6)
    assert any(not np.allclose(w3, ws, atol=1e-4) for ws, w3 in zip(standard, ssat3)), "lam > 0 must matter"
    assert any(not np.allclose(ws, w0) for w0, ws in zip(initial, standard))


def test_ssat_pretraining_then_frozen_snapshot_teacher():
    x, y = _data()
    x_u, _ = _data(seed=1)
    clf = _classifier()
    trainer = SSATTrainer(clf, lam=3.0, teacher="snapshot", pretrain_steps=2)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    assert float(trainer.current_lam()) == 0.0
    seen = []

    def record(batch, logs):
        seen.append((int(trainer.teacher_ready), [w.numpy().copy() for w in trainer.teacher.weights],
                     [w.numpy().copy() for w in clf.weights]))

    trainer.fit(tf.data.Dataset.from_tensors(((x, x_u), y)).repeat(), epochs=1, steps_per_epoch=4, verbose=0,
                shuffle=False, callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=record)])
    assert [ready for ready, _, _ in seen] == [0, 0, 1, 1]
    # Step 3 starts by copying the classifier as it was after the 2 labeled-only steps ...
    for t, c in zip(seen[2][1], seen[1][2]):
        np.testing.assert_array_equal(t, c)
    # ... and the copy stays frozen while the classifier moves on.
    for t2, t3 in zip(seen[2][1], seen[3][1]):
        np.testing.assert_array_equal(t3, t2)
    assert any(not np.allclose(t, c) for t, c in zip(seen[3][1], seen[3][2]))
    assert float(trainer.current_lam()) == 3.0
    assert not trainer.teacher.trainable
    assert not set(map(id, trainer.teacher.weights)) & set(map(id, clf.trainable_weights))
    _, pseudo, _ = trainer.craft(x_u)
    np.testing.assert_array_equal(pseudo.numpy(), np.argmax(trainer.teacher(x_u, training=False).numpy(), -1))


def test_ssat_pretraining_steps_equal_standard_training():
    x, y = _data()
    start = _classifier()
    standard, _ = _weights_after_one_step(Trainer, _copy(start), tf.data.Dataset.from_tensors((x, y)))
    pre, _ = _weights_after_one_step(SSATTrainer, _copy(start), tf.data.Dataset.from_tensors(((x, x), y)),
                                     lam=3.0, pretrain_steps=5)
    for ws, wp in zip(standard, pre):
        np.testing.assert_allclose(wp, ws, atol=1e-6)


def test_cli_options_for_ssat_teacher_and_pretraining():
    from medrobust.train import trainer_options

    base = dict(method="ssat", eps=(0.002,), lam=3.0, attack="fgsm", pgd_steps=10, confidence=0.0, epochs=10)
    options = trainer_options({**base, "teacher": "snapshot", "pretrain_epochs": 3.0}, None, steps_per_epoch=7)
    assert options["teacher"] == "snapshot" and options["pretrain_steps"] == 21
    assert options["eps_range"] == (0.002, 0.002)
    # Pre-training never takes more than half the run.
    short = trainer_options({**base, "epochs": 2, "teacher": "none", "pretrain_epochs": 3.0}, None, 7)
    assert short["teacher"] is None and short["pretrain_steps"] == 7
    loaded = trainer_options({**base, "teacher": "some/classifier.keras", "pretrain_epochs": 0.0},
                             lambda path: ("loaded", path), 7)
    assert loaded["teacher"] == ("loaded", "some/classifier.keras") and loaded["pretrain_steps"] == 0


def test_ssat_joint_forward_step_runs():
    x, y = _data()
    x_u, _ = _data(seed=1)
    history = _one_step(SSATTrainer(_classifier(), joint_forward=True), tf.data.Dataset.from_tensors(((x, x_u), y)))
    assert all(np.isfinite(v[0]) for v in history.values())
    assert history["adv_ce"][0] > 0


# -- PGD-AT and TRADES --------------------------------------------------------------------------
def test_pgd_linf_stays_in_ball_and_raises_the_loss():
    x, y = _data(32)
    clf = _classifier()
    y_pred = tf.argmax(clf(x, training=False), axis=-1, output_type=tf.int32)
    ce = lambda logits, t: tf.nn.sparse_softmax_cross_entropy_with_logits(t, logits)  # noqa: E731
    for eps in (0.03, np.linspace(0.0, 0.05, 32).astype(np.float32)):
        x_adv = pgd_linf(clf, tf.constant(x), y_pred, eps, steps=5, objective=ce)
        _check_in_ball(x_adv, x, np.max(eps))
        d = np.abs(x_adv.numpy() - x).reshape(32, -1).max(axis=1)
        assert np.all(d <= np.broadcast_to(eps, (32,)) + TOL)
    clean = ce(clf(x, training=False), y_pred).numpy().mean()
    adv = ce(clf(x_adv, training=False), y_pred).numpy().mean()
    assert adv > clean


def test_pgd_at_adversaries_and_eps_zero_is_standard():
    x, y = _data()
    start = _classifier()
    trainer = PGDATTrainer(start, eps=0.004, steps=3)
    x_adv = trainer.craft(tf.constant(x), tf.constant(y))
    _check_in_ball(x_adv, x, 0.004)
    assert np.abs(x_adv.numpy() - x).max() > 0.001
    standard, _ = _weights_after_one_step(Trainer, _copy(start), tf.data.Dataset.from_tensors((x, y)))
    # eps = 0: the adversary is x itself, so the update is the standard one; x_u is ignored.
    at0, history = _weights_after_one_step(PGDATTrainer, _copy(start),
                                           tf.data.Dataset.from_tensors(((x, _data(seed=1)[0]), y)), eps=0.0, steps=2)
    for ws, wa in zip(standard, at0):
        np.testing.assert_allclose(wa, ws, atol=1e-6)
    assert set(history) == {"loss", "accuracy"}


def test_trades_adversaries_and_beta_zero_is_standard():
    x, y = _data()
    start = _classifier()
    trainer = TRADESTrainer(start, eps=0.004, steps=3)
    x_adv = trainer.craft(tf.constant(x))
    _check_in_ball(x_adv, x, 0.004)
    clean = start(x, training=False)
    assert float(tf.reduce_mean(kl_divergence(clean, start(x_adv, training=False)))) > 0
    standard, _ = _weights_after_one_step(Trainer, _copy(start), tf.data.Dataset.from_tensors((x, y)))
    tr0, history = _weights_after_one_step(TRADESTrainer, _copy(start), tf.data.Dataset.from_tensors((x, y)),
                                           beta=0.0, steps=2)
    for ws, wt in zip(standard, tr0):
        np.testing.assert_allclose(wt, ws, atol=1e-6)
    assert set(history) == {"loss", "natural_ce", "robust_kl", "accuracy"}
    assert history["robust_kl"][0] >= 0


def _mart_reference(clean_logits, adv_logits, y, weights=None):
    """MART's loss as written in the reference code (Wang et al. 2020, train_wideresnet.py), in numpy."""
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    nat, adv = softmax(np.float64(clean_logits)), softmax(np.float64(adv_logits))
    n = len(y)
    order = np.argsort(adv, axis=1)
    new_y = np.where(order[:, -1] == y, order[:, -2], order[:, -1])
    bce = -np.log(adv[np.arange(n), y] + 1e-12) - np.log(1.0001 - adv[np.arange(n), new_y] + 1e-12)
    kl = (nat * (np.log(nat + 1e-12) - np.log(adv + 1e-12))).sum(1) * (1.0000001 - nat[np.arange(n), y])
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)[y]
    return (w * bce).sum() / w.sum(), (w * kl).sum() / w.sum()


@pytest.mark.parametrize("weights", [None, CLASS_WEIGHTS])
def test_mart_loss_matches_the_reference_formula(weights):
    x, y = _data()
    clf = _classifier()
    trainer = MARTTrainer(clf, eps=0.01, steps=2, beta=6.0, class_weights=weights)
    xt, yt = tf.constant(x), tf.constant(y)
    prepared = trainer.prepare(xt, yt, None)
    _check_in_ball(prepared["x_adv"], x, 0.01)
    parts, _ = trainer.objective(xt, yt, prepared)
    bce, kl = _mart_reference(clf(xt, training=True).numpy(), clf(prepared["x_adv"], training=True).numpy(), y, weights)
    np.testing.assert_allclose(float(parts["boosted_ce"]), bce, rtol=1e-4)
    np.testing.assert_allclose(float(parts["robust_kl"]), kl, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(float(parts["loss"]), bce + 6.0 * kl, rtol=1e-4)
    # Its adversary raises the cross-entropy it was crafted on.
    assert _ce(clf, prepared["x_adv"], y).mean() > _ce(clf, x, y).mean()
    _, history = _weights_after_one_step(MARTTrainer, _copy(clf), tf.data.Dataset.from_tensors((x, y)), steps=2)
    assert set(history) == {"loss", "boosted_ce", "robust_kl", "accuracy"}


def test_balanced_sampling_draws_every_class_equally_often():
    from medrobust.data.pipeline import train_dataset

    y = np.array([0] * 300 + [1] * 30 + [2] * 10 + [3] * 160)
    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1, 1) / len(y)
    counts = {"natural": np.zeros(4), "balanced": np.zeros(4)}
    for sampling in counts:
        for xb, yb in train_dataset(x, y, 50, seed=3, sampling=sampling).take(40):
            # Images and labels stay paired.
            np.testing.assert_array_equal(y[np.rint(xb.numpy().reshape(-1) * len(y)).astype(int)], yb.numpy())
            counts[sampling] += np.bincount(yb.numpy(), minlength=4)
    share = counts["balanced"] / counts["balanced"].sum()
    np.testing.assert_allclose(share, 0.25, atol=0.04)
    assert counts["natural"][2] / counts["natural"].sum() < 0.04  # 2% of the images: rare without balancing
    with pytest.raises(ValueError, match="sampling"):
        train_dataset(x, y, 50, sampling="oversample")


def test_kl_divergence():
    p = tf.constant([[2.0, 0.0, -1.0, 0.5]])
    assert abs(float(kl_divergence(p, p)[0])) < 1e-6
    q = tf.constant([[0.0, 1.0, 0.0, 0.0]])
    pp, qq = tf.nn.softmax(p).numpy(), tf.nn.softmax(q).numpy()
    np.testing.assert_allclose(kl_divergence(p, q).numpy(), (pp * np.log(pp / qq)).sum(-1), rtol=1e-5)


# -- the CLI resumes a killed run -----------------------------------------------------------------
def _logged_epochs(path: Path) -> list[int]:
    if not path.exists():
        return []
    with path.open() as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get("epoch", "").strip()]


@pytest.mark.slow
def test_killed_run_resumes_from_last_finished_epoch(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "medrobust.train", "--data", "phantom", "--method", "ssat", "--epochs", "3",
               "--out", str(out), "--detector", "false", "--width", "8"]  # width 8: a faster small CNN
    log = out / "training_log.csv"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.txt", "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600
            while not _logged_epochs(log) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            first_output = (tmp_path / "first.txt").read_text()
            assert proc.poll() is None, f"the run ended before it could be killed:\n{first_output}"
            assert _logged_epochs(log) == [0]
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert not (out / "metrics.json").exists()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    # Epoch 0 is logged once: the second session went on from the backup instead of starting over.
    epochs = _logged_epochs(log)
    assert epochs[0] == 0 and epochs.count(0) == 1 and epochs[-1] == 2 and epochs == sorted(set(epochs)), epochs
    assert (out / "metrics.json").exists() and (out / "classifier.keras").exists()
