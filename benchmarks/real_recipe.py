"""Train one recipe on real scans and measure it on the VALIDATION split (the test split only on request).

    python benchmarks/real_recipe.py --data ../shared/data/kermany --image-size 64 --arch strided_cnn \
        --epochs 30 [--augment true|false] [--class-weight balanced|none] [--sampling natural|balanced] \
        [--method M] [--label-fraction F] [--teacher standard] [--option KEY=VALUE] [--robust-eps E] \
        [--folds K] [--log runs/recipes.jsonl] [--test]

This is how the defaults of `python -m medrobust.train` for real data were chosen (README, "Training on real
scans"): candidates are compared on kermany/val (189 scans of 126 patients none of which is in train), or with
--folds K by patient-grouped K-fold cross-validation over train + val (1,232 scans of 801 patients, every
scan predicted once by a model that saw no image of its patient: a steadier figure than 189 scans give),
and the test split is reported once per chosen configuration (--test). The training is the train CLI's own
(same model builder, trainer, input pipeline, class weights, cosine schedule), without the detector.

The clean and robust per-class table of the train CLI's default recipe (SSAT at 10% labels: standard
teacher, robust self-training form, --attack free; natural sampling + balanced class weights; 59 epochs as
--epochs auto gives on kermany/train), on val, saved for the test-once step:

    python benchmarks/real_recipe.py --method ssat --label-fraction 0.1 --epochs 59 --robust-eps 0.00392157 \
        --save runs/default.keras
    python benchmarks/real_recipe.py --method ssat --label-fraction 0.1 --robust-eps 0.00392157 \
        --model runs/default.keras --test        # once, for the configuration chosen on val

Prints and appends to --log one JSON line: parameters and multiply-adds of the model, data load time,
seconds per epoch (first epoch, with tracing, separately), accuracy, balanced accuracy and per-class
sensitivity on val (and test with --test). The machine load (os.getloadavg) is recorded with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from medrobust import cli


def count_macs(classifier, image_size: int) -> int:
    """Multiply-adds of one forward pass of one image (TensorFlow's profiler counts 2 flops per MAC)."""
    import tensorflow as tf
    from tensorflow.python.profiler.model_analyzer import profile
    from tensorflow.python.profiler.option_builder import ProfileOptionBuilder

    forward = tf.function(lambda x: classifier(x, training=False), autograph=False)
    graph = forward.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 1], tf.float32)).graph
    options = ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(profile(graph, options=options).total_float_ops // 2)


def probabilities(classifier, x, flip: bool = False):
    """float64 [n, classes] softmax of the classifier; flip=True averages it with that of the mirrored scans
    (test-time flip, as horizontal flips are part of training augmentation)."""
    from medrobust.attacks.driver import predict_probabilities

    p = predict_probabilities(classifier, x)
    return (p + predict_probabilities(classifier, x[:, :, ::-1])) / 2 if flip else p


def predict(classifier, x, flip: bool = False):
    import numpy as np

    return np.argmax(probabilities(classifier, x, flip), axis=-1)


def scores(y, pred, classes) -> dict:
    """Accuracy, balanced accuracy, per-class sensitivity and the confusion matrix (rows: true class)."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score

    sens = recall_score(y, pred, labels=list(range(len(classes))), average=None, zero_division=0)
    return {"accuracy": round(float(np.mean(pred == y)), 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4),
            "sensitivity": {c: round(float(s), 4) for c, s in zip(classes, sens)},
            "confusion_matrix": confusion_matrix(y, pred, labels=list(range(len(classes)))).tolist()}


def per_class(classifier, x, y, classes) -> dict:
    """scores() of the plain predictions, with those of test-time flip averaging under "flip_tta"."""
    return {**scores(y, predict(classifier, x), classes), "flip_tta": scores(y, predict(classifier, x, True), classes)}


def robust_scores(y, correct, classes) -> dict:
    """Robust accuracy, balanced robust accuracy and per-class robust sensitivity from per-scan outcomes."""
    import numpy as np

    sens = {c: round(float(np.mean(correct[y == k])), 4) for k, c in enumerate(classes) if np.any(y == k)}
    return {"robust_accuracy": round(float(np.mean(correct)), 4),
            "balanced_robust_accuracy": round(float(np.mean(list(sens.values()))), 4), "sensitivity": sens}


def table(row: dict, classes) -> str:
    """The per-class figures of a row as a markdown table: clean, flip-averaged and (with --robust-eps) robust."""
    lines = ["| split | figures | accuracy | balanced | " + " | ".join(classes) + " |",
             "|---|---|---:|---:|" + "---:|" * len(classes)]
    for split in ("cv", "val", "test"):
        report = row.get(split)
        if not report:
            continue
        for name, part, acc in (("clean", report, "accuracy"), ("clean, flip-averaged", report.get("flip_tta"), "accuracy"),
                                (f"robust at {row['robust_eps']}", report.get("robust"), "robust_accuracy")):
            if part:
                balanced = part.get("balanced_accuracy", part.get("balanced_robust_accuracy"))
                lines.append(f"| {split} | {name} | {part[acc]:.3f} | {balanced:.3f} | "
                             + " | ".join(f"{part['sensitivity'].get(c, float('nan')):.2f}" for c in classes) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/kermany")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--arch", default="strided_cnn")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--method", default="standard")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--augment", default="true", choices=("true", "false"))
    parser.add_argument("--class-weight", default="balanced", choices=("balanced", "none"))
    parser.add_argument("--sampling", default="natural", choices=("natural", "balanced"),
                        help="balanced: every class equally often in the labeled batches (medrobust.data.pipeline)")
    parser.add_argument("--augmentation", default=None,
                        help='JSON overriding keys of medrobust.data.pipeline.AUGMENTATION, e.g. \'{"rotate": 10}\'')
    parser.add_argument("--label-fraction", type=float, default=1.0,
                        help="labels kept per class (the train CLI's split); ssat uses the rest as unlabeled scans")
    parser.add_argument("--teacher", default="standard",
                        help="ssat's pseudo-label source: standard (default: a standard model trained on the same "
                             "labeled scans first, as the train CLI's recipe) | snapshot | none")
    parser.add_argument("--teachers", type=int, default=1,
                        help="ssat --teacher standard: train this many standard teachers on the same labeled scans "
                             "(seeds SEED, SEED+1000, ...) and pseudo-label with their averaged probabilities")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer option of the train CLI (train_eps, pgd_steps, beta, lam, ssat_loss, attack, "
                             "eps, confidence, pretrain_epochs, pseudo_class_weight, pseudo_labels=hard|soft); repeatable")
    parser.add_argument("--robust-eps", type=float, default=None,
                        help="also attack the evaluated scans at this L-inf budget (PGD-20 and APGD-CE-100; a scan "
                             "counts as robust when neither fools it) and report per-class robust sensitivity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=0,
                        help="K > 1: patient-grouped K-fold cross-validation over train + val instead of train -> val")
    parser.add_argument("--test", action="store_true", help="also report the test split (chosen configurations only)")
    parser.add_argument("--save", default=None, help="save the classifier here (.keras)")
    parser.add_argument("--model", default=None,
                        help="a classifier saved with --save: measure it instead of training (the test-once step: "
                             "choose on val, then --model SAVED --test with the options it was trained with)")
    parser.add_argument("--log", default=None, help="append the JSON line to this file")
    args = parser.parse_args()
    if args.teachers < 1:
        parser.error(f"--teachers {args.teachers}: expected 1 or more")
    if args.folds and args.test:
        parser.error("--test reports one trained model; run it without --folds")
    if args.model and args.folds:
        parser.error("--model measures one saved classifier; run it without --folds")
    if args.model and not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such file")

    from medrobust.data import load_data

    started = time.time()
    data = load_data(args.data, image_size=args.image_size, seed=args.seed)
    load_seconds = time.time() - started
    cli.import_tensorflow()
    import keras
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    from medrobust.data.pipeline import eval_dataset, steps_per_epoch, train_dataset
    from medrobust.models import build_classifier
    from medrobust.train import make_optimizer, trainer_options, training_recipe
    from medrobust.training import make_trainer

    from medrobust.data.splits import labeled_unlabeled_split

    o = {"augment": args.augment, "class_weight": args.class_weight, "method": args.method, "lr": args.lr,
         "epochs": args.epochs, "lr_schedule": "cosine", "ema": 0.0, "train_eps": None, "pgd_steps": 10, "beta": 6.0,
         "eps": (0.001, 0.003), "lam": None, "attack": None, "confidence": 0.0, "pretrain_epochs": 3.0,
         "ssat_loss": "trades", "teacher": args.teacher,
         "pseudo_class_weight": "none", "pseudo_labels": "hard"}  # ssat: the train CLI's default form
    for item in args.option:
        key, _, value = item.partition("=")
        if key not in o or not value:
            parser.error(f"--option {item}: expected KEY=VALUE with KEY one of {', '.join(sorted(o))}")
        o[key] = tuple(float(v) for v in value.split(",")) if key == "eps" else (
            value if key in ("ssat_loss", "attack", "teacher", "pseudo_class_weight", "pseudo_labels") else type(o[key] or 1.0)(value))
    if o["attack"] is None and o["ssat_loss"] == "trades":
        from medrobust.train import RST_ATTACK

        o["attack"] = RST_ATTACK  # as the train CLI: --attack free for the trades form
    if o["train_eps"] is None:  # as the train CLI's --train-eps auto
        from medrobust.train import default_train_eps
        o["train_eps"] = default_train_eps(o["method"], o["attack"])

    def train_one(method, x, y, x_unlabeled, x_val, y_val, seed, n_train, teacher=None):
        """Train one model of the recipe; returns the classifier, seconds per epoch and val accuracy per epoch.
        n_train: the training scans, labeled or not, an epoch counts (the train CLI's convention)."""
        keras.utils.set_random_seed(seed)
        options = {**o, "method": method}
        recipe = training_recipe(options, data, y)
        if recipe["augmentation"] and args.augmentation:
            recipe["augmentation"].update(json.loads(args.augmentation))
        classifier = build_classifier(args.arch, args.image_size, args.width)
        steps = steps_per_epoch(n_train, args.batch_size)
        if teacher is not None:
            options["teacher"] = "in-memory"
        trainer = make_trainer(method, classifier, class_weights=recipe["class_weights"],
                               **trainer_options(options, lambda _: teacher, steps))
        trainer.compile(optimizer=make_optimizer(options, steps))
        times = []
        timer = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: times.append(-time.time()),
                                               on_epoch_end=lambda e, logs: times.__setitem__(-1, times[-1] + time.time()))
        history = trainer.fit(train_dataset(x, y, args.batch_size, seed, x_unlabeled=x_unlabeled,
                                            augment=recipe["augmentation"], sampling=args.sampling),
                              epochs=args.epochs, steps_per_epoch=steps, validation_data=eval_dataset(x_val, y_val),
                              callbacks=[timer], verbose=2)
        return classifier, times, history.history["val_accuracy"]

    def fit(x, y, x_val, y_val, seed):
        """The recipe on (x, y) at --label-fraction (ssat: the other scans unlabeled; --teacher standard: a
        standard model on the same labeled scans first)."""
        labeled, unlabeled = labeled_unlabeled_split(y, args.label_fraction, seed)
        semi = args.method == "ssat" and len(unlabeled) > 0
        teacher = None
        if args.method == "ssat" and args.teacher == "standard":
            from medrobust.models import ProbabilityAverage

            members = []
            for k in range(args.teachers):
                member, _, _ = train_one("standard", x[labeled], y[labeled], None, x_val, y_val, seed + 1000 * k, len(x))
                member.trainable = False
                members.append(member)
                print(f"teacher {k + 1}/{args.teachers}: {scores(y_val, predict(member, x_val), data.classes)}")
            teacher = ProbabilityAverage(members) if len(members) > 1 else members[0]
            teacher.trainable = False
            if args.teachers > 1:
                print(f"teacher ensemble of {args.teachers}: {scores(y_val, predict(teacher, x_val), data.classes)}")
        return train_one(args.method, x[labeled], y[labeled], x[unlabeled] if semi else None, x_val, y_val, seed,
                         len(x), teacher)

    def robust_correct(classifier, x, y):
        """bool [n]: scans neither PGD-20 nor APGD-CE-100 misclassifies at --robust-eps (clean errors: False)."""
        from medrobust.attacks import APGD, PGD
        from medrobust.attacks.driver import predict_labels

        ok = predict_labels(classifier, x) == y
        for attack in (PGD(classifier, steps=20), APGD(classifier, steps=100, loss="ce")):
            idx = np.flatnonzero(ok)
            for start in range(0, len(idx), 256):
                part = idx[start:start + 256]
                x_adv = np.asarray(attack.run(x[part], y[part], args.robust_eps)[0])
                ok[part] &= predict_labels(classifier, x_adv) == y[part]
        return ok

    load_before = os.getloadavg()[0]
    started = time.time()
    if args.folds:
        # Patient-grouped cross-validation over train + val: every image is predicted once by a model
        # that saw none of its patient's images; figures pool all out-of-fold predictions.
        from sklearn.model_selection import StratifiedGroupKFold

        x = np.concatenate([data["train"][0], data["val"][0]])
        y = np.concatenate([data["train"][1], data["val"][1]])
        groups = np.array(data.patients["train"] + data.patients["val"], dtype=object)
        truth, preds, flip_preds, robust, fold_accuracy, epoch_times, curves = [], [], [], [], [], [], []
        folds = StratifiedGroupKFold(args.folds, shuffle=True, random_state=args.seed)
        for k, (tr, va) in enumerate(folds.split(x, y, groups)):
            classifier, times, curve = fit(x[tr], y[tr], x[va], y[va], args.seed + k)
            truth.append(y[va])
            preds.append(predict(classifier, x[va]))
            flip_preds.append(predict(classifier, x[va], True))
            if args.robust_eps:
                robust.append(robust_correct(classifier, x[va], y[va]))
            fold_accuracy.append(round(float(np.mean(preds[-1] == truth[-1])), 4))
            epoch_times += times
            curves.append(curve)
            print(f"fold {k}: {scores(truth[-1], preds[-1], data.classes)}", flush=True)
        val_report = {"folds": args.folds, "images": int(len(y)), "fold_accuracy": fold_accuracy,
                      **scores(np.concatenate(truth), np.concatenate(preds), data.classes),
                      "flip_tta": scores(np.concatenate(truth), np.concatenate(flip_preds), data.classes)}
        if args.robust_eps:
            val_report["robust"] = robust_scores(np.concatenate(truth), np.concatenate(robust), data.classes)
    elif args.model:
        classifier = keras.models.load_model(args.model)
        epoch_times, curves = [0.0], []
        val_report = per_class(classifier, *data["val"], data.classes)
        if args.robust_eps:
            val_report["robust"] = robust_scores(data["val"][1], robust_correct(classifier, *data["val"]), data.classes)
    else:
        x, y = data["train"]
        classifier, epoch_times, curve = fit(x, y, *data["val"], args.seed)
        curves = [curve]
        val_report = per_class(classifier, *data["val"], data.classes)
        if args.robust_eps:
            val_report["robust"] = robust_scores(data["val"][1], robust_correct(classifier, *data["val"]), data.classes)
    train_seconds = time.time() - started
    row = {
        "data": data.describe(), "arch": args.arch, "width": args.width, "image_size": args.image_size,
        "method": args.method, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "augment": args.augment, "augmentation": args.augmentation, "class_weight": args.class_weight,
        "sampling": args.sampling, "label_fraction": args.label_fraction, "teacher": args.teacher,
        "teachers": args.teachers,
        "options": args.option, "robust_eps": args.robust_eps, "seed": args.seed, "model": args.model,
        "params": int(classifier.count_params()), "macs": count_macs(classifier, args.image_size),
        "load_seconds": round(load_seconds, 2), "train_seconds": round(train_seconds, 1),
        "first_epoch_seconds": round(epoch_times[0], 1),
        "epoch_seconds": round(float(np.median(epoch_times[1:] or epoch_times)), 2),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "val_accuracy_by_epoch": [[round(float(a), 4) for a in c] for c in curves],
        ("cv" if args.folds else "val"): val_report,
    }
    if args.test:
        row["test"] = per_class(classifier, *data["test"], data.classes)
        from medrobust.train import referral_point  # threshold chosen on val, applied to test

        row["test"]["referral"] = referral_point({s: probabilities(classifier, data[s][0]) for s in ("val", "test")},
                                                 data, 0.95)
        if args.robust_eps:
            row["test"]["robust"] = robust_scores(data["test"][1], robust_correct(classifier, *data["test"]), data.classes)
    if args.save:
        classifier.save(args.save)
    line = json.dumps(row)
    print(line)
    print(table(row, data.classes))
    if args.log:
        with open(args.log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
