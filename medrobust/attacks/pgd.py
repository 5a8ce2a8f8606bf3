"""FGSM and PGD (L-inf and L2) as compiled tf.functions that work on any Keras logits model.

eps is in [0, 1] pixel scale and may be a scalar or one value per image; outputs always lie in the
eps-ball around x and in [0, 1]. The model runs in inference mode (training=False).
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from medrobust.attacks.losses import cross_entropy, misclassified

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (logits, y) -> per-example loss to maximise
# (x_adv, y) -> per-example loss to maximise, differentiable w.r.t. x_adv; sees the whole input, not only the
# classifier's logits, so it can include e.g. a detector's score (adaptive attacks).
ObjectiveFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
SuccessFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (x_adv, y) -> bool per example: attack succeeded


def _per_image(v: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Broadcast a scalar or [batch] value to x's rank."""
    v = tf.cast(v, x.dtype)
    v = tf.broadcast_to(v, tf.shape(x)[:1]) if v.shape.rank == 0 else v
    return tf.reshape(v, [-1] + [1] * (x.shape.rank - 1))


def _l2_norm(v: tf.Tensor) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=list(range(1, v.shape.rank)), keepdims=True) + 1e-12)


def loss_gradient(model: keras.Model, x_adv: tf.Tensor, y: tf.Tensor, loss_fn: LossFn,
                  objective_fn: ObjectiveFn | None = None, success_fn: SuccessFn | None = None):
    """(per-example loss, its gradient w.r.t. x_adv, per-example success) at x_adv.

    The loss is `objective_fn(x_adv, y)` if given, else `loss_fn(model(x_adv), y)`; success is
    `success_fn(x_adv, y)` if given, else misclassification by the model.
    """
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        if objective_fn is None:
            logits = model(x_adv, training=False)
            loss = loss_fn(logits, y)
        else:
            loss = objective_fn(x_adv, y)
    grad = tape.gradient(loss, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if success_fn is not None or objective_fn is not None:
        success = is_adversarial(model, x_adv, y, success_fn)
    else:
        success = misclassified(logits, y)
    return loss, grad, success


def is_adversarial(model: keras.Model, x_adv: tf.Tensor, y: tf.Tensor, success_fn: SuccessFn | None = None):
    """Per-example success: `success_fn(x_adv, y)` if given, else misclassification by the model."""
    if success_fn is not None:
        return tf.cast(success_fn(x_adv, y), tf.bool)
    return misclassified(model(x_adv, training=False), y)


def project(x_adv: tf.Tensor, x: tf.Tensor, eps: tf.Tensor, norm: str) -> tf.Tensor:
    """Project onto the eps-ball around x (eps already broadcast) intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        delta = delta * tf.minimum(1.0, eps / _l2_norm(delta))
    return tf.clip_by_value(x + delta, 0.0, 1.0)


class PGD:
    """Projected gradient descent (Madry et al. 2018); FGSM is PGD with one step of size eps, no random start.

    attack = PGD(model, steps=10); x_adv = attack(x, y, eps=0.004)
    The compiled graph is built once per input shape; eps is a tensor argument, so a sweep over eps
    does not retrace. With restarts > 1 each restart only works on the images not yet fooled, and
    `early_stop` ends a run once every image in the batch is misclassified.

    Adaptive attacks: `loss_fn(logits, y)` only sees the classifier's logits, so it cannot express an
    objective involving anything else (e.g. an adversarial-example detector). For that, pass
    `objective_fn(x_adv, y) -> per-example loss` (differentiable w.r.t. x_adv; it replaces
    `loss_fn(model(x_adv), y)`) and `success_fn(x_adv, y) -> bool per example` (it replaces
    "misclassified by model" for early stopping, restarts and which iterate is returned).
    Both must be traceable TensorFlow code.
    """

    def __init__(self, model: keras.Model, steps: int = 10, step_size: float | None = None, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, early_stop: bool = True,
                 loss_fn: LossFn = cross_entropy, jit_compile: bool = False,
                 objective_fn: ObjectiveFn | None = None, success_fn: SuccessFn | None = None):
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if steps < 1 or restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        self.model, self.steps, self.norm = model, steps, norm
        # Relative step: alpha = step_size * eps (Madry: 2.5 eps / steps).
        self.rel_step = step_size if step_size is not None else (1.0 if steps == 1 else 2.5 / steps)
        self.random_start, self.restarts, self.early_stop = random_start, restarts, early_stop
        self.loss_fn, self.objective_fn, self.success_fn = loss_fn, objective_fn, success_fn
        self._run = tf.function(self._attack, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, x, y, eps) -> tf.Tensor:
        x = tf.convert_to_tensor(x, tf.float32)
        return self._run(x, tf.cast(y, tf.int32), tf.convert_to_tensor(eps, tf.float32))

    def _gradient(self, x_adv, y):
        """Gradient of the summed per-example objective, and which images are already adversarial."""
        _, grad, success = loss_gradient(self.model, x_adv, y, self.loss_fn, self.objective_fn, self.success_fn)
        return grad, success

    def _random_start(self, x, eps):
        if self.norm == "linf":
            delta = tf.random.uniform(tf.shape(x), -1.0, 1.0) * eps
        else:
            direction = tf.random.normal(tf.shape(x))
            radius = tf.random.uniform(tf.shape(x)[:1]) ** (1.0 / tf.cast(tf.reduce_prod(tf.shape(x)[1:]), tf.float32))
            delta = direction / _l2_norm(direction) * _per_image(radius, x) * eps
        return tf.clip_by_value(x + delta, 0.0, 1.0)

    def _one_run(self, x, y, eps, best, fooled):
        alpha = eps * self.rel_step
        x_adv = self._random_start(x, eps) if self.random_start else x
        for _ in tf.range(self.steps):
            grad, success = self._gradient(x_adv, y)
            newly = success & ~fooled
            best = tf.where(_per_image(newly, x) > 0, x_adv, best)
            fooled = fooled | newly
            if self.early_stop and tf.reduce_all(fooled):
                break
            step = tf.sign(grad) if self.norm == "linf" else grad / _l2_norm(grad)
            # Images already fooled stay put; the rest take a step and are projected back.
            moving = _per_image(~fooled, x)
            x_adv = tf.where(moving > 0, project(x_adv + alpha * step, x, eps, self.norm), x_adv)
        newly = is_adversarial(self.model, x_adv, y, self.success_fn) & ~fooled
        best = tf.where(_per_image(newly, x) > 0, x_adv, best)
        return best, fooled | newly, x_adv

    def _attack(self, x, y, eps):
        eps = _per_image(eps, x)
        fooled = tf.zeros(tf.shape(x)[:1], tf.bool)
        best = x
        last = x
        for _ in range(self.restarts):
            best, fooled, last = self._one_run(x, y, eps, best, fooled)
        # Images never fooled return the last iterate (highest loss reached), not the clean image.
        return tf.where(_per_image(fooled, x) > 0, best, last)


def fgsm(model: keras.Model, loss_fn: LossFn = cross_entropy, jit_compile: bool = False) -> PGD:
    """Fast gradient sign method (Goodfellow et al. 2015): one signed-gradient step of size eps."""
    return PGD(model, steps=1, step_size=1.0, random_start=False, early_stop=False, loss_fn=loss_fn,
               jit_compile=jit_compile)
