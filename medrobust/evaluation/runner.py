"""Attack a classifier (and its detector) over a budget sweep and collect every figure of the report."""

from __future__ import annotations

import numpy as np

from medrobust.attacks import attack_batches
from medrobust.evaluation.adaptive import DEFAULT_WEIGHTS, joint_objective
from medrobust.evaluation.metrics import clinical_metrics, detection_auroc, roc_points
from medrobust.evaluation.risk import clean_false_referral_rate, system_risk
from medrobust.evaluation.suite import GRADIENT_ATTACKS, AttackSettings, make_attack


def eps_key(eps: float) -> str:
    return f"{eps:g}"


class SystemEvaluator:
    """Holds the clean-side results so each (attack, eps) only costs its attack and one scoring pass."""

    def __init__(self, classifier, detector, x: np.ndarray, y: np.ndarray, settings: AttackSettings | None = None,
                 batch_size: int = 250, progress: bool = True):
        from medrobust.attacks.driver import predict_labels

        self.classifier, self.detector, self.x, self.y = classifier, detector, x, y
        self.settings = settings or AttackSettings()
        self.batch_size, self.progress = batch_size, progress
        self._predict = predict_labels
        self.clean_probs = _softmax(_logits(classifier, x, batch_size))
        self.clean_correct = self.clean_probs.argmax(1) == y
        self.clean_scores = self._scores(x)
        self.curves: dict = {}  # ROC points for the plots: (attack, eps_key, adaptive?) -> (fpr, tpr)
        # One attack object per name (and one adaptive one, whose weight is a variable), so each is
        # traced once for the whole sweep instead of once per budget and weight.
        self._attacks: dict = {}
        self._weight = None

    def clean_report(self) -> dict:
        out = clinical_metrics(self.y, self.clean_probs)
        report = {"clean_accuracy": out.pop("accuracy"), **out}
        if self.detector is not None:
            flagged = self.clean_scores["combined"] > self.detector.threshold
            report["detector"] = {"threshold": float(self.detector.threshold),
                                  "clean_false_referral_rate": clean_false_referral_rate(flagged)}
        return report

    def attack_entry(self, name: str, eps: float, adaptive: bool = False,
                     weights: tuple[float, ...] = DEFAULT_WEIGHTS) -> dict:
        attack = self._attack(name)
        x_adv = attack_batches(attack, self.x, self.y, eps, self.batch_size, self.progress, desc=f"{name} eps={eps:g}")
        entry, silent = self._figures(x_adv, curve=(name, eps_key(eps), False))
        if adaptive and self.detector is not None and name in GRADIENT_ATTACKS:
            entry["adaptive"] = self._adaptive(name, eps, weights, silent)
        return entry

    def _adaptive(self, name: str, eps: float, weights, plain_silent: np.ndarray) -> dict:
        # The sweep starts at w = 0, the plain attack: an attacker may also ignore the detector.
        silent_any = plain_silent.copy()
        per_weight, worst_risk, worst_x, worst_w = [], -1.0, None, None
        for w in weights:
            attack = self._attack(name, adaptive=True)
            self._weight.assign(w)
            x_adv = attack_batches(attack, self.x, self.y, eps, self.batch_size, self.progress,
                                   desc=f"adaptive {name} eps={eps:g} w={w:g}")
            figures, silent = self._figures(x_adv)
            per_weight.append({"weight": w, **figures})
            silent_any |= silent
            if (figures["system_risk"] or 0.0) > worst_risk:
                worst_risk, worst_x, worst_w = figures["system_risk"] or 0.0, x_adv, w
        summary, _ = self._figures(worst_x, curve=(name, eps_key(eps), True))
        # The attacker picks the weight per image: an image is a silent failure if any weight made it one.
        n = int(self.clean_correct.sum())
        summary.update(system_risk=float(silent_any.sum() / n) if n else None, worst_weight=worst_w,
                       per_weight=per_weight)
        return summary

    def _attack(self, name: str, adaptive: bool = False):
        if (name, adaptive) not in self._attacks:
            hooks = {}
            if adaptive:
                import tensorflow as tf

                if self._weight is None:
                    self._weight = tf.Variable(0.0, trainable=False, name="adaptive_weight")
                objective, success = joint_objective(self.classifier, self.detector, self._weight)
                hooks = {"objective_fn": objective, "success_fn": success}
            self._attacks[name, adaptive] = make_attack(name, self.classifier, self.settings, **hooks)
        return self._attacks[name, adaptive]

    def _figures(self, x_adv: np.ndarray, curve: tuple | None = None) -> tuple[dict, np.ndarray]:
        """Report figures for one set of adversarial images, and which images failed silently."""
        wrong = self._predict(self.classifier, x_adv, self.batch_size) != self.y
        successful = self.clean_correct & wrong
        figures = {
            "robust_accuracy": float(np.mean(~wrong)),
            "attack_success_rate": float(successful.sum() / max(1, self.clean_correct.sum())),
            "max_linf": float(np.abs(x_adv - self.x).max()) if len(self.x) else 0.0,
        }
        if self.detector is None:
            figures.update(system_risk(self.clean_correct, wrong, np.zeros(len(wrong), bool)),
                           detection_auroc=None, tpr_at_fpr=None)
            return figures, successful
        scores = self._scores(x_adv)
        flagged = scores["combined"] > self.detector.threshold
        figures.update(system_risk(self.clean_correct, wrong, flagged))
        figures["detection_auroc"] = detection_auroc(self.clean_scores["combined"], scores["combined"][successful])
        figures["tpr_at_fpr"] = float(flagged[successful].mean()) if successful.any() else None
        figures["detection_auroc_parts"] = {
            part: detection_auroc(self.clean_scores[part], scores[part][successful]) for part in scores}
        if curve is not None and successful.any():
            self.curves[curve] = roc_points(self.clean_scores["combined"], scores["combined"][successful])
        return figures, successful & ~flagged

    def _scores(self, x: np.ndarray) -> dict[str, np.ndarray] | None:
        if self.detector is None:
            return None
        parts = [self.detector.score(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _logits(model, x, batch_size):
    import tensorflow as tf

    call = tf.function(lambda v: model(v, training=False), reduce_retracing=True)
    return np.concatenate([call(tf.constant(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
