"""Adversarial attacks as compiled TensorFlow functions on Keras logits models (eps in [0, 1] pixel scale)."""

from medrobust.attacks.apgd import APGD
from medrobust.attacks.cw import CarliniWagnerL2
from medrobust.attacks.driver import accuracy, attack_batches, predict_labels, robust_accuracy
from medrobust.attacks.fmn import FMN
from medrobust.attacks.losses import cross_entropy, dlr
from medrobust.attacks.pgd import PGD, fgsm, project
from medrobust.attacks.square import SquareAttack

__all__ = ["PGD", "fgsm", "project", "cross_entropy", "dlr", "attack_batches", "predict_labels", "accuracy",
           "robust_accuracy", "APGD", "CarliniWagnerL2", "FMN", "SquareAttack"]
