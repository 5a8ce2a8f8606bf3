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


def _per_image(v: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Broadcast a scalar or [batch] value to x's rank."""
    v = tf.cast(v, x.dtype)
    v = tf.broadcast_to(v, tf.shape(x)[:1]) if v.shape.rank == 0 else v
    return tf.reshape(v, [-1] + [1] * (x.shape.rank - 1))


def _l2_norm(v: tf.Tensor) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=list(range(1, v.shape.rank)), keepdims=True) + 1e-12)


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
    """

    def __init__(self, model: keras.Model, steps: int = 10, step_size: float | None = None, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, early_stop: bool = True,
                 loss_fn: LossFn = cross_entropy, jit_compile: bool = False):
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if steps < 1 or restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        self.model, self.steps, self.norm = model, steps, norm
        # Relative step: alpha = step_size * eps (Madry: 2.5 eps / steps).
        self.rel_step = step_size if step_size is not None else (1.0 if steps == 1 else 2.5 / steps)
        self.random_start, self.restarts, self.early_stop = random_start, restarts, early_stop
        self.loss_fn = loss_fn
        self._run = tf.function(self._attack, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, x, y, eps) -> tf.Tensor:
        x = tf.convert_to_tensor(x, tf.float32)
        return self._run(x, tf.cast(y, tf.int32), tf.convert_to_tensor(eps, tf.float32))

    def _gradient(self, x_adv, y):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = self.model(x_adv, training=False)
            loss = self.loss_fn(logits, y)
        return tape.gradient(loss, x_adv), logits

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
            grad, logits = self._gradient(x_adv, y)
            newly = misclassified(logits, y) & ~fooled
            best = tf.where(_per_image(newly, x) > 0, x_adv, best)
            fooled = fooled | newly
            if self.early_stop and tf.reduce_all(fooled):
                break
            step = tf.sign(grad) if self.norm == "linf" else grad / _l2_norm(grad)
            # Images already fooled stay put; the rest take a step and are projected back.
            moving = _per_image(~fooled, x)
            x_adv = tf.where(moving > 0, project(x_adv + alpha * step, x, eps, self.norm), x_adv)
        logits = self.model(x_adv, training=False)
        newly = misclassified(logits, y) & ~fooled
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
