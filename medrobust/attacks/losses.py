"""Per-example attack objectives on logits (higher = more adversarial)."""

import tensorflow as tf


def cross_entropy(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits)


def dlr(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020), negated so that higher is more adversarial.

    With fewer than 4 classes the denominator has no third-largest logit; 4 classes (OCT) suffice.
    """
    y = tf.cast(y, tf.int32)
    n_classes = tf.shape(logits)[-1]
    sorted_logits = tf.sort(logits, axis=-1, direction="DESCENDING")
    true = tf.gather(logits, y, batch_dims=1)
    others = tf.where(tf.one_hot(y, n_classes) > 0, -1e9, logits)
    best_other = tf.reduce_max(others, axis=-1)
    denom = sorted_logits[:, 0] - sorted_logits[:, 2] + 1e-12
    return -(true - best_other) / denom


def misclassified(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
