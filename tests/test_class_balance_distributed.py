"""Class-weighted losses under tf.distribute.MirroredStrategy on 2 logical CPUs match one device.

The two replicas get halves of the batch with very different weight sums (one half is mostly the
heavy class), so a per-replica weighted mean would differ from the global one; the trainers divide
by the all-reduced weight sum instead. Synchronized BatchNorm (as in test_distributed.py) leaves only
float rounding between the strategies. Runs in a fresh interpreter: logical devices must be set
before TensorFlow initialises.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

SIZE, GLOBAL_BATCH = 28, 16
CLASS_WEIGHTS = [1.0, 0.5, 4.0, 1.0]


def _child(out_path: str) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from medrobust.data.phantom import make_phantom
    from medrobust.training import make_trainer

    x, _ = make_phantom(GLOBAL_BATCH, SIZE, seed=0)
    # Replica 0 sees mostly DRUSEN (weight 4), replica 1 mostly DME (weight 0.5).
    y = np.array([2, 2, 2, 2, 2, 2, 0, 3, 1, 1, 1, 1, 1, 1, 0, 3], np.int64)

    from builders import small_cnn

    def build():
        return small_cnn(SIZE, width=8, sync_bn=True)

    initial = build().get_weights()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    # eps fixed, FGSM/PGD start "none" or zero-size: deterministic adversaries on both strategies.
    methods = {"standard": {}, "pgd_at": dict(eps=0.0, steps=1), "ssat": dict(eps_range=(0.002, 0.002))}
    for method, options in methods.items():
        for name, strategy in (("single", tf.distribute.get_strategy()), ("mirrored", mirrored)):
            with strategy.scope():
                classifier = build()
                classifier.set_weights(initial)
                trainer = make_trainer(method, classifier, class_weights=CLASS_WEIGHTS, **options)
                trainer.compile(optimizer=keras.optimizers.SGD(0.1))
            data = tf.data.Dataset.from_tensors((x, y))
            history = trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False).history
            results[f"{name}_{method}"] = {
                "replicas": strategy.num_replicas_in_sync,
                "history": {k: float(v[0]) for k, v in history.items()},
                "weights": [w.tolist() for w in classifier.get_weights()],
            }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from builders import run_script

    return run_script(__file__, tmp_path_factory.mktemp("balance") / "results.json")


@pytest.mark.parametrize("method", ["standard", "pgd_at", "ssat"])
def test_weighted_loss_is_a_global_batch_mean_on_two_replicas(results, method):
    single, mirrored = results[f"single_{method}"], results[f"mirrored_{method}"]
    assert single["replicas"] == 1 and mirrored["replicas"] == 2
    for part, value in single["history"].items():
        np.testing.assert_allclose(mirrored["history"][part], value, rtol=1e-5, err_msg=part)
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5)


if __name__ == "__main__":
    _child(sys.argv[1])
