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

from medrobust.evaluation.suite import DEFAULT_WEIGHTS  # noqa: F401 (re-exported)


def margin_term(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    y = tf.cast(y, tf.int32)
    true = tf.gather(logits, y, batch_dims=1)
    other = tf.reduce_max(tf.where(tf.one_hot(y, tf.shape(logits)[-1]) > 0, -1e9, logits), axis=-1)
    return -tf.nn.relu(true - other)


def joint_objective(classifier, detector, weight, slack: float = 0.0):
    """(objective_fn, success_fn) for medrobust's PGD/APGD `objective_fn=`/`success_fn=` options.

    objective_fn returns (loss, success) from ONE pass through the detector, whose classifier pass on
    x_adv also gives the logits (detector.score_tensor(..., with_logits=True)): per step, one
    autoencoder pass and two classifier passes (x_adv and its reconstruction), forward and backward.
    success_fn (the same success on its own) is what the attacks use on their final iterate.
    weight may be a float or a tf.Variable (one compiled attack then serves a whole weight sweep).
    The detector must watch `classifier` (it reads its logits)."""
    threshold = tf.constant(detector.threshold, tf.float32)
    if detector.classifier is not classifier:
        raise ValueError("the detector watches another classifier than the one attacked")

    def objective(x_adv, y):
        out = detector.score_tensor(x_adv, with_logits=True)
        score = out["combined"]
        loss = margin_term(out["logits"], y) - weight * tf.nn.relu(score - threshold + slack)
        return loss, misclassified(out["logits"], y) & (score <= threshold)

    def success(x_adv, y):
        out = detector.score_tensor(x_adv, with_logits=True)
        return misclassified(out["logits"], y) & (out["combined"] <= threshold)

    return objective, success
