"""The attacks `python -m medrobust.evaluate` runs, by name, with their default strengths.

All budgets are L-inf in [0, 1] pixel scale. Carlini-Wagner is an L2 attack: at budget eps it is projected
onto the L2 ball of radius eps * sqrt(pixels), the L2 size of a full-strength L-inf perturbation, so
each column of the report compares attacks that may move every pixel by eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATTACK_NAMES = ("fgsm", "pgd", "apgd", "cw", "square")
GRADIENT_ATTACKS = ("pgd", "apgd")  # the ones with an adaptive (classifier + detector) version


@dataclass
class AttackSettings:
    pgd_steps: int = 20
    apgd_steps: int = 100
    cw_steps: int = 100
    cw_search_steps: int = 5
    square_queries: int = 1000
    seed: int = 0


def make_attack(name: str, classifier, settings: AttackSettings, objective_fn=None, success_fn=None):
    """attack(x, y, eps) for a named attack; objective_fn/success_fn make PGD/APGD adaptive."""
    from medrobust.attacks import PGD, fgsm
    from medrobust.attacks.apgd import APGD
    from medrobust.attacks.cw import CarliniWagnerL2
    from medrobust.attacks.square import SquareAttack, keras_predict_fn

    if name == "fgsm":
        return fgsm(classifier)
    if name == "pgd":
        return PGD(classifier, steps=settings.pgd_steps, objective_fn=objective_fn, success_fn=success_fn)
    if name == "apgd":
        return APGD(classifier, steps=settings.apgd_steps, loss="ce", objective_fn=objective_fn, success_fn=success_fn)
    if name == "cw":
        cw = CarliniWagnerL2(classifier, steps=settings.cw_steps, binary_search_steps=settings.cw_search_steps)
        return lambda x, y, eps: cw(x, y, np.asarray(eps, np.float32) * np.sqrt(np.prod(np.shape(x)[1:])))
    if name == "square":
        return SquareAttack(keras_predict_fn(classifier), n_queries=settings.square_queries, seed=settings.seed)
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACK_NAMES)}")
