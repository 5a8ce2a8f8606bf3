"""Carlini-Wagner L2 attack (Carlini & Wagner 2017, "Towards evaluating the robustness of neural
networks"), untargeted, as a compiled tf.function.

It searches for the SMALLEST L2 perturbation that changes the prediction: it optimises
w in tanh space, x_adv = (tanh(w) + 1) / 2 (so x_adv is always in [0, 1]), minimising
    ||x_adv - x||_2^2 + c * max(z_y - max_{j != y} z_j + confidence, 0)
with Adam, and binary-searches the constant c per image (c halves the gap towards the last
failure after a success, and grows 10x while nothing succeeded).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from medrobust.attacks.pgd import _per_image, project

_NO_UPPER = 1e10


class CarliniWagnerL2:
    """attack = CarliniWagnerL2(model); x_adv = attack(x, y)            # minimal perturbation, unbounded
                                        x_adv = attack(x, y, eps=0.5)   # same, projected onto the L2 ball

    Returns, per image, the successful adversarial with the smallest L2 distance found over all
    binary-search steps and iterations; for images never fooled, the last iterate.
    With `eps` (scalar or one per image, L2 norm in [0, 1] pixel units) that result is projected
    onto the L2 eps-ball around x (intersected with [0, 1]), so an image whose minimal adversarial
    lies farther than eps is usually no longer fooled: CW is a minimal-perturbation attack, not an
    eps-bounded one, and at a fixed eps PGD-L2/APGD-L2 are the stronger choice.
    `find(x, y)` returns (x_adv, success, l2) without projection. The model runs with training=False.
    """

    def __init__(self, model: keras.Model, steps: int = 100, binary_search_steps: int = 5, lr: float = 0.01,
                 confidence: float = 0.0, initial_const: float = 1.0, jit_compile: bool = False):
        if steps < 1 or binary_search_steps < 1:
            raise ValueError("steps and binary_search_steps must be >= 1")
        self.model, self.steps, self.binary_search_steps = model, steps, binary_search_steps
        self.lr, self.confidence, self.initial_const = lr, confidence, initial_const
        self._run = tf.function(self._find, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, x, y, eps=None) -> tf.Tensor:
        x = tf.convert_to_tensor(x, tf.float32)
        x_adv, _, _ = self.find(x, y)
        if eps is None:
            return x_adv
        eps = _per_image(tf.convert_to_tensor(eps, tf.float32), x)
        return project(x_adv, x, eps, "l2")

    def find(self, x, y):
        """(x_adv, success [bool per image], L2 distance of x_adv per image), unbounded."""
        return self._run(tf.convert_to_tensor(x, tf.float32), tf.cast(y, tf.int32))

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

    def _find(self, x, y):
        axes = list(range(1, x.shape.rank))
        n = tf.shape(x)[0]
        w0 = tf.atanh(tf.clip_by_value(2.0 * x - 1.0, -1.0, 1.0) * (1.0 - 1e-6))
        lower = tf.zeros([n])
        upper = tf.fill([n], _NO_UPPER)
        const = tf.fill([n], float(self.initial_const))
        best_l2 = tf.fill([n], float("inf"))
        best_adv = x
        last = x
        b1, b2, adam_eps = 0.9, 0.999, 1e-8

        def check(x_adv, logits, best_l2, best_adv, ok):
            l2 = tf.sqrt(tf.reduce_sum(tf.square(x_adv - x), axis=axes))
            success = self._succeeded(logits, y)
            better = success & (l2 < best_l2)
            best_adv = tf.where(_per_image(better, x) > 0, x_adv, best_adv)
            return tf.where(better, l2, best_l2), best_adv, ok | success

        for _ in tf.range(self.binary_search_steps):
            w = w0
            m = tf.zeros_like(w)
            v = tf.zeros_like(w)
            ok = tf.zeros([n], tf.bool)  # succeeded at least once with this const
            for t in tf.range(1, self.steps + 1):
                with tf.GradientTape() as tape:
                    tape.watch(w)
                    x_adv = (tf.tanh(w) + 1.0) / 2.0
                    logits = self.model(x_adv, training=False)
                    dist = tf.reduce_sum(tf.square(x_adv - x), axis=axes)
                    loss = dist + const * tf.nn.relu(self._margin(logits, y))
                grad = tape.gradient(loss, w)
                best_l2, best_adv, ok = check(x_adv, logits, best_l2, best_adv, ok)
                # Adam (fresh state for each const, as in the original implementation).
                m = b1 * m + (1.0 - b1) * grad
                v = b2 * v + (1.0 - b2) * tf.square(grad)
                tf_t = tf.cast(t, tf.float32)
                m_hat = m / (1.0 - tf.pow(b1, tf_t))
                v_hat = v / (1.0 - tf.pow(b2, tf_t))
                w = w - self.lr * m_hat / (tf.sqrt(v_hat) + adam_eps)
            last = (tf.tanh(w) + 1.0) / 2.0
            best_l2, best_adv, ok = check(last, self.model(last, training=False), best_l2, best_adv, ok)
            # Binary search on the constant, per image.
            upper = tf.where(ok, tf.minimum(upper, const), upper)
            lower = tf.where(ok, lower, tf.maximum(lower, const))
            const = tf.where(upper < _NO_UPPER, (lower + upper) / 2.0, const * 10.0)

        success = tf.math.is_finite(best_l2)
        x_adv = tf.where(_per_image(success, x) > 0, best_adv, last)
        l2 = tf.sqrt(tf.reduce_sum(tf.square(x_adv - x), axis=axes))
        return x_adv, success, l2
