"""SSAT under tf.distribute.MirroredStrategy on 2 logical CPUs matches single-device training.

The logical devices must be configured before TensorFlow initialises its devices, which other tests
in this process have long done, so the comparison runs in a fresh interpreter: this file, run as a
script (`python tests/test_distributed.py OUT.json`), trains and writes the results.

Sources of difference between 1 and 2 replicas, and how the test handles them:
- BatchNorm normalises each replica's half batch with its own statistics. The exact comparison uses
  a copy of the small CNN whose BatchNorm layers are synchronized (global batch statistics), so only
  float rounding remains; the plain small CNN is compared on the first step's loss, loosely.
- Random eps: eps_min = eps_max, so FGSM is deterministic (SSAT's FGSM has no random start).
- The confidence threshold keeps a different number of pseudo-labels on each replica, which checks
  that the adversarial loss is a masked mean over the global batch.
- After step 1, FGSM's sign() and ReLU/max-pool ties turn rounding differences into discrete ones, so
  later steps agree more loosely.
A third pair of runs checks the in-graph snapshot teacher (teacher="snapshot") on both strategies.
MultiWorkerMirroredStrategy uses the same replica-context code (all_reduce, per-replica means) but
needs several processes and TF_CONFIG; it is not run here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

SIZE, GLOBAL_BATCH, STEPS, LAM = 28, 16, 3, 3.0


def _child(out_path: str) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from medrobust.data.phantom import make_phantom
    from medrobust.training import SSATTrainer

    x, y = make_phantom(GLOBAL_BATCH * STEPS, SIZE, seed=0)
    x_u, _ = make_phantom(GLOBAL_BATCH * STEPS, SIZE, seed=1)

    from builders import small_cnn

    def build(sync_bn: bool):
        return small_cnn(SIZE, width=8, sync_bn=sync_bn)

    reference = build(False)
    initial = reference.get_weights()
    # A threshold that keeps some of the first unlabeled batch's pseudo-labels, a different number on
    # each replica's half (midway between two confidences, so rounding cannot move an image across it).
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(reference(x_u[:GLOBAL_BATCH], training=False))).max(-1)
    half = GLOBAL_BATCH // 2
    ordered = np.sort(probs)
    candidates = [(a + b) / 2 for a, b in zip(ordered[:-1], ordered[1:])][GLOBAL_BATCH // 4:3 * GLOBAL_BATCH // 4]
    split = lambda t: [int((probs[:half] >= t).sum()), int((probs[half:] >= t).sum())]  # noqa: E731
    tau = float(next((t for t in candidates if len(set(split(t))) == 2), candidates[0]))
    kept_per_replica = split(tau)

    def dataset():
        return tf.data.Dataset.from_tensor_slices(((x, x_u), y)).batch(GLOBAL_BATCH, drop_remainder=True)

    results = {"kept_per_replica": kept_per_replica}
    # One MirroredStrategy for both runs: a second instance in the same process can reuse the first
    # one's collective instance keys and fail with a shape mismatch.
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    configs = {  # name: (synchronized BatchNorm, SSAT options)
        "sync": (True, dict(confidence=tau)),
        "plain": (False, dict(confidence=tau)),
        # Step 1 labeled-only, step 2 starts by copying the model into the frozen teacher (in the graph,
        # on every replica).
        "snapshot": (True, dict(teacher="snapshot", pretrain_steps=1)),
    }
    for config, (sync_bn, options) in configs.items():
        for name, strategy in (("single", tf.distribute.get_strategy()), ("mirrored", mirrored)):
            with strategy.scope():
                classifier = build(sync_bn)
                classifier.set_weights(initial)
                trainer = SSATTrainer(classifier, eps_range=(0.002, 0.002), lam=LAM, **options)
                trainer.compile(optimizer=keras.optimizers.SGD(0.05))
            weights = []
            snapshot = keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: weights.append([w.tolist() for w in classifier.get_weights()]))
            # steps_per_epoch=1: every epoch's logged values are one step's values.
            history = trainer.fit(dataset(), epochs=STEPS, steps_per_epoch=1, verbose=0, shuffle=False,
                                  callbacks=[snapshot]).history
            results[f"{name}_{config}"] = {
                "replicas": strategy.num_replicas_in_sync,
                "history": {k: [float(v) for v in vals] for k, vals in history.items()},
                "weights": weights,  # after each step
                "teacher": None if trainer.teacher is None else [w.tolist() for w in trainer.teacher.get_weights()],
            }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from builders import run_script

    return run_script(__file__, tmp_path_factory.mktemp("distributed") / "results.json")


def test_two_replicas_really_ran(results):
    assert results["single_sync"]["replicas"] == 1
    assert results["mirrored_sync"]["replicas"] == 2
    kept = results["kept_per_replica"]
    assert kept[0] != kept[1], f"replicas should keep different numbers of pseudo-labels: {kept}"


def _max_diff(a, b):
    return max(float(np.abs(np.array(x) - np.array(y)).max()) for x, y in zip(a, b))


def test_mirrored_matches_single_device_with_synchronized_batchnorm(results):
    single, mirrored = results["single_sync"], results["mirrored_sync"]
    # Step 1 (the replicas keep different numbers of pseudo-labels): the same loss and update up to rounding.
    for part in ("loss", "labeled_ce", "adv_ce", "pseudo_kept"):
        np.testing.assert_allclose(mirrored["history"][part][0], single["history"][part][0], rtol=1e-5,
                                   err_msg=part)
    assert 0 < single["history"]["pseudo_kept"][0] < 1
    assert _max_diff(single["weights"][0], mirrored["weights"][0]) < 1e-5
    # Later steps: FGSM's sign() and ReLU/max-pool ties turn rounding differences into discrete ones,
    # so the runs drift apart slowly (measured: 1e-4 after step 2, 8e-4 after step 3).
    for part in ("loss", "labeled_ce", "adv_ce", "pseudo_kept"):
        np.testing.assert_allclose(mirrored["history"][part], single["history"][part], rtol=1e-3, err_msg=part)
    assert _max_diff(single["weights"][-1], mirrored["weights"][-1]) < 1e-2
    # The weights did move, so the agreement is not trivial.
    assert _max_diff(single["weights"][0], single["weights"][-1]) > 1e-2


def test_mirrored_snapshot_teacher(results):
    single, mirrored = results["single_snapshot"], results["mirrored_snapshot"]
    for run in (single, mirrored):
        # The teacher is the model after step 1 (the labeled-only step), frozen afterwards.
        assert _max_diff(run["teacher"], run["weights"][0]) == 0
        assert run["history"]["adv_ce"][0] > 0 and run["history"]["loss"][0] == run["history"]["labeled_ce"][0]
    for part in ("loss", "labeled_ce", "adv_ce"):
        np.testing.assert_allclose(mirrored["history"][part], single["history"][part], rtol=1e-3, err_msg=part)
    assert _max_diff(single["teacher"], mirrored["teacher"]) < 1e-5


def test_mirrored_plain_batchnorm_first_step_close(results):
    # Per-replica BatchNorm statistics (8 images instead of 16) shift the training-mode losses a little.
    single, mirrored = results["single_plain"]["history"], results["mirrored_plain"]["history"]
    np.testing.assert_allclose(mirrored["pseudo_kept"][0], single["pseudo_kept"][0])  # inference mode: exact
    np.testing.assert_allclose(mirrored["loss"][0], single["loss"][0], rtol=0.05)
    np.testing.assert_allclose(mirrored["labeled_ce"], single["labeled_ce"], rtol=0.05)


if __name__ == "__main__":
    _child(sys.argv[1])
