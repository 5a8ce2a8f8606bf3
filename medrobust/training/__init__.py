"""Training methods as Keras Trainers that wrap a classifier: standard, SSAT, PGD-AT, TRADES."""

from __future__ import annotations

from medrobust.training.base import Trainer

TRAINERS: dict[str, type[Trainer]] = {"standard": Trainer}


def make_trainer(method: str, classifier, **options) -> Trainer:
    if method not in TRAINERS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(TRAINERS)}")
    return TRAINERS[method](classifier, **options)
