"""Training methods as Keras Trainers that wrap a classifier: standard, SSAT, PGD-AT, TRADES, MART."""

from __future__ import annotations

from medrobust.training.base import Trainer
from medrobust.training.ssat import SSATTrainer
from medrobust.training.supervised import MARTTrainer, PGDATTrainer, TRADESTrainer

TRAINERS: dict[str, type[Trainer]] = {"standard": Trainer, "ssat": SSATTrainer, "pgd_at": PGDATTrainer,
                                      "trades": TRADESTrainer, "mart": MARTTrainer}


def make_trainer(method: str, classifier, **options) -> Trainer:
    if method not in TRAINERS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(TRAINERS)}")
    return TRAINERS[method](classifier, **options)
