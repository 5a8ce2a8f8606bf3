"""FGSM and PGD (L-inf and L2) on any Keras logits model, compiled, run in short chunks.

eps is in [0, 1] pixel scale and may be a scalar or one value per image; outputs always lie in the
eps-ball around x and in [0, 1]. The model runs in inference mode (training=False).
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from medrobust.attacks.base import (as_logits_fn, batched, bind_logits, check_inputs, num_classes_of, per_image,
                                    run_steps)
from medrobust.attacks.losses import cross_entropy, dlr, misclassified

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (logits, y) -> per-example loss to maximise
# (x_adv, y) -> per-example loss to maximise, differentiable w.r.t. x_adv; sees the whole input, not only the
# classifier's logits, so it can include e.g. a detector's score (adaptive attacks). It may instead return
# (loss, success): success (bool per example) then comes from the same forward pass, and success_fn is
# only used on the final iterate.
ObjectiveFn = Callable[[tf.Tensor, tf.Tensor], "tf.Tensor | tuple[tf.Tensor, tf.Tensor]"]
SuccessFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (x_adv, y) -> bool per example: attack succeeded

_per_image = per_image  # kept for modules that import it from here


def _l2_norm(v: tf.Tensor) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=list(range(1, v.shape.rank)), keepdims=True) + 1e-12)


def loss_gradient(logits_of, x_adv: tf.Tensor, y: tf.Tensor, loss_fn: LossFn,
                  objective_fn: ObjectiveFn | None = None, success_fn: SuccessFn | None = None):
    """(per-example loss, its gradient w.r.t. x_adv, per-example success) at x_adv, from one forward pass
    where possible.

    logits_of(x) -> logits (a Keras model is called with training=False). The loss is
    `objective_fn(x_adv, y)` if given, else `loss_fn(logits_of(x_adv), y)`; success is what objective_fn
    returned beside the loss, else `success_fn(x_adv, y)`, else misclassification.
    """
    call = as_logits_fn(logits_of)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(x_adv)
        success = None
        if objective_fn is None:
            logits = call(x_adv)
            loss = loss_fn(logits, y)
        else:
            loss = objective_fn(x_adv, y)
            if isinstance(loss, (tuple, list)):
                loss, success = loss
    grad = tape.gradient(loss, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if success is not None:
        success = tf.cast(success, tf.bool)
    elif success_fn is not None or objective_fn is not None:
        success = is_adversarial(call, x_adv, y, success_fn)
    else:
        success = misclassified(logits, y)
    return loss, grad, success


def is_adversarial(logits_of, x_adv: tf.Tensor, y: tf.Tensor, success_fn: SuccessFn | None = None):
    """Per-example success: `success_fn(x_adv, y)` if given, else misclassification."""
    if success_fn is not None:
        return tf.cast(success_fn(x_adv, y), tf.bool)
    return misclassified(as_logits_fn(logits_of)(x_adv), y)


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
    x: float32 [n, h, w, c] in [0, 1]; y: int [n]; eps: scalar or [n], L-inf in (0, 1] or L2 in
    (0, sqrt(pixels)]. Returns a float32 tensor like x. Bad input (pixels outside [0, 1], eps <= 0 or
    > 1, labels out of range) raises ValueError before any work. A model ending in a softmax is attacked
    through its log-probabilities with a warning (cross-entropy) or refused (DLR loss).
    `run(x, y, eps, x_init=None)` also returns which images were fooled; `x_init` (inside the ball)
    replaces the random start of the first restart, e.g. the adversaries found at a smaller eps.

    Compiled once per input shape; eps is a tensor argument, so a sweep does not retrace. The steps
    run in chunks of about a second (Ctrl-C stops within one); with `early_stop` an image stops
    moving once fooled and is dropped from the batch at the next chunk. With restarts > 1 each
    restart only works on the images not yet fooled.

    Adaptive attacks: `loss_fn(logits, y)` only sees the classifier's logits, so it cannot express an
    objective involving anything else (e.g. an adversarial-example detector). For that, pass
    `objective_fn(x_adv, y) -> per-example loss` (or `-> (loss, success)`, success then comes from the
    same forward pass) and `success_fn(x_adv, y) -> bool per example` (it replaces "misclassified by
    model" for early stopping, restarts and which iterate is returned). Both must be traceable.
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
        self.jit_compile = jit_compile
        self._logits = None  # set by each run, from the model's weights at that time
        self.inference = None  # medrobust.attacks.inference.ModelInference, made on the first run

    def _compile(self):
        self._chunk = tf.function(self._steps, jit_compile=self.jit_compile, reduce_retracing=True)
        self._final = tf.function(lambda v, t: is_adversarial(self._logits, v, t, self.success_fn),
                                  reduce_retracing=True)

    def __call__(self, x, y, eps, x_init=None) -> tf.Tensor:
        return tf.constant(self.run(x, y, eps, x_init)[0])

    def run(self, x, y, eps, x_init=None) -> tuple[np.ndarray, np.ndarray]:
        """(x_adv float32 numpy like x, fooled bool [n]): see the class docstring."""
        x, y, eps = check_inputs(x, y, eps, self.norm, num_classes_of(self.model), "PGD")
        self._prepare(x)
        n = len(x)
        best, last, fooled = x.copy(), x.copy(), np.zeros(n, bool)
        todo = np.arange(n)
        for restart in range(self.restarts):
            if not len(todo):
                break
            xs, ys, es = x[todo], y[todo], eps[todo]
            if restart == 0 and x_init is not None:
                start = _project_np(np.asarray(x_init, np.float32)[todo], xs, es, self.norm)
            elif self.random_start:
                start = self._random_start(xs, es)
            else:
                start = xs
            state = {"x_adv": start, "best": xs, "fooled": np.zeros(len(todo), bool)}
            out = run_steps(self._chunk, {"x": xs, "y": ys, "eps": es}, state, self.steps,
                            done="fooled" if self.early_stop else None)
            # The last iterate was never checked (steps check the point they start from).
            newly = ~out["fooled"] & batched(self._final, (out["x_adv"], ys))
            out["best"][newly] = out["x_adv"][newly]
            hit = out["fooled"] | newly
            best[todo[hit]] = out["best"][hit]
            last[todo] = out["x_adv"]
            fooled[todo[hit]] = True
            todo = todo[~hit]
        # Images never fooled return the last iterate (highest loss reached), not the clean image.
        return np.where(fooled.reshape((-1,) + (1,) * (x.ndim - 1)), best, last), fooled

    def _prepare(self, x):
        if bind_logits(self, x[:64], "PGD", needs_logits=self.loss_fn is dlr, stacklevel=4):
            self._compile()

    def _random_start(self, x, eps):
        x = tf.constant(x)
        e = per_image(tf.constant(eps), x)
        if self.norm == "linf":
            delta = tf.random.uniform(tf.shape(x), -1.0, 1.0) * e
        else:
            direction = tf.random.normal(tf.shape(x))
            radius = tf.random.uniform(tf.shape(x)[:1]) ** (1.0 / float(np.prod(x.shape[1:])))
            delta = direction / _l2_norm(direction) * per_image(radius, x) * e
        return tf.clip_by_value(x + delta, 0.0, 1.0).numpy()

    def _steps(self, const, state, k0, n):
        x, y = const["x"], const["y"]
        eps = per_image(const["eps"], x)
        alpha = eps * self.rel_step
        x_adv, best, fooled = state["x_adv"], state["best"], state["fooled"]
        for _ in tf.range(n):
            if self.early_stop and tf.reduce_all(fooled):
                break
            _, grad, success = loss_gradient(self._logits, x_adv, y, self.loss_fn, self.objective_fn,
                                             self.success_fn)
            newly = success & ~fooled
            best = tf.where(per_image(newly, x) > 0, x_adv, best)
            fooled = fooled | newly
            step = tf.sign(grad) if self.norm == "linf" else grad / _l2_norm(grad)
            # Images already fooled stay put; the rest take a step and are projected back.
            x_adv = tf.where(per_image(~fooled, x) > 0, project(x_adv + alpha * step, x, eps, self.norm), x_adv)
        return {"x_adv": x_adv, "best": best, "fooled": fooled}


def _project_np(x_start: np.ndarray, x: np.ndarray, eps: np.ndarray, norm: str) -> np.ndarray:
    if x_start.shape != x.shape:
        raise ValueError(f"x_init must have the shape of x {x.shape}, got {x_start.shape}")
    e = tf.reshape(tf.constant(eps), [-1] + [1] * (x.ndim - 1))
    return project(tf.constant(x_start), tf.constant(x), e, norm).numpy()


def fgsm(model: keras.Model, loss_fn: LossFn = cross_entropy, jit_compile: bool = False) -> PGD:
    """Fast gradient sign method (Goodfellow et al. 2015): one signed-gradient step of size eps."""
    return PGD(model, steps=1, step_size=1.0, random_start=False, early_stop=False, loss_fn=loss_fn,
               jit_compile=jit_compile)
