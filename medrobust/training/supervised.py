"""Supervised adversarial training baselines: PGD-AT (Madry et al. 2018) and TRADES (Zhang et al. 2019).

Both use only the labeled batch (an unlabeled batch, if the pipeline yields one, is ignored). Their
adversaries are built in `prepare`, outside the gradient tape and in inference mode (BatchNorm
statistics untouched), by `pgd_linf`, which SSAT's PGD variant shares.

Unlike `medrobust.attacks.PGD` (an evaluation attack: it keeps each image's first misclassifying
iterate and freezes it there), training wants Madry's plain iteration: k signed-gradient steps of
the objective from a random start, returning the last iterate. That loop is small, so it lives here;
it reuses `medrobust.attacks.project`.
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from medrobust.attacks import project
from medrobust.training.base import Trainer, ce

# (logits, target) -> per-example objective to maximise.
Objective = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def per_image(v, x: tf.Tensor) -> tf.Tensor:
    """A scalar or [batch] value broadcast to x's rank ([batch, 1, 1, 1] for images)."""
    v = tf.cast(v, x.dtype)
    if v.shape.rank == 0:
        v = tf.broadcast_to(v, tf.shape(x)[:1])
    return tf.reshape(v, [-1] + [1] * (x.shape.rank - 1))


def pgd_linf(model: keras.Model, x: tf.Tensor, target: tf.Tensor, eps, steps: int, objective: Objective,
             rel_step: float | None = None, start: str = "uniform", start_scale: float = 1.0) -> tf.Tensor:
    """The last iterate of L-inf PGD maximising sum(objective(model(x_adv, training=False), target)).

    eps: scalar or one value per image ([0, 1] pixel scale); step alpha = rel_step * eps (default
    Madry's 2.5 * eps / steps). start: "uniform" (U[-eps, eps] * start_scale), "normal"
    (N(0, (start_scale * eps)^2), TRADES) or "none". Every iterate lies in the eps-ball and in [0, 1].
    Only TensorFlow random ops are used, so the graph draws fresh noise at every step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = tf.convert_to_tensor(x)
    eps = per_image(eps, x)
    alpha = eps * (2.5 / steps if rel_step is None else rel_step)
    if start == "uniform":
        x_adv = project(x + tf.random.uniform(tf.shape(x), -1.0, 1.0, x.dtype) * eps * start_scale, x, eps, "linf")
    elif start == "normal":
        x_adv = project(x + tf.random.normal(tf.shape(x), dtype=x.dtype) * eps * start_scale, x, eps, "linf")
    elif start == "none":
        x_adv = x
    else:
        raise ValueError(f"start must be 'uniform', 'normal' or 'none', got {start!r}")

    def step(i, x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            # A sum, not a mean: the sign is the same and the gradient does not shrink with the batch.
            loss = tf.reduce_sum(objective(model(x_adv, training=False), target))
        grad = tape.gradient(loss, x_adv)
        return i + 1, project(x_adv + alpha * tf.sign(grad), x, eps, "linf")

    _, x_adv = tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), x_adv))
    return tf.stop_gradient(x_adv)


def kl_divergence(p_logits: tf.Tensor, q_logits: tf.Tensor) -> tf.Tensor:
    """Per-example KL(softmax(p_logits) || softmax(q_logits)), computed from log-softmax for stability."""
    log_p = tf.nn.log_softmax(p_logits)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(q_logits)), axis=-1)


class PGDATTrainer(Trainer):
    """Madry et al. (2018): minimise CE on PGD-k adversaries (random start) of the labeled batch."""

    method = "pgd_at"
    loss_parts = ("loss",)

    def __init__(self, classifier: keras.Model, eps: float = 0.004, steps: int = 10, step_size: float | None = None,
                 **kwargs):
        super().__init__(classifier, **kwargs)
        if not 0 <= eps <= 1 or int(steps) < 1:
            raise ValueError(f"need 0 <= eps <= 1 and steps >= 1, got eps={eps}, steps={steps}")
        self.eps, self.steps, self.step_size = float(eps), int(steps), step_size

    def craft(self, x, y) -> tf.Tensor:
        return pgd_linf(self.classifier, x, tf.cast(y, tf.int32), self.eps, self.steps, ce, self.step_size)

    def prepare(self, x, y, x_u) -> dict:
        # Clean inference-mode logits only feed the "accuracy" metric (clean, as for every method);
        # one forward pass next to k attack steps.
        return {"x_adv": self.craft(x, y), "clean_logits": self.classifier(x, training=False)}

    def objective(self, x, y, prepared):
        adv_logits = self.classifier(prepared["x_adv"], training=True)
        return {"loss": self.labeled_mean(ce(adv_logits, y), y)}, prepared["clean_logits"]


class TRADESTrainer(Trainer):
    """Zhang et al. (2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv from PGD-k on that KL.

    As in the reference implementation, the inner maximisation starts from x plus small Gaussian
    noise (std 0.001 at eps 0.031, i.e. 3.2% of eps) and runs in inference mode against the fixed
    clean distribution; the outer loss runs both passes in training mode and lets the gradient flow
    through both sides of the KL.
    """

    method = "trades"
    loss_parts = ("loss", "natural_ce", "robust_kl")
    START_SCALE = 0.001 / 0.031

    def __init__(self, classifier: keras.Model, eps: float = 0.004, steps: int = 10, beta: float = 6.0,
                 step_size: float | None = None, **kwargs):
        super().__init__(classifier, **kwargs)
        if not 0 <= eps <= 1 or int(steps) < 1 or beta < 0:
            raise ValueError(f"need 0 <= eps <= 1, steps >= 1, beta >= 0; got eps={eps}, steps={steps}, beta={beta}")
        self.eps, self.steps, self.beta, self.step_size = float(eps), int(steps), float(beta), step_size

    def craft(self, x) -> tf.Tensor:
        clean_logits = tf.stop_gradient(self.classifier(x, training=False))
        return pgd_linf(self.classifier, x, clean_logits, self.eps, self.steps,
                        lambda logits, target: kl_divergence(target, logits), self.step_size,
                        start="normal", start_scale=self.START_SCALE)

    def prepare(self, x, y, x_u) -> dict:
        return {"x_adv": self.craft(x)}

    def objective(self, x, y, prepared):
        logits = self.classifier(x, training=True)
        adv_logits = self.classifier(prepared["x_adv"], training=True)
        natural = self.labeled_mean(ce(logits, y), y)
        robust = self.labeled_mean(kl_divergence(logits, adv_logits), y)
        return {"loss": natural + self.beta * robust, "natural_ce": natural, "robust_kl": robust}, logits


class MARTTrainer(TRADESTrainer):
    """MART, Wang et al. (ICLR 2020), "Improving adversarial robustness requires revisiting misclassified
    examples": BCE(f(x_adv), y) + beta * KL(f(x) || f(x_adv)) * (1 - f(x)_y).

    BCE is the boosted cross-entropy -log f(x_adv)_y - log(1 - max_{k != y} f(x_adv)_k); the KL term is
    weighted by how badly the clean image is classified, so the examples the model gets wrong (in a rare,
    barely learnt class, most of them) pull hardest. x_adv: PGD-k on CE from a small Gaussian start, in
    inference mode, as in the reference code. With class_weights both terms are class-weighted means
    (base.Trainer.labeled_mean), which makes it class-aware on top of the per-example weighting.
    """

    method = "mart"
    loss_parts = ("loss", "boosted_ce", "robust_kl")
    # __init__ (eps, steps, beta, step_size) and the small Gaussian start (the reference code's N(0, 0.001)) are TRADES'.

    def prepare(self, x, y, x_u) -> dict:
        x_adv = pgd_linf(self.classifier, x, tf.cast(y, tf.int32), self.eps, self.steps, ce, self.step_size,
                         start="normal", start_scale=self.START_SCALE)
        return {"x_adv": x_adv}

    def objective(self, x, y, prepared):
        y = tf.cast(y, tf.int32)
        logits = self.classifier(x, training=True)
        adv_logits = self.classifier(prepared["x_adv"], training=True)
        adv_probs = tf.nn.softmax(adv_logits)
        onehot = tf.one_hot(y, tf.shape(adv_logits)[-1], dtype=adv_probs.dtype)
        # The most probable wrong class under attack (the true class masked out).
        top_wrong = tf.reduce_max(adv_probs - 2.0 * onehot, axis=-1)
        boosted = ce(adv_logits, y) - tf.math.log(1.0001 - top_wrong + 1e-12)
        true_prob = tf.reduce_sum(tf.nn.softmax(logits) * onehot, axis=-1)
        robust = kl_divergence(logits, adv_logits) * (1.0000001 - true_prob)
        boosted_mean, robust_mean = self.labeled_mean(boosted, y), self.labeled_mean(robust, y)
        return {"loss": boosted_mean + self.beta * robust_mean, "boosted_ce": boosted_mean,
                "robust_kl": robust_mean}, logits
