"""The Keras train-step skeleton shared by every training method.

A Trainer wraps a classifier (image -> logits) and overrides `train_step`:
  1. `prepare(x, y, x_u)` runs outside the gradient tape, in inference mode: adversaries,
     pseudo-labels, anything the update treats as constant;
  2. `objective(x, y, prepared)` runs inside the tape in training mode and returns the loss parts.
Losses are per-replica means scaled by 1/num_replicas, because Keras sums gradients across
replicas; the Mean trackers record the unscaled values, so logs read the same on any strategy.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def mean_over_batch(per_example: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(per_example)


def ce(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Per-example cross-entropy on logits."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits)


class Trainer(keras.Model):
    """Base class: plain cross-entropy on the labeled batch ("standard" training)."""

    method = "standard"
    loss_parts: tuple[str, ...] = ("loss",)

    def __init__(self, classifier: keras.Model, **kwargs):
        super().__init__(name=f"{self.method}_trainer", **kwargs)
        self.classifier = classifier
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.loss_parts}
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, x, training=False):
        if isinstance(x, (tuple, list)):  # (x, x_u) training inputs: Keras builds the model on them
            x = x[0]
        return self.classifier(x, training=training)

    @property
    def metrics(self):
        return [*self.trackers.values(), self.accuracy]

    # -- the two hooks subclasses override -------------------------------------------------------
    def prepare(self, x, y, x_u) -> dict:
        return {}

    def objective(self, x, y, prepared: dict) -> tuple[dict, tf.Tensor]:
        """Loss parts (each a batch mean, 'loss' is the total) and the clean logits of x."""
        logits = self.classifier(x, training=True)
        return {"loss": mean_over_batch(ce(logits, y))}, logits

    # -- Keras plumbing --------------------------------------------------------------------------
    def train_step(self, data):
        x, y = data
        x_u = None
        if isinstance(x, (tuple, list)):
            x, x_u = x
        prepared = self.prepare(x, y, x_u)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            parts, logits = self.objective(x, y, prepared)
            loss = self.optimizer.scale_loss(parts["loss"] / replicas)
        weights = self.classifier.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
        return self._update_metrics(parts, y, logits)

    def test_step(self, data):
        x, y = data
        logits = self.classifier(x, training=False)
        # Validation reports the clean loss and accuracy under every method.
        self.trackers["loss"].update_state(mean_over_batch(ce(logits, y)))
        self.accuracy.update_state(y, logits)
        return {"loss": self.trackers["loss"].result(), "accuracy": self.accuracy.result()}

    def _update_metrics(self, parts, y, logits):
        for name, value in parts.items():
            self.trackers[name].update_state(value)
        self.accuracy.update_state(y, logits)
        return {m.name: m.result() for m in self.metrics}
