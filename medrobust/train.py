"""python -m medrobust.train: train a classifier (standard, SSAT, PGD-AT, TRADES) and the UAD detector.

Writes to --out: classifier.keras, detector/ (unless --detector false), config.json, metrics.json and
training_log.csv. Rerunning the same command after an interruption resumes from the last finished
epoch (Keras BackupAndRestore); rerunning a finished run does nothing unless --overwrite true.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
import time
from pathlib import Path

from medrobust import cli
from medrobust.io import atomic_save_model, atomic_write_json, read_json

METHODS = ("ssat", "standard", "pgd_at", "trades")
ATTACKS = ("fgsm", "pgd")
SSAT_LOSSES = ("ce", "trades")
STRATEGIES = ("none", "mirrored", "multiworker")
LR_SCHEDULES = ("cosine", "constant")
# Options that do not change the result, so a rerun with a different value still resumes.
NOT_PART_OF_RUN = {"overwrite", "progress", "tensorboard"}


def train(data: str = "auto", method: str = "ssat", label_fraction: float = 0.1, epochs: int = 10,
          image_size: int = 28, out: str = "runs/default", eps="0.001,0.003", lam: float | None = None,
          attack: str | None = None, ssat_loss: str = "ce", detector="true", seed: int = 0, arch: str = "small_cnn", width: int | None = None,
          batch_size: int = 64, unlabeled_batch_size: int | None = None, lr: float = 1e-3,
          lr_schedule: str = "cosine",
          pgd_steps: int = 10, train_eps: float = 0.004, beta: float = 6.0, confidence: float = 0.0,
          teacher: str | None = "snapshot", pretrain_epochs: float = 3.0, strategy: str = "none",
          detector_epochs: int = 10, target_fpr: float = 0.05, overwrite="false", tensorboard="false",
          progress="true") -> dict:
    """Train a classifier with the chosen method and, unless --detector false, the UAD detector.

    Args:
      data: auto | phantom | octmnist | PATH (.npz or a Kermany-style folder).
      method: ssat | standard | pgd_at | trades.
      label_fraction: share of training labels used (stratified); SSAT uses the rest as unlabeled data.
      epochs: training epochs; one epoch = ceil(n_train / batch_size) steps for every method.
      eps: SSAT's (--ssat-loss ce) per-sample budget range "min,max" in [0, 1] pixel scale (one value = fixed).
      lam: weight of SSAT's unlabeled-batch loss (default 3 for --ssat-loss ce, 1 for trades).
      attack: fgsm | pgd, how SSAT crafts its adversaries (pgd uses --pgd-steps); default fgsm for
        --ssat-loss ce, pgd for trades.
      ssat_loss: ce (the paper: lam * CE on adversaries of pseudo-labeled unlabeled scans) | trades
        (robust self-training, Carmon et al. 2019: TRADES on labeled and pseudo-labeled scans, with
        --train-eps, --pgd-steps and --beta as TRADES); see medrobust/training/ssat.py.
      lr_schedule: cosine (Adam's learning rate decays to 0 over all epochs) | constant. The decay
        also settles BatchNorm's moving statistics, so the final model is not a mid-swing snapshot.
      train_eps: the budget of PGD-AT, TRADES and SSAT --ssat-loss trades adversaries.
      beta: TRADES (and SSAT --ssat-loss trades) trade-off weight.
      confidence: SSAT pseudo-label confidence threshold tau (0 keeps all).
      teacher: where SSAT's pseudo-labels come from: snapshot (a frozen copy of the model taken after
        --pretrain-epochs of labeled-only training), none (the current model; unstable, see
        medrobust/training/ssat.py) or the path of a frozen classifier.keras.
      pretrain_epochs: SSAT's labeled-only epochs before its adversarial loss switches on (at most half
        of --epochs).
      strategy: none | mirrored | multiworker (tf.distribute).
      target_fpr: detector false-alarm rate on clean validation images.
    """
    options = dict(locals())
    options.update(
        method=_choice(method, METHODS, "method"), ssat_loss=_choice(ssat_loss, SSAT_LOSSES, "ssat-loss"),
        attack=None if attack is None else _choice(attack, ATTACKS, "attack"),
        strategy=_choice(strategy, STRATEGIES, "strategy"), eps=cli.parse_floats(eps, "eps"),
        lr_schedule=_choice(lr_schedule, LR_SCHEDULES, "lr-schedule"),
        detector=cli.parse_bool(detector, "detector"), overwrite=cli.parse_bool(overwrite, "overwrite"),
        tensorboard=cli.parse_bool(tensorboard, "tensorboard"), progress=cli.parse_bool(progress, "progress"),
        data=str(data), out=str(out),
    )
    _check_numbers(options)
    _check_data_argument(options["data"])
    out_dir = Path(options["out"])
    if _already_done(out_dir, options):
        print(f"{out_dir}: this run is already complete (metrics.json); pass --overwrite true to train again")
        return read_json(out_dir / "metrics.json")
    return _train(options, out_dir)


def _train(o: dict, out_dir: Path) -> dict:
    from medrobust.data import load_data

    # Data first: a bad dataset fails in a second, before TensorFlow loads.
    data = load_data(o["data"], image_size=o["image_size"], seed=o["seed"])
    cli.import_tensorflow()
    import keras
    import numpy as np
    from medrobust.data.pipeline import eval_dataset, steps_per_epoch, train_dataset
    from medrobust.data.splits import labeled_unlabeled_split
    from medrobust.models import build_classifier, load_classifier
    from medrobust.attacks import accuracy
    from medrobust.training import make_trainer

    keras.utils.set_random_seed(o["seed"])
    print(f"data: {data.describe()}")
    x_train, y_train = data["train"]
    labeled, unlabeled = labeled_unlabeled_split(y_train, o["label_fraction"], o["seed"])
    semi = o["method"] == "ssat" and len(unlabeled) > 0
    print(f"labels: {len(labeled)} labeled, {len(unlabeled)} unlabeled (fraction {o['label_fraction']})")

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**{k: v for k, v in o.items() if k not in NOT_PART_OF_RUN}, "data_source": data.source,
              "synthetic_data": data.synthetic, "n_labeled": int(len(labeled)), "n_unlabeled": int(len(unlabeled)),
              "split_sizes": {s: int(len(data[s][1])) for s in data.splits}, "versions": package_versions(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    atomic_write_json(out_dir / "config.json", config)

    steps = steps_per_epoch(len(x_train), o["batch_size"])
    strategy = make_strategy(o["strategy"])
    with strategy.scope():
        classifier = build_classifier(o["arch"], o["image_size"], o["width"])
        options = trainer_options(o, load_classifier, steps)
        trainer = make_trainer(o["method"], classifier, **options)
        if o["method"] == "ssat":
            print(f"ssat ({o['ssat_loss']}, {trainer.attack}): {options['pretrain_steps']} labeled-only steps, "
                  f"then lam {trainer.lam} with pseudo-labels "
                  f"from {o['teacher'] if options['teacher'] is not None else 'the current model'}")
        trainer.compile(optimizer=keras.optimizers.Adam(learning_rate(o, steps)))
        # BackupAndRestore needs built weights and optimizer slots to restore into.
        trainer(np.zeros((1, o["image_size"], o["image_size"], 1), np.float32))
        trainer.optimizer.build(classifier.trainable_variables)

    train_ds = train_dataset(x_train[labeled], y_train[labeled], o["batch_size"], o["seed"],
                             x_unlabeled=x_train[unlabeled] if semi else None,
                             unlabeled_batch_size=o["unlabeled_batch_size"] or o["batch_size"])
    callbacks = [
        keras.callbacks.BackupAndRestore(str(out_dir / "backup"), delete_checkpoint=True),
        keras.callbacks.CSVLogger(str(out_dir / "training_log.csv"), append=True),
    ]
    if o["tensorboard"]:
        callbacks.append(keras.callbacks.TensorBoard(str(out_dir / "tensorboard")))
    started = time.time()
    trainer.fit(train_ds, epochs=o["epochs"], steps_per_epoch=steps, validation_data=eval_dataset(*data["val"]),
                callbacks=callbacks, shuffle=False, verbose=(1 if sys.stdout.isatty() else 2) if o["progress"] else 0)
    train_seconds = time.time() - started
    atomic_save_model(classifier, out_dir / "classifier.keras")

    x_test, y_test = data["test"]
    metrics = {
        "clean_accuracy": accuracy(classifier, x_test, y_test),
        "val_accuracy": accuracy(classifier, *data["val"]),
        "method": o["method"], "label_fraction": o["label_fraction"], "epochs": o["epochs"],
        "steps_per_epoch": steps, "train_seconds_last_session": round(train_seconds, 2),
        "data_source": data.source, "synthetic_data": data.synthetic, "n_test": int(len(y_test)),
    }
    print(f"clean test accuracy: {metrics['clean_accuracy']:.4f} on {len(y_test)} images"
          + (" (SYNTHETIC phantom)" if data.synthetic else ""))
    if o["detector"]:
        from medrobust.detection import train_detector

        metrics.update(train_detector(classifier, data, out_dir, epochs=o["detector_epochs"], seed=o["seed"],
                                      target_fpr=o["target_fpr"], progress=o["progress"]))
    atomic_write_json(out_dir / "metrics.json", metrics)
    print(f"wrote {out_dir}")
    return metrics


def trainer_options(o: dict, load_classifier, steps_per_epoch: int = 1) -> dict:
    """The keyword arguments each method's Trainer takes, from the CLI options."""
    if o["method"] == "ssat":
        eps = o["eps"] if len(o["eps"]) == 2 else (o["eps"][0], o["eps"][0])
        trades = o.get("ssat_loss", "ce") == "trades"  # RST: TRADES' budget, steps and beta
        teacher = o.get("teacher")
        if teacher is None or str(teacher).lower() == "none":
            teacher = None
        elif teacher != "snapshot":
            teacher = load_classifier(teacher)
        pretrain = min(float(o.get("pretrain_epochs", 0.0)), o.get("epochs", 0) / 2)
        return dict(eps_range=(o["train_eps"],) * 2 if trades else eps, lam=o["lam"], attack=o["attack"],
                    pgd_steps=o["pgd_steps"], confidence=o["confidence"], teacher=teacher,
                    loss=o.get("ssat_loss", "ce"), beta=o.get("beta", 6.0),
                    # A snapshot needs at least one labeled-only step, even for a one-batch epoch.
                    pretrain_steps=max(int(teacher == "snapshot"), round(pretrain * steps_per_epoch)))
    if o["method"] == "pgd_at":
        return dict(eps=o["train_eps"], steps=o["pgd_steps"])
    if o["method"] == "trades":
        return dict(eps=o["train_eps"], steps=o["pgd_steps"], beta=o["beta"])
    return {}


