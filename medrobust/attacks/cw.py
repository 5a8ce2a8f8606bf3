"""Carlini-Wagner L2 attack (Carlini & Wagner 2017, "Towards evaluating the robustness of neural
networks"), untargeted, compiled and run in chunks of steps (Ctrl-C stops within about a second).

It searches for the SMALLEST L2 perturbation that changes the prediction: it optimises
w in tanh space, x_adv = (tanh(w) + 1) / 2 (so x_adv is always in [0, 1]), minimising
    ||x_adv - x||_2^2 + c * max(z_y - max_{j != y} z_j + confidence, 0)
with Adam, and binary-searches the constant c per image (c halves the gap towards the last
failure after a success, and grows 10x while nothing succeeded).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from medrobust.attacks.base import bind_logits, check_inputs, num_classes_of, per_image, run_steps
from medrobust.attacks.pgd import _project_np

_NO_UPPER = 1e10


class CarliniWagnerL2:
    """attack = CarliniWagnerL2(model); x_adv = attack(x, y)            # minimal perturbation, unbounded
                                        x_adv = attack(x, y, eps=0.5)   # same, projected onto the L2 ball

    x: float32 [n, h, w, c] in [0, 1]; y: int [n]. Returns, per image, the successful adversarial with
    the smallest L2 distance found over all binary-search steps and iterations; for images never
    fooled, the last iterate. With `eps` (scalar or one per image, an L2 norm in pixel units, in
    (0, sqrt(pixels)]) that result is projected onto the L2 eps-ball around x (intersected with
    [0, 1]), so an image whose minimal adversarial lies farther than eps is usually no longer fooled:
    C&W is a minimal-perturbation L2 attack, not an eps-bounded one (and not an L-inf attack: report
    it under the L2 norm); at a fixed eps PGD-L2/APGD-L2 are the stronger choice.
    `find(x, y)` returns (x_adv, success, l2) as numpy arrays, without projection.
    The model runs with training=False; a model ending in a softmax is refused (C&W needs logits).
    """

    def __init__(self, model: keras.Model, steps: int = 100, binary_search_steps: int = 5, lr: float = 0.01,
                 confidence: float = 0.0, initial_const: float = 1.0, jit_compile: bool = False):
        if steps < 1 or binary_search_steps < 1:
            raise ValueError("steps and binary_search_steps must be >= 1")
        self.model, self.steps, self.binary_search_steps = model, steps, binary_search_steps
        self.lr, self.confidence, self.initial_const = lr, confidence, initial_const
        self.jit_compile = jit_compile
        self._logits = None  # set by each call, from the model's weights at that time
        self.inference = None  # medrobust.attacks.inference.ModelInference, made on the first run

    def __call__(self, x, y, eps=None) -> tf.Tensor:
        x_adv, _, _ = self.find(x, y)
        if eps is None:
            return tf.constant(x_adv)
        x, _, eps = check_inputs(x, y, eps, "l2", None, "CarliniWagnerL2")
        return tf.constant(_project_np(x_adv, x, eps, "l2"))

    def find(self, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x_adv, success [bool per image], L2 distance of x_adv per image), unbounded."""
        x, y, _ = check_inputs(x, y, None, None, num_classes_of(self.model), "CarliniWagnerL2")
        if bind_logits(self, x[:64], "CarliniWagnerL2", needs_logits=True):
            self._chunk = tf.function(self._adam_steps, jit_compile=self.jit_compile, reduce_retracing=True)
            self._check = tf.function(self._check_point, reduce_retracing=True)
        n = len(x)
        axes = tuple(range(1, x.ndim))
        w0 = np.arctanh(np.clip(2.0 * x - 1.0, -1.0, 1.0) * (1.0 - 1e-6)).astype(np.float32)
        lower, upper = np.zeros(n, np.float32), np.full(n, _NO_UPPER, np.float32)
        const = np.full(n, float(self.initial_const), np.float32)
        best_l2, best_adv, last = np.full(n, np.inf, np.float32), x.copy(), x.copy()
        for _ in range(self.binary_search_steps):
            fixed = {"x": x, "y": y, "const": const}
            state = {"w": w0, "m": np.zeros_like(w0), "v": np.zeros_like(w0), "best_l2": best_l2,
                     "best_adv": best_adv, "ok": np.zeros(n, bool)}  # ok: succeeded once with this const
            out = run_steps(self._chunk, fixed, state, self.steps)
            last = ((np.tanh(out["w"]) + 1.0) / 2.0).astype(np.float32)
            best_l2, best_adv, ok = (v.numpy() for v in self._check(
                tf.constant(x), tf.constant(y), tf.constant(last), tf.constant(out["best_l2"]),
                tf.constant(out["best_adv"]), tf.constant(out["ok"])))
            # Binary search on the constant, per image.
            upper = np.where(ok, np.minimum(upper, const), upper)
            lower = np.where(ok, lower, np.maximum(lower, const))
            const = np.where(upper < _NO_UPPER, (lower + upper) / 2.0, const * 10.0).astype(np.float32)
        success = np.isfinite(best_l2)
        x_adv = np.where(success.reshape((-1,) + (1,) * (x.ndim - 1)), best_adv, last)
        l2 = np.sqrt(np.sum(np.square(x_adv.astype(np.float64) - x), axis=axes)).astype(np.float32)
        return x_adv, success, l2

    def _margin(self, logits, y):
        """z_y - max_{j != y} z_j + confidence (<= 0: adversarial with the required confidence)."""
        one_hot = tf.one_hot(y, tf.shape(logits)[-1], dtype=logits.dtype)
        true = tf.reduce_sum(logits * one_hot, axis=-1)
        other = tf.reduce_max(logits - 1e9 * one_hot, axis=-1)
        return true - other + self.confidence

    def _succeeded(self, logits, y):
        # The true logit boosted by the confidence must lose the argmax (ties go to argmax's choice,
        # so with confidence 0 this is exactly "misclassified").
        boosted = logits + self.confidence * tf.one_hot(y, tf.shape(logits)[-1], dtype=logits.dtype)
        return tf.not_equal(tf.argmax(boosted, axis=-1, output_type=tf.int32), y)

    def _record(self, x, y, x_adv, logits, best_l2, best_adv, ok):
        l2 = tf.sqrt(tf.reduce_sum(tf.square(x_adv - x), axis=list(range(1, x.shape.rank))))
        success = self._succeeded(logits, y)
        better = success & (l2 < best_l2)
        best_adv = tf.where(per_image(better, x) > 0, x_adv, best_adv)
        return tf.where(better, l2, best_l2), best_adv, ok | success

    def _check_point(self, x, y, x_adv, best_l2, best_adv, ok):
        return self._record(x, y, x_adv, self._logits(x_adv), best_l2, best_adv, ok)

    def _adam_steps(self, fixed, state, k0, n):
        x, y, const = fixed["x"], fixed["y"], fixed["const"]
        axes = list(range(1, x.shape.rank))
        w, m, v = state["w"], state["m"], state["v"]
        best_l2, best_adv, ok = state["best_l2"], state["best_adv"], state["ok"]
        b1, b2, adam_eps = 0.9, 0.999, 1e-8
        for i in tf.range(n):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(w)
                x_adv = (tf.tanh(w) + 1.0) / 2.0
                logits = self._logits(x_adv)
                dist = tf.reduce_sum(tf.square(x_adv - x), axis=axes)
                loss = dist + const * tf.nn.relu(self._margin(logits, y))
            grad = tape.gradient(loss, w)
            best_l2, best_adv, ok = self._record(x, y, x_adv, logits, best_l2, best_adv, ok)
            # Adam (fresh state for each const, as in the original implementation).
            t = tf.cast(k0 + i + 1, tf.float32)
            m = b1 * m + (1.0 - b1) * grad
            v = b2 * v + (1.0 - b2) * tf.square(grad)
            m_hat = m / (1.0 - tf.pow(b1, t))
            v_hat = v / (1.0 - tf.pow(b2, t))
            w = w - self.lr * m_hat / (tf.sqrt(v_hat) + adam_eps)
        return {"w": w, "m": m, "v": v, "best_l2": best_l2, "best_adv": best_adv, "ok": ok}
