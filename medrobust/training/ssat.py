"""SSAT: semi-supervised adversarial training (Li, Pan & Zhu, arXiv 2006.13555).

Per step, with a labeled batch (x, y) and an unlabeled batch x_u (when there is none, x is attacked
against its true labels y instead of pseudo-labels):
  1. pseudo-labels y_u = argmax f(x_u), in inference mode, from the current model, a given frozen
     teacher, or (teacher="snapshot") a frozen copy of the model taken after `pretrain_steps` steps of
     labeled-only training; optionally only those with max softmax >= tau (`confidence`) count;
  2. adversaries x_adv of x_u against y_u: FGSM with a per-image eps ~ U[eps_min, eps_max], or PGD-k
     with a random start and the same per-image eps; built in inference mode, outside the update's
     gradient tape. For FGSM the one forward pass of x_u gives both the pseudo-labels and the input
     gradient. Every x_adv lies in its eps-ball and in [0, 1];
  3. loss = CE(f(x), y) + lam * masked-mean CE(f(x_adv), y_u), updated in training mode (lam = 0
     during the first `pretrain_steps` steps). With class weights (base.Trainer) the labeled CE, and
     the adversarial term when it attacks the labeled batch, are class-weighted means.

Distribution: the masked mean is taken over the global batch (the kept count is all-reduced across
replicas), so a replica holding few confident pseudo-labels does not get a larger weight. Random eps
and PGD starts come from TensorFlow random ops in the graph (fresh every step, no Python randomness).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from medrobust.attacks import project
from medrobust.training.base import Trainer, ce
from medrobust.training.supervised import per_image, pgd_linf

ATTACKS = ("fgsm", "pgd")


class SSATTrainer(Trainer):
    """Semi-supervised adversarial training on pseudo-labeled unlabeled data."""

    method = "ssat"
    loss_parts = ("loss", "labeled_ce", "adv_ce", "pseudo_kept")

    def __init__(self, classifier: keras.Model, eps_range=(0.001, 0.003), lam: float = 3.0, attack: str = "fgsm",
                 pgd_steps: int = 10, confidence: float = 0.0, teacher: keras.Model | str | None = None,
                 pretrain_steps: int = 0, joint_forward: bool = False, **kwargs):
        """
        Args:
          eps_range: (eps_min, eps_max) in [0, 1] pixel scale; each unlabeled image draws its own eps.
          lam: weight of the adversarial pseudo-label loss (0 = standard training on the labeled batch).
          attack: "fgsm" (the paper) or "pgd" (pgd_steps steps, random start, step 2.5 * eps / steps).
          confidence: pseudo-labels whose max softmax is below this are left out of the adversarial loss.
          teacher: where pseudo-labels come from. None: the current model. A keras.Model: that frozen
            classifier. "snapshot": a frozen copy of this classifier taken after `pretrain_steps` steps
            of labeled-only training (robust self-training in one run; use pretrain_steps > 0).
          pretrain_steps: optimizer steps of labeled-only training (lam = 0) before the adversarial
            pseudo-label loss switches on.
          joint_forward: run x and x_adv through one training-mode forward pass (concatenated). Off by
            default: it makes BatchNorm normalise clean labeled and adversarial unlabeled images with
            shared batch statistics, which changes the method; see benchmarks/ssat_step.py.

        Why "snapshot": with the current model as its own labeler, inference-mode pseudo-labels come
        from BatchNorm moving statistics that lag the fast-moving weights; the model then trains
        towards whatever class its lagging copy prefers, which shifts the statistics further. On the
        phantom this collapses to one class within ~10 steps even after labeled pre-training
        (examples/compare_defenses.py --train-option teacher=none). A frozen teacher breaks that loop.
        """
        super().__init__(classifier, **kwargs)
        eps_min, eps_max = (float(e) for e in eps_range)
        if not 0.0 <= eps_min <= eps_max <= 1.0:
            raise ValueError(f"eps_range must satisfy 0 <= min <= max <= 1, got {tuple(eps_range)}")
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
        if lam < 0 or not 0.0 <= confidence < 1.0 or int(pgd_steps) < 1 or int(pretrain_steps) < 0:
            raise ValueError(f"need lam >= 0, 0 <= confidence < 1, pgd_steps >= 1, pretrain_steps >= 0; got lam={lam}, "
                             f"confidence={confidence}, pgd_steps={pgd_steps}, pretrain_steps={pretrain_steps}")
        if isinstance(teacher, str) and teacher != "snapshot":
            raise ValueError(f"teacher must be None, a keras.Model or 'snapshot', got {teacher!r}")
        if teacher == "snapshot" and int(pretrain_steps) == 0:
            raise ValueError("teacher='snapshot' needs pretrain_steps > 0 (a snapshot of the untrained model "
                             "would label at random)")
        self.eps_min, self.eps_max = eps_min, eps_max
        self.lam, self.attack, self.pgd_steps = float(lam), attack, int(pgd_steps)
        self.confidence, self.joint_forward = float(confidence), bool(joint_forward)
        self.pretrain_steps = int(pretrain_steps)
        self.snapshot = teacher == "snapshot"
        if self.snapshot:
            # Same architecture, own variables (tracked, so BackupAndRestore saves and restores them).
            teacher = keras.models.clone_model(classifier)
            self.teacher_ready = keras.Variable(0, dtype="int32", trainable=False, name="teacher_ready")
        if teacher is not None:
            teacher.trainable = False
        self.teacher = teacher

    # -- step 1 and 2: pseudo-labels and adversaries (inference mode, no weight gradients) ---------
    def craft(self, x_u, labels=None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(x_adv, pseudo_labels, kept_mask) for an unlabeled batch; BatchNorm statistics stay untouched.
        With `labels` (a batch whose labels are known) those are used instead of pseudo-labels."""
        x_u = tf.convert_to_tensor(x_u, tf.float32)
        eps = per_image(tf.random.uniform(tf.shape(x_u)[:1], self.eps_min, self.eps_max), x_u)
        if labels is not None:
            labels = tf.cast(labels, tf.int32)
            if self.attack == "fgsm":  # one full-size signed step from x
                x_adv = pgd_linf(self.classifier, x_u, labels, eps, 1, ce, rel_step=1.0, start="none")
            else:
                x_adv = pgd_linf(self.classifier, x_u, labels, eps, self.pgd_steps, ce, start="uniform")
            return tf.stop_gradient(x_adv), labels, tf.ones_like(labels, tf.bool)
        teacher_logits = None if self.teacher is None else self.teacher(x_u, training=False)
        if self.attack == "fgsm":
            with tf.GradientTape() as tape:
                tape.watch(x_u)
                logits = self.classifier(x_u, training=False)
                source = logits if teacher_logits is None else teacher_logits
                pseudo = tf.argmax(source, axis=-1, output_type=tf.int32)
                loss = tf.reduce_sum(ce(logits, pseudo))
            grad = tape.gradient(loss, x_u)
            x_adv = project(x_u + eps * tf.sign(grad), x_u, eps, "linf")
        else:
            source = self.classifier(x_u, training=False) if teacher_logits is None else teacher_logits
            pseudo = tf.argmax(source, axis=-1, output_type=tf.int32)
            x_adv = pgd_linf(self.classifier, x_u, pseudo, eps, self.pgd_steps, ce, start="uniform")
        kept = tf.reduce_max(tf.nn.softmax(source), axis=-1) >= self.confidence
        return tf.stop_gradient(x_adv), tf.stop_gradient(pseudo), kept

    def prepare(self, x, y, x_u) -> dict:
        if self.snapshot:
            self._take_snapshot_once()
        # No unlabeled pool (label fraction 1.0): the labeled batch is attacked against its true labels,
        # so SSAT becomes FGSM/PGD adversarial training rather than a pull toward a teacher's mistakes.
        x_adv, pseudo, kept = self.craft(x, labels=y) if x_u is None else self.craft(x_u)
        kept = tf.cast(kept, tf.float32)
        # Adversaries of the labeled batch carry their true class's weight; pseudo-labeled ones weigh 1.
        mask = kept * self.example_weights(y) if x_u is None else kept
        sums = [tf.reduce_sum(kept), tf.cast(tf.size(kept), tf.float32), tf.reduce_sum(mask)]
        context = tf.distribute.get_replica_context()
        if context is not None:  # None only when called by hand in a cross-replica context
            sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
        n_kept, n_total, mask_total = sums
        return {"x_adv": x_adv, "pseudo": pseudo, "mask": mask, "n_kept": n_kept, "n_total": n_total,
                "mask_total": mask_total}

    def _take_snapshot_once(self):
        """Copy the classifier into the teacher at the first step after pre-training (in the graph, so
        every replica copies its own identical weights; no Python-side state)."""
        def copy():
            for target, source in zip(self.teacher.weights, self.classifier.weights):
                target.assign(source)
            self.teacher_ready.assign(1)
            return tf.constant(True)

        due = (self.optimizer.iterations >= self.pretrain_steps) & tf.equal(self.teacher_ready, 0)
        tf.cond(due, copy, lambda: tf.constant(False))

    def current_lam(self):
        """lam, or 0 during the labeled-only pre-training steps."""
        if self.pretrain_steps == 0:
            return self.lam
        return tf.where(self.optimizer.iterations >= self.pretrain_steps, self.lam, 0.0)

    # -- step 3: the update (training mode, inside the tape) --------------------------------------
    def objective(self, x, y, prepared):
        if self.joint_forward:
            both = self.classifier(tf.concat([x, prepared["x_adv"]], axis=0), training=True)
            logits, adv_logits = both[:tf.shape(x)[0]], both[tf.shape(x)[0]:]
        else:
            logits = self.classifier(x, training=True)
            adv_logits = self.classifier(prepared["x_adv"], training=True)
        labeled = self.labeled_mean(ce(logits, y), y)
        # Masked (weighted) mean over the global batch: this replica's sum over its kept examples, times
        # the replica count (base.py divides 'loss' by it), over the kept weight of all replicas.
        replicas = tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, tf.float32)
        adv_sum = tf.reduce_sum(prepared["mask"] * ce(adv_logits, prepared["pseudo"]))
        adv = tf.math.divide_no_nan(adv_sum * replicas, prepared["mask_total"])
        parts = {"loss": labeled + self.current_lam() * adv, "labeled_ce": labeled, "adv_ce": adv,
                 "pseudo_kept": prepared["n_kept"] / tf.maximum(prepared["n_total"], 1.0)}
        return parts, logits
