"""The Keras train-step skeleton shared by every training method.

A Trainer wraps a classifier (image -> logits) and overrides `train_step`:
  1. `prepare(x, y, x_u)` runs outside the gradient tape, in inference mode: adversaries,
     pseudo-labels, anything the update treats as constant;
  2. `objective(x, y, prepared)` runs inside the tape in training mode and returns the loss parts.
Losses are per-replica means scaled by 1/num_replicas, because Keras sums gradients across
replicas; the Mean trackers record the unscaled values, so logs read the same on any strategy.

Class balance: with `class_weights` (one weight per class, e.g. `balanced_class_weights`), every
labeled per-example term becomes a weighted mean over the GLOBAL batch, sum(w_i * l_i) / sum(w_i),
the sum of weights all-reduced across replicas (as torch's CrossEntropyLoss(weight=...) does on one
device). The weight of an example is that of its true class; pseudo-labeled images stay unweighted unless
SSAT's pseudo_class_weight gives them their pseudo-label's.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def mean_over_batch(per_example: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(per_example)


def balanced_class_weights(y, num_classes: int) -> list[float]:
    """n / (num_classes * n_c) per class c (sklearn's "balanced" heuristic, King & Zeng 2001): every class
    contributes equally to the loss, and (all classes present) the weights average 1 over the training
    examples. A class absent from y gets weight 0. Raises ValueError if y is empty or holds labels outside [0, num_classes)."""
    y = np.asarray(y).reshape(-1)
    if y.size == 0 or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"need labels in [0, {num_classes}), got {y.size} labels")
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.divide(len(y), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return [round(float(w), 6) for w in weights]


def ce(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Per-example cross-entropy on logits."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits)


class Trainer(keras.Model):
    """Base class: plain cross-entropy on the labeled batch ("standard" training)."""

    method = "standard"
    loss_parts: tuple[str, ...] = ("loss",)

    def __init__(self, classifier: keras.Model, class_weights=None, **kwargs):
        """class_weights: None (plain means) or one non-negative weight per class (see the module doc)."""
        super().__init__(name=f"{self.method}_trainer", **kwargs)
        self.classifier = classifier
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != classifier.output_shape[-1] or min(class_weights) < 0 or max(class_weights) <= 0:
                raise ValueError(f"class_weights needs {classifier.output_shape[-1]} non-negative values, "
                                 f"not all 0; got {class_weights}")
        self.class_weights = class_weights
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.loss_parts}
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, x, training=False):
        if isinstance(x, (tuple, list)):  # (x, x_u) training inputs: Keras builds the model on them
            x = x[0]
        return self.classifier(x, training=training)

    @property
    def metrics(self):
        return [*self.trackers.values(), self.accuracy]

    def example_weights(self, y) -> tf.Tensor:
        """float32 [batch]: the class weight of each true label (ones without class_weights)."""
        if self.class_weights is None:
            return tf.ones(tf.shape(y), tf.float32)
        return tf.gather(tf.constant(self.class_weights, tf.float32), tf.cast(y, tf.int32))

    def labeled_mean(self, per_example: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """The mean of a per-example term of the labeled batch: plain, or class-weighted over the global
        batch (this replica's weighted sum times the replica count, which train_step divides out)."""
        if self.class_weights is None:
            return mean_over_batch(per_example)
        w = self.example_weights(y)
        total = tf.reduce_sum(w)
        context = tf.distribute.get_replica_context()
        if context is not None:  # None only when called by hand in a cross-replica context
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, total)
        replicas = tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, tf.float32)
        return tf.math.divide_no_nan(tf.reduce_sum(w * per_example) * replicas, total)

    # -- the two hooks subclasses override -------------------------------------------------------
    def prepare(self, x, y, x_u) -> dict:
        return {}

    def objective(self, x, y, prepared: dict) -> tuple[dict, tf.Tensor]:
        """Loss parts (each a batch mean, 'loss' is the total) and the clean logits of x."""
        logits = self.classifier(x, training=True)
        return {"loss": self.labeled_mean(ce(logits, y), y)}, logits

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
