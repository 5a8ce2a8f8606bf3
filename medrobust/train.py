"""python -m medrobust.train: train a classifier (standard, SSAT, PGD-AT, TRADES) and the UAD detector.

Writes to --out: classifier.keras, detector/ (unless --detector false), config.json, metrics.json and
training_log.csv; --method ssat with its default --teacher standard also teacher/ (the standard run whose
pseudo-labels it learns from, a run folder of its own, reused when its options match). Rerunning the same command after an interruption resumes from the last finished
epoch (Keras BackupAndRestore); rerunning a finished run does nothing unless --overwrite true.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path

from medrobust import cli
from medrobust.io import atomic_save_model, atomic_write_json, package_versions, read_json

METHODS = ("ssat", "standard", "pgd_at", "trades", "mart")
ATTACKS = ("fgsm", "pgd", "free")
SSAT_LOSSES = ("auto", "ce", "trades")
TEACHERS = ("auto", "standard", "snapshot", "none")  # or the path of a classifier.keras
# --method ssat's defaults (the recipe that met the safety targets on real scans, README "Which defence"):
# robust self-training (--ssat-loss trades) with pseudo-labels from a standard model trained first on the
# same labels (--teacher standard, into OUT/teacher), its adversaries from the update's own backward pass
# (--attack free: the only form under 5x a standard step, benchmarks/ssat_step.py, at --train-eps auto =
# 2/255; --attack pgd is the PGD-10 form measured in the README). --ssat-loss ce --teacher snapshot is the
# paper's form.
SSAT_DEFAULTS = {"ssat_loss": "trades", "teacher": "standard"}
RST_ATTACK = "free"  # --attack when --ssat-loss trades and none is given
FREE_NOISE = 0.0  # --free-noise when --attack free and none is given
# --train-eps auto: the free form's single step from the image needs twice PGD-10's budget (0.008, just above
# 2/255, the value measured) to match its robustness (kermany/val, three seeds: README "Which defence");
# every other robust method trains at 0.004 (just above 1/255).
TRAIN_EPS, FREE_TRAIN_EPS = 0.004, 0.008
# Other methods ignore these; their config.json keeps the values recorded before the SSAT defaults
# changed, so reruns of earlier standard/PGD-AT/TRADES runs still resume.
OTHER_DEFAULTS = {"ssat_loss": "ce", "teacher": "snapshot"}
TEACHER_FOLDER = "teacher"  # OUT/teacher: the --teacher standard run (a normal run folder, the run's own)
# The options the --teacher standard run takes from its SSAT run (every other option at its default).
TEACHER_SHARED = ("data", "label_fraction", "epochs", "image_size", "seed", "arch", "width", "batch_size", "lr",
                  "lr_schedule", "ema", "strategy", "augment", "class_weight", "sampling", "weights", "overwrite",
                  "tensorboard", "progress")
STRATEGIES = ("none", "mirrored", "multiworker")
LR_SCHEDULES = ("cosine", "constant")
ARCHS = ("auto", "small_cnn", "strided_cnn", "mobilenet_v3_small", "resnet18")  # medrobust.models.ARCHITECTURES
# Smallest --image-size each architecture can take (checked before TensorFlow loads): small_cnn has two 2x2
# max-pools, strided_cnn one more stride 2; mobilenet: medrobust.models.mobilenet.MIN_SIZE; the UAD
# autoencoder needs 4 (medrobust.detection.autoencoder).
ARCH_MIN_SIZE = {"small_cnn": 4, "strided_cnn": 8, "mobilenet_v3_small": 32, "resnet18": 4}
STRIDED_FROM = 64  # --arch auto: image size from which the strided stem pays (README, "Training on real scans")
AUGMENT = ("auto", "true", "false")
CLASS_WEIGHTS = ("balanced", "none")
SAMPLINGS = ("natural", "balanced")  # medrobust.data.pipeline.SAMPLINGS (checked before TensorFlow loads)
DETECTOR_PARTS = ("reconstruction", "feature", "mahalanobis", "mahalanobis_early", "mahalanobis_middle", "residual",
                  "squeeze_bits", "squeeze_median", "boundary")  # medrobust.detection.ALL_PARTS (checked before TF loads)
# Options that do not change the result, so a rerun with a different value still resumes.
NOT_PART_OF_RUN = {"overwrite", "progress", "tensorboard"}
# ... and the folder itself, written another way (relative, trailing slash): not compared on a rerun.
NOT_COMPARED = NOT_PART_OF_RUN | {"out"}
# Options added after runs were written: a config.json without them was trained with these values.
ADDED_LATER = {"sampling": "natural", "referral_sensitivity": 0.95, "pseudo_class_weight": "none", "free_noise": 0.0,
               "ema": 0.0}
# What this command writes into --out (and all --overwrite may remove): files, and folders with the
# files in them that are ours (the detector's, see medrobust.detection.detector; Keras BackupAndRestore's;
# TensorBoard's event files).
RUN_FILES = ("classifier.keras", "config.json", "metrics.json", "training_log.csv")
RUN_FOLDER_FILES = {"detector": ("autoencoder.keras", "detector.json", "stats.npz"),
                    "backup": ("latest.weights.h5", "training_metadata.json", "latest.weights.h5.bkp",
                               "training_metadata.json.bkp")}


def train(data: str = "auto", method: str = "ssat", label_fraction: float = 0.1, unlabeled: str | None = None,
          epochs: str = "auto",
          image_size: int = 28, out: str = "runs/default", eps="0.001,0.003", lam: float | None = None,
          attack: str | None = None, free_noise: float | None = None, ssat_loss: str = "auto", detector="true",
          seed: int = 0, arch: str = "auto",
          width: int | None = None,
          batch_size: int = 64, unlabeled_batch_size: int | None = None, lr: float = 1e-3,
          lr_schedule: str = "cosine", ema: float = 0.0,
          pgd_steps: int = 10, train_eps="auto", beta: float = 6.0, confidence: float = 0.0,
          teacher: str | None = "auto", pretrain_epochs: float = 3.0, strategy: str = "none",
          detector_epochs: int = 10, target_fpr: float = 0.05, detector_parts: str = "default", augment: str = "auto",
          class_weight: str = "balanced",
          sampling: str = "natural", referral_sensitivity: float = 0.95, pseudo_class_weight: str = "none",
          weights: str | None = None, overwrite="false", tensorboard="false", progress="true") -> dict:
    """Train a classifier with the chosen method and, unless --detector false, the UAD detector.

    Args:
      data: auto | phantom | octmnist | PATH (.npz or a Kermany-style folder). auto: OCTMNIST if on disk
        or downloadable (MD5-checked), else the SYNTHETIC phantom with a warning. The data actually used
        is recorded in config.json; evaluate and export use it by default.
      method: ssat | standard | pgd_at | trades | mart (Wang et al. 2020: boosted CE on PGD adversaries +
        beta * KL weighted by the clean misclassification, medrobust/training/supervised.py). ssat by
        default trains the recipe that met the safety targets on real scans in one command: a standard
        teacher on the same labeled subset (into OUT/teacher, reused when its options match), then
        SSAT's robust self-training form with that teacher's pseudo-labels, then the UAD detector.
      label_fraction: share of training labels used (stratified), in (0, 1]; SSAT uses the rest as
        unlabeled data.
      unlabeled: (--method ssat) a pool of scans that were never labeled, added to SSAT's unlabeled
        stream: a folder of image files (recursively, any names; a class-folder tree's labels are
        ignored) or an OCTMNIST-style .npz (its train images). Read with the data loaders at
        --image-size; files that fail to load are skipped and named. Refused if it shares a patient
        (Kermany file names) or an identical image with the val or test split. config.json records its
        path, count and skipped files.
      epochs: training epochs (one epoch = ceil(n_train / batch_size) steps for every method), or auto,
        which means at least 10 epochs and at least 1,000 optimizer steps (59 epochs on kermany/train at
        batch 64, where 15 epochs underfit with augmentation; 16 on the phantom).
      image_size: side of the square grayscale input in pixels (OCTMNIST: 28, 64, 128 or 224).
      out: run folder to write (classifier.keras, detector/, config.json, metrics.json, training_log.csv).
      eps: SSAT's (--ssat-loss ce) per-sample budget range "min,max" in [0, 1] pixel scale (one value = fixed).
      lam: weight of SSAT's unlabeled-batch loss (>= 0; default 3 for --ssat-loss ce, 1 for trades).
      attack: fgsm | pgd | free, how SSAT crafts its adversaries (pgd uses --pgd-steps; free needs --ssat-loss
        trades); default fgsm for --ssat-loss ce, free for trades: one signed step of --train-eps (auto:
        0.008) along the clean loss's input gradient, taken from the update's own backward pass (4.3-5.5x
        a standard step at 64 px; pgd: 10-22x; see
        medrobust/training/ssat.py and benchmarks/ssat_step.py).
      free_noise: (--method ssat --attack free only) k >= 0: start each adversary from uniform noise of
        k * --train-eps and leave the step unprojected (N-FGSM, de Jorge et al. 2022; same cost); not
        given: 0, the step starts from the image itself.
      ssat_loss: auto (trades for --method ssat) | ce (the paper: lam * CE on adversaries of pseudo-labeled
        unlabeled scans; --ssat-loss ce --teacher snapshot is the paper's form) | trades (robust
        self-training, Carmon et al. 2019: TRADES on labeled and pseudo-labeled scans, with --train-eps,
        --pgd-steps and --beta as TRADES); see medrobust/training/ssat.py.
      detector: true | false: also fit the UAD detector on clean training images (no labels).
      seed: random seed (data split, label subset, initialisation, shuffling).
      width: channels of the first convolution (default: 32 for small_cnn, 16 for resnet18).
      batch_size: labeled images per step.
      unlabeled_batch_size: unlabeled images per SSAT step (default: --batch-size).
      lr: Adam's (initial) learning rate.
      lr_schedule: cosine (Adam's learning rate decays to 0 over all epochs) | constant. The decay
        also settles BatchNorm's moving statistics, so the final model is not a mid-swing snapshot.
      ema: 0 (off) or a momentum in (0, 1): the saved classifier's weights are an exponential moving
        average of the trained ones, updated after every step (Keras' optimizer use_ema; weight averaging
        as in Izmailov et al. 2018 and, for adversarial training, Gowal et al. 2020 and Rebuffi et al.
        2021). 0.99 averages over about the last 100 steps. BatchNorm's moving statistics are not averaged
        again. Free at inference.
      pgd_steps: PGD iterations for --attack pgd, PGD-AT, TRADES and MART.
      train_eps: the budget of PGD-AT, TRADES, MART and SSAT --ssat-loss trades adversaries ([0, 1] pixel
        scale; a fraction such as 2/255 is read exactly), or auto: 0.008 (just above 2/255) for SSAT's
        --attack free form, whose one step from the image matched PGD-10's robustness at 1/255 and 2/255
        only at this budget (and cost DRUSEN sensitivity: README "Which defence"), 0.004 (just above 1/255)
        for every other method and form. The runs measured in the README used these decimal values.
      beta: TRADES, MART (and SSAT --ssat-loss trades) trade-off weight.
      confidence: SSAT pseudo-label confidence threshold tau (0 keeps all).
      teacher: where SSAT's pseudo-labels come from: auto (= standard) | standard (a standard model trained
        first by this command on the same data, labeled subset, seed, image size, architecture,
        augmentation and class weights, without detector, into OUT/teacher; reused when its options
        match; config.json records its path, options and metrics) | snapshot (a frozen copy of the model
        taken after --pretrain-epochs of labeled-only training) | none (the current model; unstable, see
        medrobust/training/ssat.py) | the path of a frozen classifier.keras.
      pretrain_epochs: SSAT's labeled-only epochs before its adversarial loss switches on (at most half
        of --epochs).
      strategy: none | mirrored | multiworker (tf.distribute).
      detector_epochs: training epochs of the detector's autoencoder (only when its parts use it).
      detector_parts: default (mahalanobis, squeeze_bits, boundary: chosen on kermany/val, see
        docs/real_kermany/uad_parts_val.md) or a comma-separated subset of reconstruction, feature, mahalanobis,
        mahalanobis_early, mahalanobis_middle, residual, squeeze_bits, squeeze_median, boundary.
      target_fpr: detector false-alarm rate on clean validation images.
      arch: auto (small_cnn below 64 px, strided_cnn from 64 px: measured in README, "Training on real
        scans") | small_cnn | strided_cnn | mobilenet_v3_small | resnet18 (see medrobust/models).
      augment: auto (on for real scans, off for the synthetic phantom) | true | false: random flips,
        shifts, zooms, brightness and contrast of training images (medrobust.data.pipeline.AUGMENTATION).
      class_weight: balanced (each class weighs n / (4 n_c) in every method's labeled loss) | none.
      sampling: natural (shuffled passes over the labeled scans) | balanced (each class drawn equally often
        into the labeled batches, so rare classes are seen and attacked as often as common ones).
      pseudo_class_weight: (--method ssat) none (every pseudo-labeled scan weighs 1) | balanced (each
        pseudo-labeled scan weighs its pseudo-class's --class-weight, in the pseudo-label loss and the
        unlabeled KL term, so the rare classes of the unlabeled pool are fitted and defended as much as
        the labeled ones; needs --class-weight balanced; see medrobust/training/ssat.py. On kermany/val it
        raised balanced accuracy by 0.02-0.03 and cost 0.04 accuracy: README, "Rare classes").
      referral_sensitivity: target disease-vs-NORMAL sensitivity in (0, 1] for the referral operating
        point: the threshold on P(disease) = 1 - P(NORMAL) is chosen on the validation split (the highest
        one that reaches the target there), written to metrics.json, and used by evaluate and the bundle.
      weights: initial weights: a classifier .keras / .weights.h5 of the same architecture and size, or
        for mobilenet_v3_small a keras.applications no-top backbone .h5 file.
      overwrite: true | false: train again into a folder that holds a run (only that run's own files are
        removed, with its OUT/teacher run; other files stay).
      tensorboard: true | false: also write TensorBoard logs to OUT/tensorboard.
      progress: true | false: print per-epoch progress.
    """
    options = dict(locals())
    method = _choice(method, METHODS, "method")
    defaults = SSAT_DEFAULTS if method == "ssat" else OTHER_DEFAULTS
    ssat_loss = _choice(ssat_loss, SSAT_LOSSES, "ssat-loss")
    ssat_loss = defaults["ssat_loss"] if ssat_loss == "auto" else ssat_loss
    if teacher is not None and str(teacher).strip().lower() in TEACHERS:
        teacher = str(teacher).strip().lower()
        teacher = defaults["teacher"] if teacher == "auto" else teacher
    attack = None if attack is None else _choice(attack, ATTACKS, "attack")
    if method == "ssat" and attack is None and ssat_loss == "trades":
        attack = RST_ATTACK
    if method == "ssat" and attack == "free" and ssat_loss != "trades":
        raise cli.UsageError("--attack free needs --ssat-loss trades")
    free = method == "ssat" and attack == "free"
    if free_noise is not None and not free:
        raise cli.UsageError("--free-noise applies to --method ssat --attack free only")
    free_noise = (FREE_NOISE if free_noise is None else cli.parse_float(free_noise, "free-noise")) if free else 0.0
    options.update(
        method=method, ssat_loss=ssat_loss, teacher=teacher, attack=attack, free_noise=free_noise,
        ema=cli.parse_float(ema, "ema"),
        train_eps=(default_train_eps(method, attack) if str(train_eps).strip().lower() == "auto"
                   else cli.parse_float(train_eps, "train-eps")),
        strategy=_choice(strategy, STRATEGIES, "strategy"), arch=_choice(arch, ARCHS, "arch"),
        eps=cli.parse_floats(eps, "eps"),
        detector_parts=("default" if str(detector_parts).strip().lower() == "default"
                        else ",".join(cli.parse_names(detector_parts, "detector-parts", DETECTOR_PARTS))),
        lr_schedule=_choice(lr_schedule, LR_SCHEDULES, "lr-schedule"),
        detector=cli.parse_bool(detector, "detector"), overwrite=cli.parse_bool(overwrite, "overwrite"),
        tensorboard=cli.parse_bool(tensorboard, "tensorboard"), progress=cli.parse_bool(progress, "progress"),
        data=str(data), out=str(out), augment=_choice(augment, AUGMENT, "augment"),
        class_weight=_choice(class_weight, CLASS_WEIGHTS, "class-weight"),
        sampling=_choice(sampling, SAMPLINGS, "sampling"),
        pseudo_class_weight=_choice(pseudo_class_weight, CLASS_WEIGHTS, "pseudo-class-weight"),
        weights=None if weights is None else str(Path(str(weights)).expanduser()),
        unlabeled=None if unlabeled is None else str(Path(str(unlabeled)).expanduser()),
    )
    if options["arch"] == "auto":  # resolved here, so config.json and reruns see the architecture itself
        options["arch"] = "strided_cnn" if int(image_size) >= STRIDED_FROM else "small_cnn"
    if int(image_size) < 1:
        raise cli.UsageError(f"--image-size must be a positive integer (pixels), got {image_size}")
    if int(image_size) < ARCH_MIN_SIZE[options["arch"]]:
        raise cli.UsageError(f"--arch {options['arch']} needs --image-size >= {ARCH_MIN_SIZE[options['arch']]}, "
                             f"got {image_size}")
    if str(epochs).strip().lower() == "auto":
        options["epochs"] = "auto"
    else:
        options["epochs"] = cli.parse_int(epochs, "epochs")
    _check_numbers(options)
    if str(train_eps).strip().lower() != "auto" and not uses_train_eps(method, ssat_loss):
        # Kept in config.json (reruns compare it), but said: a budget that changes nothing should not look set.
        print(f"note: --train-eps {options['train_eps']:g} is not used by --method {method}"
              + (f" --ssat-loss {ssat_loss} (its budget is --eps)" if method == "ssat" else ""))
    _check_data_argument(options["data"])
    if options["weights"] is not None and not Path(options["weights"]).is_file():
        raise cli.UsageError(f"--weights {weights}: no such file")
    _check_teacher(options)
    if (options["pseudo_class_weight"] == "balanced"
            and (options["method"], options["class_weight"]) != ("ssat", "balanced")):
        raise cli.UsageError("--pseudo-class-weight balanced weighs SSAT's pseudo-labeled scans by --class-weight "
                             "balanced: it needs --method ssat and --class-weight balanced")
    with _data_loaded_once():
        pool = _unlabeled_pool(options)  # before any work: a pool that leaks val or test scans is refused
        out_dir = Path(options["out"])
        if _already_done(out_dir, options):
            print(f"{out_dir}: this run is already complete (metrics.json); pass --overwrite true to train again")
            return read_json(out_dir / "metrics.json")
        if options["method"] == "ssat" and options["teacher"] == "standard":
            # Every label used and no --unlabeled pool: no scan to pseudo-label, no teacher to train.
            needed = options["label_fraction"] < 1 or pool is not None
            options["teacher_run"] = _standard_teacher(options, out_dir) if needed else None
        return _train(options, out_dir, pool)


# Within one train() call (with its --teacher standard run) each dataset is read once.
_LOADED = {"depth": 0, "data": {}}


@contextlib.contextmanager
def _data_loaded_once():
    _LOADED["depth"] += 1
    try:
        yield
    finally:
        _LOADED["depth"] -= 1
        if _LOADED["depth"] == 0:
            _LOADED["data"].clear()


def _load_data(o: dict):
    from medrobust.data import load_data

    key = (o["data"], int(o["image_size"]), int(o["seed"]))
    if key not in _LOADED["data"]:
        _LOADED["data"][key] = load_data(o["data"], image_size=o["image_size"], seed=o["seed"])
    return _LOADED["data"][key]


def _unlabeled_pool(o: dict):
    """--unlabeled: the pool (medrobust.data.unlabeled), checked against the data's val and test splits."""
    if o["unlabeled"] is None:
        return None
    if o["method"] != "ssat":
        raise cli.UsageError(f"--unlabeled is for --method ssat (the only method that uses unlabeled scans), "
                             f"not {o['method']}")
    if not Path(o["unlabeled"]).exists():
        raise cli.UsageError(f"--unlabeled {o['unlabeled']}: no such file or folder")
    from medrobust.data.unlabeled import leaks, load_unlabeled

    data = _load_data(o)
    pool = load_unlabeled(o["unlabeled"], o["image_size"], progress=o["progress"])
    for file, reason in pool.skipped:
        warnings.warn(f"--unlabeled: skipped {file}: {reason}", stacklevel=3)
    found = leaks(pool, data)
    if found:
        what = "; ".join(f"{split}: {len(v['images'])} images" + (f" of {len(v['patients'])} patients "
                                                                 f"(e.g. {', '.join(v['patients'][:3])})"
                                                                 if v["patients"] else "")
                         + f", e.g. {v['images'][0]}" for split, v in found.items())
        raise cli.UsageError(f"--unlabeled {o['unlabeled']} shares scans with {data.source}'s {what}; "
                             "training on them would leak into the evaluation: remove them or use another pool")
    if not data.patients or all(p is None for p in pool.patients):
        unnamed = data.source if not data.patients else f"the pool {pool.source}"
        warnings.warn(f"--unlabeled: {unnamed} names no patients, so only identical images were checked against "
                      "the val and test splits, not other scans of their patients (OCTMNIST, for one, was made "
                      "from the Kermany OCT2017 scans)", stacklevel=3)
    print(f"unlabeled pool: {len(pool)} scans from {pool.source}"
          + (f" ({len(pool.skipped)} skipped)" if pool.skipped else ""))
    return pool


def teacher_options(o: dict) -> dict:
    """The train() options of --teacher standard's run: a standard model on the same data, labeled
    subset (data, seed, label fraction), image size, architecture, initial weights, augmentation, class
    weights, epochs and optimiser as the SSAT run, without detector, in OUT/teacher."""
    return {**{k: o[k] for k in TEACHER_SHARED}, "method": "standard", "detector": "false",
            "out": str(Path(o["out"]) / TEACHER_FOLDER)}


def _standard_teacher(o: dict, out_dir: Path) -> dict:
    """Train (or reuse, when its options match) the --teacher standard run; {path, config, metrics}."""
    kwargs = teacher_options(o)
    kwargs.update({k: str(kwargs[k]).lower() for k in ("overwrite", "tensorboard", "progress")})
    folder = Path(kwargs["out"])
    print(f"teacher: a standard model on the same labels, in {folder}")
    metrics = train(**kwargs)
    config = read_json(folder / "config.json")
    keep = ("method", "data_source", "label_fraction", "seed", "n_labeled", "image_size", "arch", "width",
            "epochs_resolved", "augmentation", "class_weights")
    return {"path": str(folder / "classifier.keras"), "config": {k: config.get(k) for k in keep},
            "metrics": {k: metrics.get(k) for k in ("clean_accuracy", "val_accuracy", "val_sensitivity",
                                                     "test_sensitivity", "train_seconds_last_session")}}


def _train(o: dict, out_dir: Path, pool=None) -> dict:
    # Data first: a bad dataset fails in a second, before TensorFlow loads.
    data = _load_data(o)
    resumed = _run_config(out_dir)
    if resumed is not None and resumed.get("data_source") not in (None, data.source):
        again = resumed.get("data_resolved") or resumed["data_source"]
        raise cli.UsageError(f"{out_dir} holds a run trained on {resumed['data_source']}, but --data {o['data']} "
                             f"now gives {data.source}; pass --data {again} to resume it, or use another --out")
    cli.import_tensorflow()
    import keras
    import numpy as np
    from medrobust.data.pipeline import eval_dataset, steps_per_epoch, train_dataset
    from medrobust.data.splits import labeled_unlabeled_split
    from medrobust.models import build_classifier, load_classifier
    from medrobust.attacks import accuracy
    from medrobust.attacks.driver import predict_probabilities
    from medrobust.training import make_trainer

    keras.utils.set_random_seed(o["seed"])
    print(f"data: {data.describe()}")
    x_train, y_train = data["train"]
    labeled, unlabeled = labeled_unlabeled_split(y_train, o["label_fraction"], o["seed"])
    x_unlabeled = x_train[unlabeled]
    if pool is not None:
        x_unlabeled = np.concatenate([x_unlabeled, pool.x])
    semi = o["method"] == "ssat" and len(x_unlabeled) > 0
    print(f"labels: {len(labeled)} labeled, {len(unlabeled)} unlabeled (fraction {o['label_fraction']})"
          + (f" + {len(pool)} unlabeled from --unlabeled" if pool is not None else ""))
    recipe = training_recipe(o, data, y_train[labeled])
    print(f"recipe: augmentation {recipe['augmentation'] or 'off'}; class weights {recipe['class_weights'] or 'none'}")

    # Everything that can fail before the first epoch comes before config.json (a run that never
    # finished an epoch does not pin its options anyway, see _already_done).
    steps = steps_per_epoch(len(x_train), o["batch_size"])
    config_epochs = o["epochs"]  # as given ("auto" or a number): what a rerun must match
    o = {**o, "epochs": resolve_epochs(o["epochs"], steps)}
    if config_epochs == "auto":
        print(f"epochs: auto -> {o['epochs']} ({steps} steps per epoch)")
    train_ds = train_dataset(x_train[labeled], y_train[labeled], o["batch_size"], o["seed"],
                             x_unlabeled=x_unlabeled if semi else None,
                             unlabeled_batch_size=o["unlabeled_batch_size"] or o["batch_size"],
                             augment=recipe["augmentation"], sampling=o["sampling"])
    strategy = make_strategy(o["strategy"])
    with strategy.scope():
        classifier = build_classifier(o["arch"], o["image_size"], o["width"], weights=o["weights"])
        teacher_given = {"teacher": o["teacher_run"]["path"]} if o.get("teacher_run") else {}
        options = {**trainer_options({**o, **teacher_given}, load_classifier, steps),
                   "class_weights": recipe["class_weights"]}
        trainer = make_trainer(o["method"], classifier, **options)
        if o["method"] == "ssat":
            noise = f", noise {trainer.free_noise:g} eps" if trainer.free_noise else ""
            budget = f"eps {trainer.eps_min:g}" + ("" if trainer.eps_max == trainer.eps_min else f"-{trainer.eps_max:g}")
            print(f"ssat ({o['ssat_loss']}, {trainer.attack}, {budget}{noise}): {options['pretrain_steps']} "
                  f"labeled-only steps, then lam {trainer.lam} with pseudo-labels "
                  f"from {_teacher_name(o) if options['teacher'] is not None else 'the current model'}")
        trainer.compile(optimizer=make_optimizer(o, steps))
        # BackupAndRestore needs built weights and optimizer slots to restore into.
        trainer(np.zeros((1, o["image_size"], o["image_size"], 1), np.float32))
        trainer.optimizer.build(classifier.trainable_variables)

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**{k: v for k, v in o.items() if k not in NOT_PART_OF_RUN}, "epochs": config_epochs,
              "epochs_resolved": o["epochs"], "data_source": data.source,
              "data_resolved": data.argument, "synthetic_data": data.synthetic, "n_labeled": int(len(labeled)),
              "n_unlabeled": int(len(unlabeled)),
              "unlabeled_pool": None if pool is None else {"path": o["unlabeled"], "source": pool.source,
                                                           "count": len(pool), "skipped": pool.skipped},
              "split_sizes": {s: int(len(data[s][1])) for s in data.splits},
              "split_patients": data.patient_counts(), **recipe, "versions": package_versions(),
              "command": cli.command_line()}
    atomic_write_json(out_dir / "config.json", config)

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
    probs = {s: predict_probabilities(classifier, data[s][0]) for s in ("val", "test")}  # one pass per split
    metrics = {
        "clean_accuracy": accuracy(classifier, x_test, y_test),
        "val_accuracy": accuracy(classifier, *data["val"]),
        **{f"{s}_sensitivity": class_sensitivity(probs[s], data[s][1], data.classes) for s in ("val", "test")},
        "referral": referral_point(probs, data, o["referral_sensitivity"]),
        "method": o["method"], "label_fraction": o["label_fraction"], "epochs": o["epochs"],
        "steps_per_epoch": steps, "train_seconds_last_session": round(train_seconds, 2),
        "data_source": data.source, "synthetic_data": data.synthetic, "n_test": int(len(y_test)),
    }
    print(f"clean test accuracy: {metrics['clean_accuracy']:.4f} on {len(y_test)} images"
          + (" (SYNTHETIC phantom)" if data.synthetic else "") + "; sensitivity "
          + ", ".join(f"{c} {v:.2f}" for c, v in metrics["test_sensitivity"].items() if v is not None))
    if metrics["referral"]:
        r = metrics["referral"]
        print(f"referral (disease vs NORMAL) at P(disease) >= {r['threshold']:.4f}, chosen on val for sensitivity "
              f">= {r['target_sensitivity']:g}: test sensitivity {_fmt(r['test']['sensitivity'])}, "
              f"specificity {_fmt(r['test']['specificity'])}")
    if o["detector"]:
        from medrobust.detection import train_detector

        parts = None if o["detector_parts"] == "default" else o["detector_parts"].split(",")
        metrics.update(train_detector(classifier, data, out_dir, epochs=o["detector_epochs"], seed=o["seed"],
                                      target_fpr=o["target_fpr"], parts=parts, progress=o["progress"]))
    atomic_write_json(out_dir / "metrics.json", metrics)
    print(f"wrote {out_dir}")
    return metrics


def _teacher_name(o: dict) -> str:
    run = o.get("teacher_run")
    return f"the standard teacher {run['path']}" if run else str(o["teacher"])


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def referral_point(probs: dict, data, target_sensitivity: float) -> dict | None:
    """The disease-vs-NORMAL referral threshold chosen on the validation split for the target sensitivity
    (medrobust.evaluation.referral), with the test split's figures at it. probs: {split: softmax [n, 4]}."""
    from medrobust.evaluation.referral import (disease_probability, fit_operating_point, is_disease, refer,
                                               referral_metrics)

    try:
        point = fit_operating_point(probs["val"], data["val"][1], target_sensitivity)
    except ValueError as exc:  # e.g. a validation split without diseased scans
        warnings.warn(f"no referral threshold: {exc}", stacklevel=2)
        return None
    point["test"] = referral_metrics(refer(disease_probability(probs["test"]), point["threshold"]),
                                     is_disease(data["test"][1]))
    return point


def class_sensitivity(probs, y, classes) -> dict:
    """{class: sensitivity (recall) of softmax probabilities probs [n, 4] against y, None if the class is absent}."""
    from medrobust.evaluation.metrics import clinical_metrics

    per_class = clinical_metrics(y, probs)["per_class"]
    return {c: None if per_class[c]["sensitivity"] is None else round(per_class[c]["sensitivity"], 4)
            for c in classes}


def training_recipe(o: dict, data, y_labeled) -> dict:
    """The resolved augmentation spec (None = off) and class weights (None = plain means), for config.json."""
    from medrobust.data.pipeline import AUGMENTATION
    from medrobust.training.base import balanced_class_weights

    augment = not data.synthetic if o["augment"] == "auto" else o["augment"] == "true"
    weights = balanced_class_weights(y_labeled, len(data.classes)) if o["class_weight"] == "balanced" else None
    return {"augmentation": dict(AUGMENTATION) if augment else None, "class_weights": weights}


def trainer_options(o: dict, load_classifier, steps_per_epoch: int = 1) -> dict:
    """The keyword arguments each method's Trainer takes, from the CLI options."""
    if o["method"] == "ssat":
        eps = o["eps"] if len(o["eps"]) == 2 else (o["eps"][0], o["eps"][0])
        trades = o.get("ssat_loss", "ce") == "trades"  # RST: TRADES' budget, steps and beta
        teacher = o.get("teacher")
        if teacher is None or str(teacher).lower() in ("none", "standard"):  # standard: no run, no unlabeled data
            teacher = None
        elif teacher != "snapshot":
            teacher = load_classifier(teacher)
        pretrain = min(float(o.get("pretrain_epochs", 0.0)), o.get("epochs", 0) / 2)
        return dict(eps_range=(o["train_eps"],) * 2 if trades else eps, lam=o["lam"], attack=o["attack"],
                    pgd_steps=o["pgd_steps"], confidence=o["confidence"], teacher=teacher,
                    loss=o.get("ssat_loss", "ce"), beta=o.get("beta", 6.0),
                    pseudo_class_weight=o.get("pseudo_class_weight", "none") == "balanced",
                    free_noise=o.get("free_noise", 0.0),
                    soft_pseudo_labels=o.get("pseudo_labels", "hard") == "soft",
                    # A snapshot needs at least one labeled-only step, even for a one-batch epoch.
                    pretrain_steps=max(int(teacher == "snapshot"), round(pretrain * steps_per_epoch)))
    if o["method"] == "pgd_at":
        return dict(eps=o["train_eps"], steps=o["pgd_steps"])
    if o["method"] in ("trades", "mart"):
        return dict(eps=o["train_eps"], steps=o["pgd_steps"], beta=o["beta"])
    return {}


def default_train_eps(method: str, attack: str | None) -> float:
    """--train-eps auto: FREE_TRAIN_EPS for --method ssat --attack free, else TRAIN_EPS ([0, 1] pixel scale)."""
    return FREE_TRAIN_EPS if (method, attack) == ("ssat", "free") else TRAIN_EPS


def uses_train_eps(method: str, ssat_loss: str) -> bool:
    """Whether --train-eps is the adversaries' budget: PGD-AT, TRADES, MART and SSAT --ssat-loss trades."""
    return method in ("pgd_at", "trades", "mart") or (method, ssat_loss) == ("ssat", "trades")


MIN_AUTO_EPOCHS, MIN_AUTO_STEPS = 10, 1000


def resolve_epochs(epochs, steps_per_epoch: int) -> int:
    """--epochs as a number: itself, or for "auto" at least MIN_AUTO_EPOCHS epochs and MIN_AUTO_STEPS steps."""
    if epochs != "auto":
        return int(epochs)
    return max(MIN_AUTO_EPOCHS, math.ceil(MIN_AUTO_STEPS / steps_per_epoch))


def learning_rate(o: dict, steps_per_epoch: int):
    """Adam's learning rate: a float, or a cosine decay to 0 over every step of the run."""
    import keras

    if o.get("lr_schedule", "constant") == "constant":
        return o["lr"]
    return keras.optimizers.schedules.CosineDecay(o["lr"], decay_steps=o["epochs"] * steps_per_epoch)


def make_optimizer(o: dict, steps_per_epoch: int):
    """Adam at learning_rate(o, ...), keeping an exponential moving average of the weights when o["ema"] > 0
    (Keras writes the average into the model's weights when fit() ends)."""
    import keras

    ema = o.get("ema", 0.0)
    return keras.optimizers.Adam(learning_rate(o, steps_per_epoch), use_ema=ema > 0, ema_momentum=ema or 0.99)


def make_strategy(name: str):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _already_done(out_dir: Path, options: dict) -> bool:
    """True if out_dir holds a finished run of these options; an error if it holds a different run.

    A folder that is neither empty nor one of our runs is refused (nothing of it is touched). With
    --overwrite true, or when the run there never finished an epoch (its options do not pin the
    folder: a failed start must not block its corrected rerun), the run's own files are removed first.
    """
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise cli.UsageError(f"--out {out_dir} is a file, not a folder")
    old = _run_config(out_dir)
    if old is None:
        if any(not _is_our_temporary(p.name) and not _is_teacher_folder(p) for p in out_dir.iterdir()):
            raise cli.UsageError(f"--out {out_dir} is not empty and holds no medrobust run (no config.json "
                                 "written by medrobust.train); choose a new or empty folder")
        return False
    if options["overwrite"]:
        _remove_run_files(out_dir, "--overwrite true: ")
        return False
    # A budget the method never uses (--train-eps of standard, say) does not make it another run.
    ignored = set() if uses_train_eps(options["method"], options["ssat_loss"]) else {"train_eps"}
    changed = sorted(k for k, v in options.items()
                     if k not in NOT_COMPARED | ignored and _normal(old.get(k, ADDED_LATER.get(k))) != _normal(v))
    if not _finished_an_epoch(out_dir):
        if changed:
            print(f"{out_dir}: the run there stopped before finishing an epoch, so its options do not hold; "
                  f"starting again with these ({', '.join(changed)} changed)")
        # Its teacher run is reused if it was trained with the options this run gives it.
        _remove_run_files(out_dir, "", keep_teacher=_teacher_matches(out_dir, options))
        return False
    if changed:
        values = "; ".join(f"{k}: {old.get(k, ADDED_LATER.get(k))!r} there, {options[k]!r} now" for k in changed)
        raise cli.UsageError(f"{out_dir} holds a run with other options ({values}; a default may have changed: "
                             "pass the run's values to resume it); use another --out or --overwrite true")
    return (out_dir / "metrics.json").exists()


def _run_config(out_dir: Path) -> dict | None:
    """The config.json of a run written by this command in out_dir, or None if there is none."""
    path = out_dir / "config.json"
    if not path.is_file():
        return None
    try:
        config = read_json(path)
    except ValueError:
        return None  # half-written or not ours: either way not a run this command can resume
    return config if isinstance(config, dict) and {"method", "data_source", "versions"} <= set(config) else None


def _finished_an_epoch(out_dir: Path) -> bool:
    """Any sign of a finished epoch: a Keras backup, a row in the training log, a saved model or metrics."""
    log = out_dir / "training_log.csv"
    rows = len(log.read_text(encoding="utf-8", errors="replace").splitlines()) - 1 if log.is_file() else 0
    return (rows > 0 or (out_dir / "backup").is_dir() or (out_dir / "classifier.keras").exists()
            or (out_dir / "metrics.json").exists())


def _is_our_temporary(name: str) -> bool:
    """Temporary names of medrobust.io's atomic writes (.NAME.XXXX.tmp, .NAME.partial.keras)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".partial.keras"))


def _is_teacher_folder(path: Path) -> bool:
    """OUT/teacher holding a --teacher standard run (or nothing): the run's own."""
    return path.name == TEACHER_FOLDER and path.is_dir() and (
        _run_config(path) is not None or not any(path.iterdir()))


def _teacher_matches(out_dir: Path, options: dict) -> bool:
    """OUT/teacher holds a run with the options this SSAT run would give its standard teacher."""
    old = _run_config(out_dir / TEACHER_FOLDER)
    if old is None or options.get("method") != "ssat" or options.get("teacher") != "standard":
        return False
    return all(_normal(old.get(k, ADDED_LATER.get(k))) == _normal(v) for k, v in teacher_options(options).items()
               if k not in NOT_COMPARED and k != "detector")


def _remove_run_files(out_dir: Path, why: str, keep_teacher: bool = False) -> None:
    """Remove what this command wrote into out_dir (RUN_FILES, RUN_FOLDER_FILES, TensorBoard event files,
    our temporary files, the OUT/teacher run's own files unless keep_teacher) and nothing else; say what
    was removed and what was kept."""
    removed, kept = [], []

    def remove(path: Path) -> None:
        path.unlink()
        removed.append(str(path.relative_to(out_dir)))

    for path in sorted(out_dir.iterdir()):
        if path.is_file() and (path.name in RUN_FILES or _is_our_temporary(path.name)):
            remove(path)
        elif _is_teacher_folder(path) and not keep_teacher:
            _remove_run_files(path, why)
            if any(path.iterdir()):
                kept.append(f"{path.name}/ (holds files medrobust.train did not write)")
            else:
                path.rmdir()
                removed.append(f"{path.name}/")
        elif path.is_dir() and (path.name in RUN_FOLDER_FILES or path.name == "tensorboard"):
            for inner in sorted(path.rglob("*"), reverse=True):  # files before their folders
                ours = (inner.name.startswith("events.out.tfevents.") if path.name == "tensorboard"
                        else inner.parent == path and (inner.name in RUN_FOLDER_FILES[path.name]
                                                       or _is_our_temporary(inner.name)))
                if inner.is_file() and ours:
                    remove(inner)
                elif inner.is_dir() and path.name == "tensorboard" and not any(inner.iterdir()):
                    inner.rmdir()  # TensorBoard's train/ and validation/
            if any(path.iterdir()):
                kept.append(f"{path.name}/ (holds files medrobust.train did not write)")
            else:
                path.rmdir()
        else:
            kept.append(path.name + ("/" if path.is_dir() else ""))
    if removed:
        print(f"{why}removed the previous run's files in {out_dir}: {', '.join(removed)}"
              + (f"; kept {', '.join(kept)}" if kept else ""))


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _choice(value, allowed, name):
    value = str(value).lower()
    if value not in allowed:
        raise cli.UsageError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_teacher(o: dict) -> None:
    """--teacher PATH: the file must exist; if it comes from a medrobust run that saw more labels (a larger
    label fraction, another seed's labeled subset or other data), warn: its pseudo-labels carry those labels
    into a run that claims fewer."""
    teacher = o.get("teacher")
    if o["method"] != "ssat" or teacher is None or str(teacher).lower() in TEACHERS:
        return
    path = Path(str(teacher)).expanduser()
    if not path.is_file():
        raise cli.UsageError(f"--teacher {teacher}: no such file (a classifier.keras, or standard / snapshot / none)")
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        warnings.warn(f"--teacher {teacher}: no config.json beside it, so the labels it was trained on cannot be "
                      f"checked; the run is only a label-fraction-{o['label_fraction']:g} result if the teacher "
                      "saw no other labels", stacklevel=3)
        return
    from medrobust.data import run_data_argument

    seen = read_json(config_path)
    problems = []
    if float(seen.get("label_fraction", 1.0)) > float(o["label_fraction"]):
        problems.append(f"label fraction {seen.get('label_fraction')} > {o['label_fraction']:g}")
    elif float(seen.get("label_fraction", 1.0)) < 1.0 and int(seen.get("seed", 0)) != int(o["seed"]):
        problems.append(f"seed {seen.get('seed')} (another labeled subset) != {o['seed']}")
    # The teacher's data as it was typed and as it resolved (e.g. auto -> phantom); either may match ours.
    teacher_data = {str(seen.get("data")), run_data_argument(seen)}
    if not any(_same_path(d, o["data"]) for d in teacher_data):
        problems.append(f"data {run_data_argument(seen)}")
    if problems:
        warnings.warn(f"TEACHER SAW OTHER LABELS: --teacher {teacher} was trained with {'; '.join(problems)}; its "
                      f"pseudo-labels carry those labels into this run, so its figures are not those of label "
                      f"fraction {o['label_fraction']:g} alone", stacklevel=3)


def _same_path(a, b) -> bool:
    """Two --data arguments name the same source (a name like phantom, or the same folder or file)."""
    return str(a) == str(b) or Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def _check_numbers(o: dict) -> None:
    if not 0 < o["label_fraction"] <= 1:
        raise cli.UsageError(f"--label-fraction must be in (0, 1], got {o['label_fraction']}")
    if any(not 0 <= e <= 1 for e in o["eps"]) or len(o["eps"]) > 2:
        raise cli.UsageError(f"--eps takes one or two values in [0, 1] (min,max), got {o['eps']}")
    for name in ("epochs", "image_size", "batch_size", "pgd_steps", "detector_epochs"):
        if o[name] != "auto" and int(o[name]) < 1:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {o[name]}")
    if not 0 < o["train_eps"] <= 1:
        raise cli.UsageError(f"--train-eps must be in (0, 1] ([0, 1] pixel scale) or auto, got {o['train_eps']}")
    if o["free_noise"] < 0:
        raise cli.UsageError(f"--free-noise must be >= 0, got {o['free_noise']}")
    if not 0 <= o["ema"] < 1:
        raise cli.UsageError(f"--ema must be 0 (off) or a momentum in (0, 1), got {o['ema']}")
    if not o["lr"] > 0:
        raise cli.UsageError(f"--lr must be > 0, got {o['lr']}")
    if (o["lam"] is not None and o["lam"] < 0) or o["pretrain_epochs"] < 0:
        raise cli.UsageError(f"--lam and --pretrain-epochs must be >= 0, got {o['lam']} and {o['pretrain_epochs']}")
    if o["method"] == "ssat" and o["teacher"] == "snapshot" and o["pretrain_epochs"] == 0:
        raise cli.UsageError("--teacher snapshot needs --pretrain-epochs > 0 (or pass --teacher none or a path)")
    if not 0 < o["referral_sensitivity"] <= 1:
        raise cli.UsageError(f"--referral-sensitivity must be in (0, 1], got {o['referral_sensitivity']}")
    if not 0 < o["target_fpr"] < 1:
        raise cli.UsageError(f"--target-fpr must be in (0, 1), got {o['target_fpr']}")


def _check_data_argument(data: str) -> None:
    """Fail before TensorFlow loads if the data argument cannot be right."""
    if data not in ("auto", "phantom", "octmnist") and not Path(data).expanduser().exists():
        raise cli.UsageError(f"--data {data}: no such file or folder (expected auto, phantom, octmnist, a .npz or a folder)")
    if data not in ("auto", "phantom", "octmnist"):
        from medrobust.data.folders import split_layout_problem  # no TensorFlow import

        problem = split_layout_problem(Path(data).expanduser())
        if problem:
            raise cli.UsageError(f"--data {problem}")


def main() -> None:
    cli.run(train)


if __name__ == "__main__":
    main()
