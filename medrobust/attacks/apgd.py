"""Auto-PGD (APGD; Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"), the white-box core of AutoAttack, as a compiled tf.function.

Step-size free: every image starts with step 2 * eps, and at checkpoints w_j = ceil(p_j * steps)
(p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) its step is halved, and the
image sent back to its best point so far, when
  1. fewer than rho * (w_j - w_{j-1}) of the steps since the last checkpoint increased the loss, or
  2. its step was not halved at the last checkpoint and its best loss has not improved since.
Steps use momentum 0.75 (none on the first step). Each image's best loss and best (successful)
adversarial are tracked; restarts redraw a random start for the images not yet fooled.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from medrobust.attacks.losses import cross_entropy, dlr
from medrobust.attacks.pgd import LossFn, ObjectiveFn, SuccessFn, _l2_norm, _per_image, loss_gradient, project

LOSSES = {"ce": cross_entropy, "dlr": dlr}


def checkpoints(steps: int, p1: float = 0.22, decrease: float = 0.03, min_length: float = 0.06) -> list[int]:
    """Iteration counts w_j = ceil(p_j * steps) after which the step size is reconsidered (w_0 = 0 excluded,
    duplicates dropped)."""
    p = [0.0, p1]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - decrease, min_length)
        if nxt > 1:
            break
        p.append(nxt)
    return sorted({min(steps, math.ceil(round(q * steps, 9))) for q in p[1:]} - {0})


class APGD:
    """Auto-PGD, L-inf or L2, on the cross-entropy ('ce') or difference-of-logits-ratio ('dlr') loss.

    attack = APGD(model, steps=100, loss="dlr"); x_adv = attack(x, y, eps=0.01)
    eps is in [0, 1] pixel scale, a scalar or one value per image; outputs always lie in the eps-ball
    and in [0, 1]. Compiled once per input shape; eps is a tensor argument (sweeps do not retrace).
    Returned image: a successful adversarial where one was found (over all steps and restarts),
    otherwise the point of highest loss reached.

    - `restarts`: independent runs from fresh random starts; each only changes images not yet fooled.
    - `early_stop`: per image, an image stops moving once it is fooled, and a run ends once the
      whole batch is fooled (its returned adversarial is unchanged by this; it only saves compute).
    - `eot_iter`: gradients (and losses) averaged over that many evaluations, for randomised
      models/objectives (expectation over transformation); 1 for a deterministic model.
    - `loss_fn(logits, y)`: replaces the 'ce'/'dlr' loss. It only sees the classifier's logits, so it
      CANNOT express an objective that involves a detector or anything else outside the classifier.
      For adaptive attacks on a classifier+detector pair pass instead
      `objective_fn(x_adv, y) -> per-example loss` (higher = more adversarial, differentiable w.r.t.
      x_adv; replaces `loss_fn(model(x_adv), y)`) and `success_fn(x_adv, y) -> bool per example`
      (replaces "misclassified by model": decides early stopping, restarts and which point is
      returned), e.g. success = misclassified & not flagged by the detector. Both must be traceable.
    - `jit_compile=True` (XLA): on CPU it was several times slower than the default graph; use it on GPU.
    """

    def __init__(self, model: keras.Model, steps: int = 100, loss: str = "ce", norm: str = "linf",
                 restarts: int = 1, rho: float = 0.75, eot_iter: int = 1, loss_fn: LossFn | None = None,
                 jit_compile: bool = False, objective_fn: ObjectiveFn | None = None,
                 success_fn: SuccessFn | None = None, early_stop: bool = True, momentum: float = 0.75):
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if loss_fn is None and loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if steps < 1 or restarts < 1 or eot_iter < 1:
            raise ValueError("steps, restarts and eot_iter must be >= 1")
        self.model, self.steps, self.norm, self.restarts = model, steps, norm, restarts
        self.rho, self.eot_iter, self.early_stop, self.momentum = rho, eot_iter, early_stop, momentum
        self.loss_fn = loss_fn if loss_fn is not None else LOSSES[loss]
        self.objective_fn, self.success_fn = objective_fn, success_fn
        self.checkpoints = checkpoints(steps)
        # is_check[k]: a checkpoint falls after k steps; check_len[k]: steps since the previous one.
        is_check, check_len, prev = [False] * (steps + 1), [1.0] * (steps + 1), 0
        for w in self.checkpoints:
            is_check[w], check_len[w], prev = True, float(w - prev), w
        self._is_check, self._check_len = is_check, check_len
        self._run = tf.function(self._attack, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, x, y, eps) -> tf.Tensor:
        x = tf.convert_to_tensor(x, tf.float32)
        # eps always as one value per image: scalar and per-image eps share one compiled graph.
        eps = tf.broadcast_to(tf.reshape(tf.convert_to_tensor(eps, tf.float32), [-1]), tf.shape(x)[:1])
        return self._run(x, tf.cast(y, tf.int32), eps)

    # -- pieces ----------------------------------------------------------------------------------
    def _evaluate(self, x_adv, y):
        """(loss, gradient, success) at x_adv, loss and gradient averaged over eot_iter evaluations."""
        loss, grad, success = loss_gradient(self.model, x_adv, y, self.loss_fn, self.objective_fn, self.success_fn)
        for _ in range(self.eot_iter - 1):
            l2, g2, success = loss_gradient(self.model, x_adv, y, self.loss_fn, self.objective_fn, self.success_fn)
            loss, grad = loss + l2, grad + g2
        if self.eot_iter > 1:
            loss, grad = loss / self.eot_iter, grad / self.eot_iter
        return tf.cast(loss, tf.float32), grad, success

    def _direction(self, grad):
        return tf.sign(grad) if self.norm == "linf" else grad / _l2_norm(grad)

    def _random_start(self, x, eps):
        """As in the reference code: L-inf, a uniform draw rescaled so its largest entry is eps;
        L2, a uniform direction at radius eps. Clipped to [0, 1] (which stays in the ball)."""
        if self.norm == "linf":
            t = tf.random.uniform(tf.shape(x), -1.0, 1.0)
            t = t / tf.reduce_max(tf.abs(t), axis=list(range(1, x.shape.rank)), keepdims=True)
        else:
            t = tf.random.normal(tf.shape(x))
            t = t / _l2_norm(t)
        return tf.clip_by_value(x + eps * t, 0.0, 1.0)

    def _one_run(self, x, y, eps, fooled, x_adv_best, loss_max_all, x_max_all):
        is_check = tf.constant(self._is_check)
        check_len = tf.constant(self._check_len, tf.float32)
        img = lambda v: _per_image(v, x) > 0  # noqa: E731  bool [b] -> broadcastable mask

        x_cur = self._random_start(x, eps)
        loss, grad, success = self._evaluate(x_cur, y)
        x_adv_best = tf.where(img(success), x_cur, x_adv_best)
        fooled = fooled | success
        eta = 2.0 * eps * tf.ones_like(eps)
        x_prev = x_cur
        loss_prev, loss_max, x_max, grad_max = loss, loss, x_cur, grad
        count = tf.zeros_like(loss)  # loss increases since the last checkpoint
        loss_max_last = loss_max  # best loss at the last checkpoint
        halved_last = tf.ones(tf.shape(loss), tf.bool)  # reference code: condition 2 off at the first check

        for k in tf.range(self.steps):
            if self.early_stop and tf.reduce_all(fooled):
                break
            a = tf.where(k == 0, 1.0, self.momentum)
            z = project(x_cur + eta * self._direction(grad), x, eps, self.norm)
            x_new = project(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - x_prev), x, eps, self.norm)
            if self.early_stop:
                x_new = tf.where(img(fooled), x_cur, x_new)
            loss_new, grad_new, success = self._evaluate(x_new, y)
            x_adv_best = tf.where(img(success), x_new, x_adv_best)
            fooled = fooled | success
            count += tf.cast(loss_new > loss_prev, tf.float32)
            better = loss_new > loss_max
            x_max = tf.where(img(better), x_new, x_max)
            grad_max = tf.where(img(better), grad_new, grad_max)
            loss_max = tf.where(better, loss_new, loss_max)
            x_prev, x_cur, grad, loss_prev = x_cur, x_new, grad_new, loss_new

            at_check = is_check[k + 1]
            halve = at_check & ((count < self.rho * check_len[k + 1]) | (~halved_last & (loss_max <= loss_max_last)))
            eta = tf.where(img(halve), eta / 2.0, eta)
            x_cur = tf.where(img(halve), x_max, x_cur)
            grad = tf.where(img(halve), grad_max, grad)
            count = tf.where(at_check, tf.zeros_like(count), count)
            halved_last = tf.where(at_check, halve, halved_last)
            loss_max_last = tf.where(at_check, loss_max, loss_max_last)

        better = loss_max > loss_max_all
        x_max_all = tf.where(img(better), x_max, x_max_all)
        loss_max_all = tf.where(better, loss_max, loss_max_all)
        return fooled, x_adv_best, loss_max_all, x_max_all

    def _attack(self, x, y, eps):
        eps = _per_image(eps, x)
        fooled = tf.zeros(tf.shape(x)[:1], tf.bool)
        loss_max_all = tf.fill(tf.shape(x)[:1], float("-inf"))
        x_adv_best, x_max_all = x, x
        for _ in tf.range(self.restarts):  # a graph loop: the run is traced once, whatever the restarts
            fooled, x_adv_best, loss_max_all, x_max_all = self._one_run(
                x, y, eps, fooled, x_adv_best, loss_max_all, x_max_all)
        return tf.where(_per_image(fooled, x) > 0, x_adv_best, x_max_all)
