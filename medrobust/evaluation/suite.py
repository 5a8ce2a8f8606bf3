"""The attacks `python -m medrobust.evaluate` runs, by name, with their norms and default strengths.

Each attack is reported under its own threat model: FGSM, PGD, APGD, Square and FMN are L-inf attacks
(budget eps in [0, 1] pixel scale: every pixel may move by eps); Carlini-Wagner is an L2 attack, reported
against L2 budgets (the Euclidean length of the whole perturbation, pixel units), never in an L-inf table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The adaptive attacker's trade-off weights (medrobust.evaluation.adaptive). Defined here, in a module
# without TensorFlow, so the CLI checks its options before TensorFlow loads.
DEFAULT_WEIGHTS = (0.1, 1.0, 10.0)

ATTACK_NAMES = ("fgsm", "pgd", "apgd", "cw", "square", "fmn")
DEFAULT_ATTACKS = ("fgsm", "pgd", "apgd", "cw", "square", "fmn")
GRADIENT_ATTACKS = ("pgd", "apgd")  # the ones with an adaptive (classifier + detector) version
NORMS = {"fgsm": "linf", "pgd": "linf", "apgd": "linf", "square": "linf", "fmn": "linf", "cw": "l2"}
MINIMUM_NORM = ("fmn", "cw")  # run once; every budget is read off the smallest adversarial found


@dataclass
class AttackSettings:
    pgd_steps: int = 20
    apgd_steps: int = 100
    cw_steps: int = 100
    cw_search_steps: int = 5
    square_queries: int = 1000
    fmn_steps: int = 100
    seed: int = 0
    weights: tuple[float, ...] = DEFAULT_WEIGHTS

    def describe(self, name: str) -> str:
        """One line saying exactly what attack `name` is (for report.md)."""
        return {
            "fgsm": "FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps, cross-entropy",
            "pgd": f"PGD-{self.pgd_steps} (Madry et al. 2018): L-inf, cross-entropy, one random start, "
                   f"step 2.5 eps / {self.pgd_steps}",
            "apgd": f"APGD-CE-{self.apgd_steps} (Croce & Hein 2020): L-inf, cross-entropy, one random start",
            "cw": f"Carlini-Wagner L2 (2017): {self.cw_search_steps} binary-search steps x {self.cw_steps} Adam "
                  "steps, minimal perturbation projected onto each L2 budget",
            "square": f"Square Attack (Andriushchenko et al. 2020): L-inf, score-based black box, "
                      f"{self.square_queries} queries per image",
            "fmn": f"FMN-L-inf-{self.fmn_steps} (Pintor et al. 2021): minimum-norm, one run gives every budget",
        }[name]

    def as_dict(self) -> dict:
        return {**asdict(self), "weights": list(self.weights)}


def make_attack(name: str, classifier, settings: AttackSettings, objective_fn=None, success_fn=None):
    """The attack object for a name: PGD/APGD/FGSM/SquareAttack take (x, y, eps) (x_init too, except
    FGSM); FMN and CarliniWagnerL2 are minimum-norm (their `find` gives every budget at once).
    objective_fn/success_fn make PGD/APGD adaptive."""
    from medrobust.attacks import APGD, FMN, PGD, CarliniWagnerL2, SquareAttack, fgsm

    if name == "fgsm":
        return fgsm(classifier)
    if name == "pgd":
        return PGD(classifier, steps=settings.pgd_steps, objective_fn=objective_fn, success_fn=success_fn)
    if name == "apgd":
        return APGD(classifier, steps=settings.apgd_steps, loss="ce", objective_fn=objective_fn, success_fn=success_fn)
    if name == "cw":
        return CarliniWagnerL2(classifier, steps=settings.cw_steps, binary_search_steps=settings.cw_search_steps)
    if name == "square":
        return SquareAttack(classifier, n_queries=settings.square_queries, seed=settings.seed, output="logits")
    if name == "fmn":
        return FMN(classifier, norm="linf", steps=settings.fmn_steps)
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACK_NAMES)}")
