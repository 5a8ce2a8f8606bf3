"""Attack a classifier (and its detector) over a budget sweep and collect every figure of the report.

A sweep is cheap where it can be without weakening any attack:
- only images the classifier gets right when clean are attacked (a clean error is already a failure
  at every budget, and no figure of the report reads its adversary);
- budgets are visited in ascending order. An image fooled at a smaller budget keeps that adversary (it
  lies inside every larger ball), and the others start from where the last budget's attack left them
  (the point of highest loss) instead of a random point;
- minimum-norm attacks (FMN, C&W) run once; every budget is read off each image's smallest adversary;
- the adaptive attacker (PGD/APGD on classifier + detector) sweeps its weights only over the images the
  plain attack fooled but the detector caught, starting from the plain adversary, and drops an image as
  soon as one weight hides it (the report counts an image hidden if ANY weight hides it). An image the
  plain attack could not misclassify within eps counts as not hidden: the adaptive objective's
  classifier term is the plain attack's, weakened by the detector term;
- every image hidden at a smaller budget stays hidden at the larger ones (same adversary).
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from medrobust.attacks.driver import predict_labels, predict_probabilities
from medrobust.classes import CLASSES
from medrobust.evaluation.adaptive import joint_objective
from medrobust.evaluation.metrics import balanced_accuracy, clinical_metrics, detection_auroc, roc_points, wilson_ci
from medrobust.evaluation.referral import operating_points
from medrobust.evaluation.risk import clean_false_referral_rate, system_risk
from medrobust.evaluation.suite import GRADIENT_ATTACKS, NORMS, AttackSettings, make_attack


def eps_key(eps: float) -> str:
    return f"{eps:g}"


class SystemEvaluator:
    """Holds the clean-side results so each (attack, eps) only costs its attack and one scoring pass.

    classifier: Keras logits model; detector: a medrobust Detector watching it, or None; x float32
    [n, s, s, 1] in [0, 1]; y int [n]. `sweep(name, budgets)` yields one report entry per budget.
    """

    def __init__(self, classifier, detector, x: np.ndarray, y: np.ndarray, settings: AttackSettings | None = None,
                 batch_size: int = 250, progress: bool = True, referral_threshold: float | None = None):
        """referral_threshold: the run's disease-vs-NORMAL threshold on 1 - P(NORMAL) (chosen on val at
        training, medrobust.evaluation.referral), or None to refer at the arg-max decision."""
        self.classifier, self.detector = classifier, detector
        self.referral_threshold = referral_threshold
        self.x, self.y = np.asarray(x, np.float32), np.asarray(y).astype(np.int64)
        self.settings = settings or AttackSettings()
        self.batch_size, self.progress = batch_size, progress
        self.clean_probs = predict_probabilities(classifier, self.x, batch_size)
        self.clean_correct = self.clean_probs.argmax(1) == self.y
        self.clean_scores = self._scores(self.x)
        # One attack object per name (and one adaptive one, whose weight is a variable), so each is
        # traced once for the whole sweep instead of once per budget and weight.
        self._attacks: dict = {}
        self._weight = None

    def clean_report(self) -> dict:
        out = clinical_metrics(self.y, self.clean_probs)
        report = {"clean_accuracy": out.pop("accuracy"), "clean_accuracy_ci95": out.pop("accuracy_ci95"),
                  "clean_balanced_accuracy": balanced_accuracy(out["per_class"]), **out,
                  "referral": operating_points(self.clean_probs, self.y, self.referral_threshold)}
        if self.detector is not None:
            flagged = self.clean_scores["combined"] > self.detector.threshold
            report["detector"] = {"threshold": float(self.detector.threshold),
                                  "clean_false_referral_rate": clean_false_referral_rate(flagged),
                                  "clean_false_referral_rate_ci95": wilson_ci(flagged.sum(), len(flagged))}
        return report

    # -- the sweep -------------------------------------------------------------------------------------
    def sweep(self, name: str, budgets, adaptive: bool = False, carry: dict | None = None,
              done=()) -> Iterator[tuple[float, dict, dict, dict | None]]:
        """Yield (eps, entry, curves, carry) for each budget not in `done` (eps keys), smallest first.

        budgets are in the attack's own norm (L2 for 'cw'). carry is what the next budget starts from
        (and what a resumed sweep passes back in): the adversaries so far, or a minimum-norm attack's
        result. curves: ROC points for the plots, {(attack, eps_key, adaptive): (fpr, tpr)}.
        """
        for eps in sorted(float(e) for e in budgets):
            if eps_key(eps) in done:
                continue
            import keras

            # Reseeded per (attack, budget): a resumed evaluation draws what an uninterrupted one would.
            keras.utils.set_random_seed(self.settings.seed + _stable_hash(f"{name}:{eps_key(eps)}"))
            started = time.perf_counter()
            curves: dict = {}
            entry, carry = self._entry(name, eps, carry, adaptive, curves)
            entry["seconds"] = round(time.perf_counter() - started, 1)
            yield eps, entry, curves, carry

    def _entry(self, name, eps, carry, adaptive, curves):
        cc = self.clean_correct
        x_adv = self.x.copy()
        key = eps_key(eps)
        if name == "fgsm":
            idx = np.flatnonzero(cc)
            x_adv[idx] = self._run(name, idx, eps)
        elif name in ("fmn", "cw"):
            if carry is None:
                carry = self._minimum_norm(name)
            if name == "fmn":
                inside = carry["norms"] <= eps
                x_adv[inside] = carry["x_min"][inside]
            else:
                from medrobust.attacks.pgd import _project_np

                idx = np.flatnonzero(cc)
                x_adv[idx] = _project_np(carry["x_min"][idx], self.x[idx], np.full(len(idx), eps, np.float32), "l2")
        else:  # pgd, apgd, square: warm start from the last budget
            prev = carry if carry is not None and carry["eps"] <= eps else None
            reuse = prev["fooled"] if prev is not None else np.zeros(len(cc), bool)
            x_adv[reuse] = prev["x_adv"][reuse] if prev is not None else x_adv[reuse]
            idx = np.flatnonzero(cc & ~reuse)
            x_init = None
            if prev is not None:
                x_init = prev["x_adv"][idx]
                if name == "square":  # Square searches the vertices of the ball: scale them out to eps
                    x_init = np.clip(self.x[idx] + (x_init - self.x[idx]) * (eps / prev["eps"]), 0.0, 1.0)
            x_adv[idx] = self._run(name, idx, eps, x_init)
        entry, wrong, flagged = self._figures(x_adv, name, curves, (name, key, False))
        entry["images_attacked"] = int(cc.sum()) if name in ("fmn", "cw", "fgsm") else int(len(idx))
        if name in ("pgd", "apgd", "square"):
            carry = {"eps": eps, "x_adv": x_adv, "fooled": cc & wrong}
        if adaptive and self.detector is not None and name in GRADIENT_ATTACKS:
            entry["adaptive"], carry["adaptive"] = self._adaptive(name, eps, x_adv, wrong, flagged,
                                                                  carry.get("adaptive") if prev else None, curves)
        return entry, carry

    def _adaptive(self, name, eps, plain_x, plain_wrong, plain_flagged, prev, curves):
        cc = self.clean_correct
        hidden = cc & plain_wrong & ~plain_flagged  # the plain attacker already slipped these through
        x_worst = plain_x.copy()
        if prev is not None:  # hidden at a smaller budget: the same adversary hides here too
            reuse = prev["hidden"] & ~hidden
            x_worst[reuse] = prev["x_hidden"][reuse]
            hidden |= prev["hidden"]
        caught = cc & plain_wrong & plain_flagged & ~hidden
        per_weight = []
        for w in self.settings.weights:
            idx = np.flatnonzero(caught & ~hidden)
            found = np.zeros(len(idx), bool)
            if len(idx):
                self._attack(name, adaptive=True)
                self._weight.assign(w)
                x_w = self._run(name, idx, eps, plain_x[idx], adaptive=True, desc=f"adaptive {name} w={w:g}")
                found = self._silent(x_w, idx)
                x_worst[idx] = x_w
                hidden[idx[found]] = True
            per_weight.append({"weight": float(w), "images_attacked": int(len(idx)), "newly_hidden": int(found.sum())})
        summary, _, _ = self._figures(x_worst, name, curves, (name, eps_key(eps), True))
        n_cc = int(cc.sum())
        # By construction x_worst holds a silent failure for every hidden image; the figures agree.
        summary.update(system_risk=float(hidden.sum() / n_cc) if n_cc else None,
                       system_risk_ci95=wilson_ci(hidden.sum(), n_cc), n_hidden=int(hidden.sum()),
                       images_swept=int(caught.sum()), per_weight=per_weight,
                       worst_weight=max(per_weight, key=lambda p: p["newly_hidden"])["weight"]
                       if any(p["newly_hidden"] for p in per_weight) else None)
        return summary, {"hidden": hidden, "x_hidden": x_worst}

    # -- running attacks -------------------------------------------------------------------------------
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

    def _run(self, name, idx, eps, x_init=None, adaptive=False, desc=None) -> np.ndarray:
        """Adversaries of the images idx (in batches, with a progress bar)."""
        from tqdm.auto import tqdm

        attack = self._attack(name, adaptive)
        out = np.empty((len(idx),) + self.x.shape[1:], np.float32)
        bar = tqdm(total=len(idx), desc=desc or f"{name} eps={eps:g}", unit="img",
                   disable=None if self.progress else True, leave=False)  # None: only on a terminal
        for start in range(0, len(idx), self.batch_size):
            part = idx[start:start + self.batch_size]
            xs, ys = self.x[part], self.y[part]
            init = None if x_init is None else x_init[start:start + self.batch_size]
            if name == "fgsm":
                result = attack(xs, ys, eps)
            else:
                result = attack.run(xs, ys, eps, x_init=init)[0]
            out[start:start + len(part)] = np.asarray(result)
            bar.update(len(part))
        bar.close()
        return out

    def _minimum_norm(self, name) -> dict:
        """FMN (L-inf) or C&W (L2) on the clean-correct images: each one's smallest adversary and its norm
        (0 for clean errors, inf where none was found)."""
        from tqdm.auto import tqdm

        attack = self._attack(name)
        idx = np.flatnonzero(self.clean_correct)
        x_min, norms = self.x.copy(), np.zeros(len(self.x), np.float32)
        bar = tqdm(total=len(idx), desc=name, unit="img", disable=None if self.progress else True, leave=False)
        for start in range(0, len(idx), self.batch_size):
            part = idx[start:start + self.batch_size]
            if name == "fmn":
                x_min[part], norms[part] = attack.find(self.x[part], self.y[part])
            else:
                x_min[part], success, l2 = attack.find(self.x[part], self.y[part])
                norms[part] = np.where(success, l2, np.inf)
            bar.update(len(part))
        bar.close()
        return {"x_min": x_min, "norms": norms}

    # -- figures ---------------------------------------------------------------------------------------
    def _silent(self, x_sub: np.ndarray, idx: np.ndarray) -> np.ndarray:
        wrong = predict_labels(self.classifier, x_sub, self.batch_size) != self.y[idx]
        return wrong & ~(self._scores(x_sub)["combined"] > self.detector.threshold)

    def _figures(self, x_adv: np.ndarray, name: str, curves: dict, curve: tuple):
        """Report figures for one set of adversarial images, with 95% Wilson intervals for every
        proportion; also which images are misclassified and which flagged."""
        probs = predict_probabilities(self.classifier, x_adv, self.batch_size)
        wrong = probs.argmax(1) != self.y
        cc = self.clean_correct
        n, n_cc = len(self.y), int(cc.sum())
        successful = cc & wrong
        delta = (x_adv - self.x).reshape(n, -1)
        figures = {
            "robust_accuracy": float(np.mean(~wrong)) if n else None,
            "attack_success_rate": float(successful.sum() / n_cc) if n_cc else None,
            "n_images": n, "n_clean_correct": n_cc, "n_successful": int(successful.sum()),
            "max_linf": float(np.abs(delta).max()) if n else 0.0,
            "max_l2": float(np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)).max()) if n else 0.0,
        }
        # Per-class robust sensitivity: the share of each class's scans still diagnosed correctly under attack.
        figures["robust_sensitivity"] = {c: float(np.mean(~wrong[self.y == k])) if np.any(self.y == k) else None
                                         for k, c in enumerate(CLASSES)}
        # Balanced robust accuracy: the mean of those (every class counts alike, however rare).
        present = [v for v in figures["robust_sensitivity"].values() if v is not None]
        figures["balanced_robust_accuracy"] = float(np.mean(present)) if present else None
        # Disease-vs-NORMAL referral of the attacked scans at the run's operating point (and arg-max).
        figures["referral"] = operating_points(probs, self.y, self.referral_threshold)
        ci = {"robust_accuracy": wilson_ci((~wrong).sum(), n), "attack_success_rate": wilson_ci(successful.sum(), n_cc)}
        if self.detector is None:
            flagged = np.zeros(n, bool)
            figures.update(system_risk(cc, wrong, flagged), detection_auroc=None, tpr_at_fpr=None)
        else:
            scores = self._scores(x_adv)
            flagged = scores["combined"] > self.detector.threshold
            figures.update(system_risk(cc, wrong, flagged))
            figures["detection_auroc"] = detection_auroc(self.clean_scores["combined"], scores["combined"][successful])
            figures["tpr_at_fpr"] = float(flagged[successful].mean()) if successful.any() else None
            ci["tpr_at_fpr"] = wilson_ci((flagged & successful).sum(), successful.sum())
            figures["detection_auroc_parts"] = {
                part: detection_auroc(self.clean_scores[part], scores[part][successful]) for part in scores}
            if successful.any():
                curves[curve] = roc_points(self.clean_scores["combined"], scores["combined"][successful])
        ci["system_risk"] = wilson_ci((successful & ~flagged).sum(), n_cc)
        ci["classifier_only_risk"] = wilson_ci(successful.sum(), n_cc)
        figures["ci95"] = ci
        return figures, wrong, flagged

    def _scores(self, x: np.ndarray) -> dict[str, np.ndarray] | None:
        if self.detector is None:
            return None
        if len(x) == 0:
            return {"combined": np.zeros(0, np.float32)}
        parts = [self.detector.score(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode()) % 100_000

