"""SSAT: semi-supervised adversarial training (Li, Pan & Zhu, arXiv 2006.13555), in two loss forms.

Per step, with a labeled batch (x, y) and an unlabeled batch x_u:
  1. pseudo-labels y_u = argmax f(x_u), in inference mode, from the current model, a given frozen
     teacher, or (teacher="snapshot") a frozen copy of the model taken after `pretrain_steps` steps of
     labeled-only training; optionally only those with max softmax >= tau (`confidence`) count;
  2. adversaries, built in inference mode outside the update's gradient tape, every one inside its
     eps-ball (per-image eps ~ U[eps_min, eps_max]) and in [0, 1];
  3. the update, in training mode.

loss="ce" (the paper): adversaries x_adv of x_u against y_u (FGSM, or PGD-k with a random start);
  loss = CE(f(x), y) + lam * masked-mean CE(f(x_adv), y_u). For FGSM the one forward pass of x_u gives
  both the pseudo-labels and the input gradient. With no unlabeled batch (label fraction 1.0), x is
  attacked against its true labels instead.
loss="trades" (robust self-training, Carmon et al. 2019, "Unlabeled data improves adversarial
  robustness", with the TRADES loss of Zhang et al. 2019; the unlabeled KL term is also Uesato et al.
  2019's UAT-FT smoothness loss): labeled and unlabeled images are both attacked, by PGD-k (or one
  step, attack="fgsm") maximising KL(f(x) || f(x_adv)) from TRADES' small Gaussian start, and
    loss = CE(f(x), y) + beta * mean KL(f(x) || f(x_adv))
           + lam * [masked-mean CE(f(x_u), y_u) + beta * mean KL(f(x_u) || f(x_adv_u))],
  the gradient flowing through both sides of each KL, as in TRADES. The clean images (labeled and
  unlabeled together) go through one training-mode pass and their adversaries through another, as
  RST's mixed batches do. lam = 1 weighs every unlabeled image like a labeled one (RST with half of
  each batch unlabeled, when both batches have the same size). The confidence mask applies to the
  pseudo-label CE only; the KL terms need no labels.

attack="free" (loss="trades" only; the cheap form, 4.3-5.5x a standard step at 64 px instead of 10-22x,
  benchmarks/ssat_step.py): no separate attack pass. One training-mode pass of the clean images (labeled
  and unlabeled) gives the clean loss CE(f(x), y) + lam * masked-mean CE(f(x_u), y_u) and, from the same
  backward pass as its weight gradient, its input gradient (the idea of Shafahi et al. 2019, "Adversarial
  training for free!"); each image then takes one signed step of its eps along it (FGSM on the
  labels and pseudo-labels, from x), and a second training-mode pass of the adversaries adds
    beta * mean KL(f(x) || f(x_adv)) + lam * beta * mean KL(f(x_u) || f(x_adv_u))
  with the clean predictions as a fixed target (no gradient through the KL's clean side, unlike
  TRADES). The attack direction thus comes from batch-statistics (training-mode) BatchNorm, like the
  update, instead of an inference-mode KL maximisation; both passes update BatchNorm's moving statistics
  as the other trades forms do. Without a teacher the pseudo-labels come from that same training-mode
  pass (the other forms label in inference mode). Its robustness must be measured against the PGD-k
  forms (README).
  free_noise = k > 0 makes it N-FGSM (de Jorge et al. 2022, "Make some noise: reliable and efficient
  single-step adversarial training"): pass 1 sees x + eta, eta ~ U[-k eps, k eps] per pixel, the signed
  step of eps is taken from there along pass 1's input gradient (now a gradient at the noisy point, as in
  FGSM with a random start) and is not projected back into the eps-ball, so an adversary lies up to
  (k + 1) eps from x; the clean loss and the KL's fixed target are those of x + eta. Same cost.

During the `pretrain_steps` labeled-only steps the loss is CE(f(x), y) alone; the trades form also
skips its (costly) attacks then.

Class weights (base.Trainer): the labeled CE and KL terms are class-weighted means; in the ce form the
adversarial term, when it attacks the labeled batch (no unlabeled pool), carries the true classes'
weights; pseudo-labeled images weigh 1, or with pseudo_class_weight the weight of their pseudo-label's
class (in the pseudo-label CE and the unlabeled KL).

Distribution: the masked mean is taken over the global batch (the kept count is all-reduced across
replicas), so a replica holding few confident pseudo-labels does not get a larger weight; the other
terms are per-replica means, scaled by base.Trainer. Random eps and PGD starts come from TensorFlow
random ops in the graph (fresh every step, no Python randomness).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from medrobust.attacks import project
from medrobust.training.base import Trainer, ce, mean_over_batch
from medrobust.training.supervised import TRADESTrainer, kl_divergence, per_image, pgd_linf

ATTACKS = ("fgsm", "pgd", "free")
LOSSES = ("ce", "trades")
# lam and attack when not given: the paper's for "ce", RST's (equal weights, PGD) for "trades".
FORM_DEFAULTS = {"ce": {"lam": 3.0, "attack": "fgsm"}, "trades": {"lam": 1.0, "attack": "pgd"}}
LOSS_PARTS = {"ce": ("loss", "labeled_ce", "adv_ce", "pseudo_kept"),
              "trades": ("loss", "labeled_ce", "robust_kl", "pseudo_ce", "unlabeled_kl", "pseudo_kept")}


class SSATTrainer(Trainer):
    """Semi-supervised adversarial training on pseudo-labeled unlabeled data."""

    method = "ssat"
    loss_parts = LOSS_PARTS["ce"]

    def __init__(self, classifier: keras.Model, eps_range=(0.001, 0.003), lam: float | None = None,
                 attack: str | None = None, pgd_steps: int = 10, confidence: float = 0.0,
                 teacher: keras.Model | str | None = None, pretrain_steps: int = 0, joint_forward: bool = False,
                 loss: str = "ce", beta: float = 6.0, pseudo_class_weight: bool = False, free_noise: float = 0.0,
                 soft_pseudo_labels: bool = False, **kwargs):
        """
        Args:
          eps_range: (eps_min, eps_max) in [0, 1] pixel scale; each attacked image draws its own eps.
          lam: weight of the unlabeled-batch loss (0 = no unlabeled term); default 3 for loss="ce" (the
            paper), 1 for loss="trades" (RST: an unlabeled image weighs as much as a labeled one).
          attack: "fgsm" (one step of size eps) or "pgd" (pgd_steps steps, step 2.5 * eps / steps);
            default "fgsm" for loss="ce" (the paper), "pgd" for loss="trades" (RST, TRADES). "free"
            (loss="trades" only): one step along the clean loss's input gradient from the update's own
            backward pass, see the module docstring.
            Under "ce" they maximise the pseudo-label CE (PGD from a uniform random start, FGSM from
            x); under "trades" the KL to the clean prediction, from TRADES' Gaussian start.
          confidence: pseudo-labels whose max softmax is below this are left out of the pseudo-label loss.
          teacher: where pseudo-labels come from. None: the current model. A keras.Model: that frozen
            classifier. "snapshot": a frozen copy of this classifier taken after `pretrain_steps` steps
            of labeled-only training (robust self-training in one run; use pretrain_steps > 0).
          pretrain_steps: optimizer steps of labeled-only training before the adversarial terms switch on.
          joint_forward: (loss="ce") run x and x_adv through one training-mode forward pass. Off by
            default: it makes BatchNorm normalise clean labeled and adversarial unlabeled images with
            shared batch statistics, which changes the method; see benchmarks/ssat_step.py.
          loss: "ce" (the paper's adversarial pseudo-label CE) or "trades" (RST); see the module docstring.
          beta: (loss="trades") weight of the KL terms, TRADES' trade-off.
          pseudo_class_weight: weigh each pseudo-labeled image by the class weight of its pseudo-label
            (needs class_weights) in the pseudo-label loss and the unlabeled KL term, so the rare classes
            of the unlabeled pool are attacked and fitted as much as the labeled ones (a per-class weighted
            TRADES, in the spirit of the class-aware adversarial training of Wang et al. 2020 and Xu et al.
            2021, "To be robust or to be fair"). Off: every pseudo-labeled image weighs 1.
          soft_pseudo_labels: (loss="trades") fit the labeler's softmax probabilities instead of its arg-max
            in the pseudo-label term (cross-entropy to a soft target, i.e. knowledge distillation at
            temperature 1, Hinton et al. 2015; the soft labels of RSLAD, Zi et al. 2021), so a class the
            labeler ranks second (e.g. DRUSEN behind CNV) keeps its probability mass. Confidence filtering and
            pseudo-class weights still use the arg-max.
          free_noise: (attack="free") k >= 0: uniform noise of k * eps before the signed step, which is then
            not projected (N-FGSM, de Jorge et al. 2022; k = 2 there); 0: the step is taken from x itself.

        Raises:
          ValueError: an option out of range or unknown.

        Why "snapshot": with the current model as its own labeler, inference-mode pseudo-labels come
        from BatchNorm moving statistics that lag the fast-moving weights; the model then trains
        towards whatever class its lagging copy prefers, which shifts the statistics further. On the
        phantom this collapses to one class within ~10 steps even after labeled pre-training
        (examples/compare_defenses.py --train-option teacher=none). A frozen teacher breaks that loop.
        """
        super().__init__(classifier, **kwargs)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        lam = FORM_DEFAULTS[loss]["lam"] if lam is None else float(lam)
        attack = FORM_DEFAULTS[loss]["attack"] if attack is None else attack
        eps_min, eps_max = (float(e) for e in eps_range)
        if not 0.0 <= eps_min <= eps_max <= 1.0:
            raise ValueError(f"eps_range must satisfy 0 <= min <= max <= 1, got {tuple(eps_range)}")
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
        if lam < 0 or beta < 0 or not 0.0 <= confidence < 1.0 or int(pgd_steps) < 1 or int(pretrain_steps) < 0:
            raise ValueError(f"need lam >= 0, beta >= 0, 0 <= confidence < 1, pgd_steps >= 1, pretrain_steps >= 0; "
                             f"got lam={lam}, beta={beta}, confidence={confidence}, pgd_steps={pgd_steps}, "
                             f"pretrain_steps={pretrain_steps}")
        if pseudo_class_weight and self.class_weights is None:
            raise ValueError("pseudo_class_weight needs class_weights")
        if joint_forward and loss != "ce":
            raise ValueError("joint_forward applies to loss='ce' only")
        if soft_pseudo_labels and loss != "trades":
            raise ValueError("soft_pseudo_labels applies to loss='trades' only")
        if attack == "free" and loss != "trades":
            raise ValueError("attack='free' applies to loss='trades' only")
        if not 0.0 <= float(free_noise) or (float(free_noise) > 0 and attack != "free"):
            raise ValueError(f"free_noise must be >= 0 and applies to attack='free' only, got {free_noise} "
                             f"with attack={attack!r}")
        if isinstance(teacher, str) and teacher != "snapshot":
            raise ValueError(f"teacher must be None, a keras.Model or 'snapshot', got {teacher!r}")
        if teacher == "snapshot" and int(pretrain_steps) == 0:
            raise ValueError("teacher='snapshot' needs pretrain_steps > 0 (a snapshot of the untrained model "
                             "would label at random)")
        self.loss, self.beta = loss, float(beta)
        self.pseudo_class_weight = bool(pseudo_class_weight)
        self.soft_pseudo_labels = bool(soft_pseudo_labels)
        self.free_noise = float(free_noise)
        if loss != "ce":  # this form's own loss parts, each with its Mean tracker
            self.loss_parts = LOSS_PARTS[loss]
            self.trackers = {name: keras.metrics.Mean(name=name) for name in self.loss_parts}
        self.eps_min, self.eps_max = eps_min, eps_max
        self.lam, self.attack, self.pgd_steps = lam, attack, int(pgd_steps)
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
    def _eps(self, x):
        return per_image(tf.random.uniform(tf.shape(x)[:1], self.eps_min, self.eps_max), x)

    def _pseudo_labels(self, source_logits) -> tuple[tf.Tensor, tf.Tensor]:
        """(argmax labels, kept mask) from the labeler's logits."""
        pseudo = tf.argmax(source_logits, axis=-1, output_type=tf.int32)
        kept = tf.reduce_max(tf.nn.softmax(source_logits), axis=-1) >= self.confidence
        return tf.stop_gradient(pseudo), kept

    def _pseudo_ce(self, logits, pseudo, source_logits) -> tf.Tensor:
        """float32 [n_u]: per-image pseudo-label cross-entropy, to the arg-max or (soft_pseudo_labels) to the
        labeler's softmax."""
        if not self.soft_pseudo_labels:
            return ce(logits, pseudo)
        target = tf.stop_gradient(tf.nn.softmax(source_logits))
        return tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)

    def craft(self, x_u, labels=None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """loss="ce": (x_adv, pseudo_labels, kept_mask) for an unlabeled batch; BatchNorm statistics stay
        untouched. With `labels` (a batch whose labels are known) those are used instead of pseudo-labels."""
        x_u = tf.convert_to_tensor(x_u, tf.float32)
        eps = self._eps(x_u)
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
                pseudo, kept = self._pseudo_labels(logits if teacher_logits is None else teacher_logits)
                loss = tf.reduce_sum(ce(logits, pseudo))
            grad = tape.gradient(loss, x_u)
            x_adv = project(x_u + eps * tf.sign(grad), x_u, eps, "linf")
        else:
            source = self.classifier(x_u, training=False) if teacher_logits is None else teacher_logits
            pseudo, kept = self._pseudo_labels(source)
            x_adv = pgd_linf(self.classifier, x_u, pseudo, eps, self.pgd_steps, ce, start="uniform")
        return tf.stop_gradient(x_adv), pseudo, kept

    def craft_kl(self, x) -> tuple[tf.Tensor, tf.Tensor]:
        """loss="trades": (x_adv maximising KL(f(x) || f(x_adv)) as in TRADES, the clean inference-mode
        logits f(x)). Labeled and unlabeled images are attacked in one batch (inference mode, so the
        batch's make-up does not change any image's result)."""
        x = tf.convert_to_tensor(x, tf.float32)
        clean = tf.stop_gradient(self.classifier(x, training=False))
        steps, rel_step = (1, 1.0) if self.attack == "fgsm" else (self.pgd_steps, None)
        x_adv = pgd_linf(self.classifier, x, clean, self._eps(x), steps,
                         lambda logits, target: kl_divergence(target, logits), rel_step,
                         start="normal", start_scale=TRADESTrainer.START_SCALE)
        return x_adv, clean

    def prepare(self, x, y, x_u) -> dict:
        if self.snapshot:
            self._take_snapshot_once()
        if self.loss == "trades":
            return self._prepare_trades(x, x_u)
        # No unlabeled pool (label fraction 1.0): the labeled batch is attacked against its true labels,
        # so SSAT becomes FGSM/PGD adversarial training rather than a pull toward a teacher's mistakes.
        x_adv, pseudo, kept = self.craft(x, labels=y) if x_u is None else self.craft(x_u)
        # Adversaries of the labeled batch carry their true class's weight; pseudo-labeled ones weigh 1
        # (their pseudo-class's weight with pseudo_class_weight).
        weights = self.example_weights(y) if x_u is None else self._pseudo_weights(pseudo)
        return {"x_adv": x_adv, "pseudo": pseudo, **self._kept_counts(kept, weights)}

    def _prepare_trades(self, x, x_u) -> dict:
        x_all = x if x_u is None else tf.concat([x, x_u], axis=0)
        n_u = 0 if x_u is None else tf.shape(x_u)[0]

        def attack():
            x_adv, clean = self.craft_kl(x_all)
            if x_u is None:
                return x_adv, tf.zeros([0], tf.int32), tf.zeros([0], tf.bool), tf.zeros_like(clean[:0])
            source = clean[tf.shape(x)[0]:] if self.teacher is None else self.teacher(x_u, training=False)
            return (x_adv, *self._pseudo_labels(source), tf.cast(source, tf.float32))

        def skip():  # labeled-only pre-training: no attack, no pseudo-labels (their weight is 0)
            classes = self.classifier.output_shape[-1]
            return tf.identity(x_all), tf.zeros([n_u], tf.int32), tf.zeros([n_u], tf.bool), tf.zeros([n_u, classes])

        x_adv, pseudo, kept, source = attack() if self.pretrain_steps == 0 else tf.cond(self._active(), attack, skip)
        return {"x_all": x_all, "x_adv": tf.stop_gradient(x_adv), "pseudo": pseudo, "semi": x_u is not None,
                "source": tf.stop_gradient(source),
                **self._kept_counts(kept, self._pseudo_weights(pseudo))}

    def _pseudo_weights(self, pseudo):
        """float32 [n_u]: each pseudo-labeled image's weight, its pseudo-class's (pseudo_class_weight), else None."""
        return self.example_weights(pseudo) if self.pseudo_class_weight else None

    def _unlabeled_mean(self, per_example, pseudo):
        """Mean of a label-free term over the unlabeled batch: plain, or weighted by pseudo-class over the
        global batch (pseudo_class_weight)."""
        return self.labeled_mean(per_example, pseudo) if self.pseudo_class_weight else mean_over_batch(per_example)

    @staticmethod
    def _kept_counts(kept, weights=None) -> dict:
        """The (weighted) kept mask, the kept/total counts and the mask's total over the global batch
        (all replicas)."""
        kept = tf.cast(kept, tf.float32)
        mask = kept if weights is None else kept * weights
        sums = [tf.reduce_sum(kept), tf.cast(tf.size(kept), tf.float32), tf.reduce_sum(mask)]
        context = tf.distribute.get_replica_context()
        if context is not None:  # None only when called by hand in a cross-replica context
            sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
        n_kept, n_total, mask_total = sums
        return {"mask": mask, "n_kept": n_kept, "n_total": n_total, "mask_total": mask_total}

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

    def _active(self):
        """True once the labeled-only pre-training steps are over."""
        return self.optimizer.iterations >= self.pretrain_steps

    def current_lam(self):
        """lam, or 0 during the labeled-only pre-training steps."""
        if self.pretrain_steps == 0:
            return self.lam
        return tf.where(self._active(), self.lam, 0.0)

    # -- attack="free": pseudo-labels, attack and update in one train_step ---------------------------
    def train_step(self, data):
        if self.attack != "free":
            return super().train_step(data)
        x, y = data
        x_u = None
        if isinstance(x, (tuple, list)):
            x, x_u = x
        if self.snapshot:
            self._take_snapshot_once()
        n = tf.shape(x)[0]
        x_all = x if x_u is None else tf.concat([x, x_u], axis=0)
        teacher_logits = None if x_u is None or self.teacher is None else self.teacher(x_u, training=False)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        on = 1.0 if self.pretrain_steps == 0 else tf.cast(self._active(), tf.float32)
        weights = self.classifier.trainable_weights
        eps = self._eps(x_all)
        if self.free_noise > 0:  # N-FGSM's start: pass 1 and the step both from the noisy image
            noise = tf.random.uniform(tf.shape(x_all), -1.0, 1.0) * (self.free_noise * eps)
            x_all = tf.clip_by_value(x_all + noise, 0.0, 1.0)
        # Pass 1: clean images; one backward pass gives the weight gradient and the input gradient.
        with tf.GradientTape() as tape:
            tape.watch(x_all)
            clean = self.classifier(x_all, training=True)
            logits = clean[:n]
            labeled = self.labeled_mean(ce(logits, y), y)
            if x_u is not None:
                source = tf.stop_gradient(clean[n:]) if teacher_logits is None else teacher_logits
                pseudo, kept = self._pseudo_labels(source)
                counts = self._kept_counts(kept, self._pseudo_weights(pseudo))
                pseudo_ce = self._masked_mean(self._pseudo_ce(clean[n:], pseudo, source), counts)
            else:
                counts = self._kept_counts(tf.zeros([0], tf.bool))
                pseudo_ce = tf.constant(0.0)
            clean_loss = labeled + on * self.lam * pseudo_ce
            scaled = self.optimizer.scale_loss(clean_loss / replicas)
        *grads, grad_x = tape.gradient(scaled, [*weights, x_all])
        # Unlabeled images out of the pseudo-label loss (pre-training, low confidence) get no step.
        x_adv = x_all + eps * tf.sign(grad_x)
        # N-FGSM leaves the step unprojected (up to (k + 1) eps from x); either way it stays in [0, 1].
        x_adv = tf.stop_gradient(tf.clip_by_value(x_adv, 0.0, 1.0) if self.free_noise > 0
                                 else project(x_adv, x_all, eps, "linf"))
        target = tf.stop_gradient(clean)
        # Pass 2: adversaries, KL to the fixed clean predictions.
        with tf.GradientTape() as tape:
            kl = kl_divergence(target, self.classifier(x_adv, training=True))
            robust = self.labeled_mean(kl[:n], y)
            unlabeled_kl = self._unlabeled_mean(kl[n:], pseudo) if x_u is not None else tf.constant(0.0)
            adv_loss = on * self.beta * (robust + self.lam * unlabeled_kl)
            scaled = self.optimizer.scale_loss(adv_loss / replicas)
        grads = [a + b for a, b in zip(grads, tape.gradient(scaled, weights))]
        self.optimizer.apply_gradients(zip(grads, weights))
        parts = {"loss": clean_loss + adv_loss, "labeled_ce": labeled, "robust_kl": robust, "pseudo_ce": pseudo_ce,
                 "unlabeled_kl": unlabeled_kl, "pseudo_kept": self._kept_share(counts)}
        return self._update_metrics(parts, y, logits)

    # -- step 3: the update (training mode, inside the tape) --------------------------------------
    def _masked_mean(self, per_example, prepared):
        """(Weighted) mean over the kept examples of the global batch: this replica's masked sum times the
        replica count (base.py divides 'loss' by it), over the mask's total on all replicas (0 if none)."""
        replicas = tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, tf.float32)
        return tf.math.divide_no_nan(tf.reduce_sum(prepared["mask"] * per_example) * replicas, prepared["mask_total"])

    def _kept_share(self, prepared):
        return prepared["n_kept"] / tf.maximum(prepared["n_total"], 1.0)

    def objective(self, x, y, prepared):
        if self.loss == "trades":
            return self._trades_objective(x, y, prepared)
        if self.joint_forward:
            both = self.classifier(tf.concat([x, prepared["x_adv"]], axis=0), training=True)
            logits, adv_logits = both[:tf.shape(x)[0]], both[tf.shape(x)[0]:]
        else:
            logits = self.classifier(x, training=True)
            adv_logits = self.classifier(prepared["x_adv"], training=True)
        labeled = self.labeled_mean(ce(logits, y), y)
        adv = self._masked_mean(ce(adv_logits, prepared["pseudo"]), prepared)
        parts = {"loss": labeled + self.current_lam() * adv, "labeled_ce": labeled, "adv_ce": adv,
                 "pseudo_kept": self._kept_share(prepared)}
        return parts, logits

    def _trades_objective(self, x, y, prepared):
        n = tf.shape(x)[0]
        clean = self.classifier(prepared["x_all"], training=True)
        adv = self.classifier(prepared["x_adv"], training=True)
        logits = clean[:n]
        kl = kl_divergence(clean, adv)  # both sides differentiable, as in TRADES
        labeled = self.labeled_mean(ce(logits, y), y)
        robust = self.labeled_mean(kl[:n], y)
        if prepared["semi"]:
            pseudo_ce = self._masked_mean(self._pseudo_ce(clean[n:], prepared["pseudo"], prepared["source"]), prepared)
            unlabeled_kl = self._unlabeled_mean(kl[n:], prepared["pseudo"])
        else:  # no unlabeled batch: TRADES on the labeled batch
            pseudo_ce = unlabeled_kl = tf.constant(0.0)
        on = 1.0 if self.pretrain_steps == 0 else tf.cast(self._active(), tf.float32)
        loss = labeled + on * (self.beta * robust + self.lam * (pseudo_ce + self.beta * unlabeled_kl))
        parts = {"loss": loss, "labeled_ce": labeled, "robust_kl": robust, "pseudo_ce": pseudo_ce,
                 "unlabeled_kl": unlabeled_kl, "pseudo_kept": self._kept_share(prepared)}
        return parts, logits
