"""Adaptive attacks on the whole system: fool the classifier AND stay under the detector's threshold.

Detectors that are only tested against attackers who ignore them look better than they are (Carlini &
Wagner 2017; Tramer et al. 2020). Because the UAD score is differentiable TensorFlow, PGD/APGD can
maximise a joint objective

    margin_term(x') - w * relu(score(x') - threshold + slack)

where margin_term = -relu(z_y - max_{j!=y} z_j) stops rewarding the classifier term once the image is
misclassified, so the remaining effort goes into hiding from the detector. Success means misclassified
and not flagged. The weight w is swept, w = 0 (the plain attack) included; an image counts as a silent
failure if ANY weight yields one (the attacker picks per image), which is the worst case the report gives.
"""

from __future__ import annotations

import tensorflow as tf

from medrobust.attacks.losses import misclassified

DEFAULT_WEIGHTS = (0.1, 1.0, 10.0)


def margin_term(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    y = tf.cast(y, tf.int32)
    true = tf.gather(logits, y, batch_dims=1)
    other = tf.reduce_max(tf.where(tf.one_hot(y, tf.shape(logits)[-1]) > 0, -1e9, logits), axis=-1)
    return -tf.nn.relu(true - other)


def joint_objective(classifier, detector, weight, slack: float = 0.0):
    """(objective_fn, success_fn) for medrobust's PGD/APGD `objective_fn=`/`success_fn=` options.

    weight may be a float or a tf.Variable (one compiled attack then serves a whole weight sweep)."""
    threshold = tf.constant(detector.threshold, tf.float32)

    def objective(x_adv, y):
        logits = classifier(x_adv, training=False)
        score = detector.score_tensor(x_adv)["combined"]
        return margin_term(logits, y) - weight * tf.nn.relu(score - threshold + slack)

    def success(x_adv, y):
        logits = classifier(x_adv, training=False)
        score = detector.score_tensor(x_adv)["combined"]
        return misclassified(logits, y) & (score <= threshold)

    return objective, success