def learning_rate(o: dict, steps_per_epoch: int):
    """Adam's learning rate: a float, or a cosine decay to 0 over every step of the run."""
    import keras

    if o.get("lr_schedule", "constant") == "constant":
        return o["lr"]
    return keras.optimizers.schedules.CosineDecay(o["lr"], decay_steps=o["epochs"] * steps_per_epoch)


def make_strategy(name: str):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def package_versions() -> dict:
    names = ("medrobust", "tensorflow", "keras", "numpy", "scikit-learn", "tf2onnx", "onnxruntime", "ai-edge-litert")
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _already_done(out_dir: Path, options: dict) -> bool:
    """True if out_dir holds a finished run of these options; an error if it holds a different run."""
    config_path = out_dir / "config.json"
    if options["overwrite"]:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        return False
    if not config_path.exists():
        return False
    old = read_json(config_path)
    changed = sorted(k for k, v in options.items()
                     if k not in NOT_PART_OF_RUN and _normal(old.get(k)) != _normal(v))
    if changed:
        raise cli.UsageError(f"{out_dir} holds a run with other options ({', '.join(changed)}); "
                             "use another --out or --overwrite true")
    return (out_dir / "metrics.json").exists()


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _choice(value, allowed, name):
    value = str(value).lower()
    if value not in allowed:
        raise cli.UsageError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_numbers(o: dict) -> None:
    if not 0 < o["label_fraction"] <= 1:
        raise cli.UsageError(f"--label-fraction must be in (0, 1], got {o['label_fraction']}")
    if any(not 0 <= e <= 1 for e in o["eps"]) or len(o["eps"]) > 2:
        raise cli.UsageError(f"--eps takes one or two values in [0, 1] (min,max), got {o['eps']}")
    for name in ("epochs", "image_size", "batch_size", "pgd_steps", "detector_epochs"):
        if int(o[name]) < 1:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {o[name]}")
    if not o["lr"] > 0:
        raise cli.UsageError(f"--lr must be > 0, got {o['lr']}")
    if (o["lam"] is not None and o["lam"] < 0) or o["pretrain_epochs"] < 0:
        raise cli.UsageError(f"--lam and --pretrain-epochs must be >= 0, got {o['lam']} and {o['pretrain_epochs']}")
    if o["method"] == "ssat" and o["teacher"] == "snapshot" and o["pretrain_epochs"] == 0:
        raise cli.UsageError("--teacher snapshot needs --pretrain-epochs > 0 (or pass --teacher none or a path)")
    if not 0 < o["target_fpr"] < 1:
        raise cli.UsageError(f"--target-fpr must be in (0, 1), got {o['target_fpr']}")


def _check_data_argument(data: str) -> None:
    """Fail before TensorFlow loads if the data argument cannot be right."""
    if data not in ("auto", "phantom", "octmnist") and not Path(data).expanduser().exists():
        raise cli.UsageError(f"--data {data}: no such file or folder (expected auto, phantom, octmnist, a .npz or a folder)")


def main() -> None:
    cli.run(train)


if __name__ == "__main__":
    main()
