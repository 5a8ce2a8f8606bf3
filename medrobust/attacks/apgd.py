"""Auto-PGD (APGD; Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"), the white-box core of AutoAttack, as a compiled tf.function.

Step-size free: every image starts with step 2 * eps, and at checkpoints w_j = ceil(p_j * steps)
(p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) its step is halved, and the
image sent back to its best point so far, when
  1. fewer than rho * (w_j - w_{j-1}) of the steps since the last checkpoint increased the loss, or
  2. its step was not halved at the last checkpoint and its best loss has not improved since.
Steps use momentum 0.75 (none on the first step). Each image's best loss and best (successful)
adversarial are tracked; restarts redraw a random start for the images not yet fooled.
The steps run in compiled chunks of about a second, so Ctrl-C stops within one, and images already
fooled are dropped from the batch between chunks (early stopping).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from medrobust.attacks.base import bind_logits, check_inputs, num_classes_of, per_image, run_steps
from medrobust.attacks.losses import cross_entropy, dlr
from medrobust.attacks.pgd import LossFn, ObjectiveFn, SuccessFn, _l2_norm, _project_np, loss_gradient, project

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
    x: float32 [n, h, w, c] in [0, 1]; y: int [n]; eps: scalar or one value per image, L-inf in (0, 1]
    or L2 in (0, sqrt(pixels)] (pixel scale). Returns a float32 tensor like x, always in the eps-ball and
    in [0, 1]. Bad input raises ValueError before any work. A model ending in a softmax is refused for
    'dlr' (it needs logits, as in IBM ART) and attacked through its log-probabilities, with a warning,
    for 'ce'. Compiled once per input shape; eps is a tensor argument (sweeps do not retrace).
    Returned image: a successful adversarial where one was found (over all steps and restarts),
    otherwise the point of highest loss reached. `run(x, y, eps, x_init=None)` also returns which
    images were fooled; `x_init` (projected into the ball) replaces the first restart's random start,
    e.g. the adversaries found at a smaller eps.

    - `restarts`: independent runs from fresh random starts; each only changes images not yet fooled.
    - `early_stop`: per image, an image stops moving once it is fooled (and is dropped from the batch
      at the next chunk); its returned adversarial is unchanged by this, it only saves compute.
    - `eot_iter`: gradients (and losses) averaged over that many evaluations, for randomised
      models/objectives (expectation over transformation); 1 for a deterministic model.
    - `loss_fn(logits, y)`: replaces the 'ce'/'dlr' loss. It only sees the classifier's logits, so it
      CANNOT express an objective that involves a detector or anything else outside the classifier.
      For adaptive attacks on a classifier+detector pair pass instead
      `objective_fn(x_adv, y) -> per-example loss` or `-> (loss, success)` (higher = more adversarial,
      differentiable w.r.t. x_adv; replaces `loss_fn(model(x_adv), y)`) and `success_fn(x_adv, y) ->
      bool per example` (replaces "misclassified by model": decides early stopping, restarts and which
      point is returned), e.g. success = misclassified & not flagged by the detector. Both must be
      traceable; returning success beside the loss saves a second forward pass per step.
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
        self.loss_name = loss if loss_fn is None else "custom"
        self.loss_fn = loss_fn if loss_fn is not None else LOSSES[loss]
        self.objective_fn, self.success_fn = objective_fn, success_fn
        self.checkpoints = checkpoints(steps)
        # is_check[k]: a checkpoint falls after k steps; check_len[k]: steps since the previous one.
        is_check, check_len, prev = [False] * (steps + 1), [1.0] * (steps + 1), 0
        for w in self.checkpoints:
            is_check[w], check_len[w], prev = True, float(w - prev), w
        self._is_check, self._check_len = is_check, check_len
        self.jit_compile = jit_compile
        self._logits = None  # set by each run, from the model's weights at that time
        self.inference = None  # medrobust.attacks.inference.ModelInference, made on the first run

    def _compile(self):
        self._start = tf.function(self._first_point, jit_compile=self.jit_compile, reduce_retracing=True)
        self._chunk = tf.function(self._steps, jit_compile=self.jit_compile, reduce_retracing=True)

    def __call__(self, x, y, eps, x_init=None) -> tf.Tensor:
        return tf.constant(self.run(x, y, eps, x_init)[0])

    def run(self, x, y, eps, x_init=None) -> tuple[np.ndarray, np.ndarray]:
        """(x_adv float32 numpy like x, fooled bool [n]): see the class docstring."""
        x, y, eps = check_inputs(x, y, eps, self.norm, num_classes_of(self.model), "APGD")
        if bind_logits(self, x[:64], f"APGD-{self.loss_name.upper()}", needs_logits=self.loss_name == "dlr"):
            self._compile()
        n = len(x)
        fooled = np.zeros(n, bool)
        best, x_max_all = x.copy(), x.copy()
        loss_max_all = np.full(n, -np.inf, np.float32)
        todo = np.arange(n)
        for restart in range(self.restarts):
            if not len(todo):
                break
            xs, ys, es = x[todo], y[todo], eps[todo]
            if restart == 0 and x_init is not None:
                start = _project_np(np.asarray(x_init, np.float32)[todo], xs, es, self.norm)
            else:
                start = self._random_start(xs, es)
            const = {"x": tf.constant(xs), "y": tf.constant(ys), "eps": tf.constant(es)}
            state = self._start(const, tf.constant(start))
            out = run_steps(self._chunk, const, state, self.steps, done="fooled" if self.early_stop else None)
            hit = out["fooled"]
            best[todo[hit]] = out["best"][hit]
            fooled[todo[hit]] = True
            better = out["loss_max"] > loss_max_all[todo]
            x_max_all[todo[better]] = out["x_max"][better]
            loss_max_all[todo[better]] = out["loss_max"][better]
            todo = todo[~hit]
        return np.where(fooled.reshape((-1,) + (1,) * (x.ndim - 1)), best, x_max_all), fooled

    # -- pieces ----------------------------------------------------------------------------------
    def _evaluate(self, x_adv, y):
        """(loss, gradient, success) at x_adv, loss and gradient averaged over eot_iter evaluations."""
        loss, grad, success = loss_gradient(self._logits, x_adv, y, self.loss_fn, self.objective_fn,
                                            self.success_fn)
        for _ in range(self.eot_iter - 1):
            l2, g2, success = loss_gradient(self._logits, x_adv, y, self.loss_fn, self.objective_fn,
                                            self.success_fn)
            loss, grad = loss + l2, grad + g2
        if self.eot_iter > 1:
            loss, grad = loss / self.eot_iter, grad / self.eot_iter
        return tf.cast(loss, tf.float32), grad, success

    def _direction(self, grad):
        return tf.sign(grad) if self.norm == "linf" else grad / _l2_norm(grad)

    def _random_start(self, x, eps):
        """As in the reference code: L-inf, a uniform draw rescaled so its largest entry is eps;
        L2, a uniform direction at radius eps. Clipped to [0, 1] (which stays in the ball)."""
        x = tf.constant(x)
        e = per_image(tf.constant(eps), x)
        if self.norm == "linf":
            t = tf.random.uniform(tf.shape(x), -1.0, 1.0)
            t = t / tf.reduce_max(tf.abs(t), axis=list(range(1, x.shape.rank)), keepdims=True)
        else:
            t = tf.random.normal(tf.shape(x))
            t = t / _l2_norm(t)
        return tf.clip_by_value(x + e * t, 0.0, 1.0).numpy()

    def _first_point(self, const, x_start):
        """The state of a run at its start point (step 0): loss, gradient and success evaluated there."""
        y, eps = const["y"], const["eps"]
        loss, grad, success = self._evaluate(x_start, y)
        return {"x_cur": x_start, "x_prev": x_start, "grad": grad, "loss_prev": loss, "loss_max": loss,
                "x_max": x_start, "grad_max": grad, "eta": 2.0 * eps, "count": tf.zeros_like(loss),
                "loss_max_last": loss, "halved_last": tf.ones(tf.shape(loss), tf.bool),  # reference code:
                # condition 2 is off at the first checkpoint
                "best": tf.where(per_image(success, x_start) > 0, x_start, const["x"]), "fooled": success}

    def _steps(self, const, state, k0, n):
        x, y = const["x"], const["y"]
        eps = per_image(const["eps"], x)
        is_check = tf.constant(self._is_check)
        check_len = tf.constant(self._check_len, tf.float32)
        img = lambda v: per_image(v, x) > 0  # noqa: E731  bool [b] -> broadcastable mask
        s = dict(state)
        for i in tf.range(n):
            if self.early_stop and tf.reduce_all(s["fooled"]):
                break
            k = k0 + i
            x_cur, eta, fooled = s["x_cur"], per_image(s["eta"], x), s["fooled"]
            a = tf.where(k == 0, 1.0, self.momentum)
            z = project(x_cur + eta * self._direction(s["grad"]), x, eps, self.norm)
            x_new = project(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - s["x_prev"]), x, eps, self.norm)
            x_new = tf.where(img(fooled), x_cur, x_new)  # fooled images stay put
            loss_new, grad_new, success = self._evaluate(x_new, y)
            best = tf.where(img(success & ~fooled), x_new, s["best"])
            fooled = fooled | success
            count = s["count"] + tf.cast(loss_new > s["loss_prev"], tf.float32)
            better = loss_new > s["loss_max"]
            x_max = tf.where(img(better), x_new, s["x_max"])
            grad_max = tf.where(img(better), grad_new, s["grad_max"])
            loss_max = tf.where(better, loss_new, s["loss_max"])

            at_check = tf.gather(is_check, k + 1)
            halve = at_check & ((count < self.rho * tf.gather(check_len, k + 1))
                                | (~s["halved_last"] & (loss_max <= s["loss_max_last"])))
            s = {"x_prev": x_cur, "x_cur": tf.where(img(halve), x_max, x_new),
                 "grad": tf.where(img(halve), grad_max, grad_new), "loss_prev": loss_new,
                 "loss_max": loss_max, "x_max": x_max, "grad_max": grad_max,
                 "eta": tf.where(halve, s["eta"] / 2.0, s["eta"]),
                 "count": tf.where(at_check, tf.zeros_like(count), count),
                 "halved_last": tf.where(at_check, halve, s["halved_last"]),
                 "loss_max_last": tf.where(at_check, loss_max, s["loss_max_last"]),
                 "best": best, "fooled": fooled}
        return s
