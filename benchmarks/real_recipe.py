"""Train one recipe on real scans and measure it on the VALIDATION split (the test split only on request).

    python benchmarks/real_recipe.py --data ../shared/data/kermany --image-size 64 --arch strided_cnn \
        --epochs 30 [--augment true|false] [--class-weight balanced|none] [--log runs/recipes.jsonl] [--test]

This is how the defaults of `python -m medrobust.train` for real data were chosen (README, "Training on real
scans"): candidates are compared on kermany/val (189 scans of 126 patients none of which is in train) and
the test split is reported once per chosen configuration (--test). The training is the train CLI's own
(same model builder, trainer, input pipeline, class weights, cosine schedule), without the detector.

Prints and appends to --log one JSON line: parameters and multiply-adds of the model, data load time,
seconds per epoch (first epoch, with tracing, separately), accuracy, balanced accuracy and per-class
sensitivity on val (and test with --test). The machine load (os.getloadavg) is recorded with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import time


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


def per_class(classifier, x, y, classes) -> dict:
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, recall_score

    pred = np.argmax(classifier.predict(x, batch_size=256, verbose=0), axis=-1)
    sens = recall_score(y, pred, labels=list(range(len(classes))), average=None, zero_division=0)
    return {"accuracy": round(float(np.mean(pred == y)), 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4),
            "sensitivity": {c: round(float(s), 4) for c, s in zip(classes, sens)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", action="store_true", help="also report the test split (chosen configurations only)")
    parser.add_argument("--save", default=None, help="save the classifier here (.keras)")
    parser.add_argument("--log", default=None, help="append the JSON line to this file")
    args = parser.parse_args()

    from medrobust import cli
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
    from medrobust.train import learning_rate, trainer_options, training_recipe
    from medrobust.training import make_trainer

    keras.utils.set_random_seed(args.seed)
    x, y = data["train"]
    o = {"augment": args.augment, "class_weight": args.class_weight, "method": args.method, "lr": args.lr,
         "epochs": args.epochs, "lr_schedule": "cosine", "train_eps": 0.004, "pgd_steps": 10, "beta": 6.0}
    recipe = training_recipe(o, data, y)
    classifier = build_classifier(args.arch, args.image_size, args.width)
    steps = steps_per_epoch(len(x), args.batch_size)
    trainer = make_trainer(args.method, classifier, class_weights=recipe["class_weights"],
                           **trainer_options(o, None, steps))
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate(o, steps)))

    epoch_times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.time()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.time() - self.t)

    load_before = os.getloadavg()[0]
    started = time.time()
    history = trainer.fit(train_dataset(x, y, args.batch_size, args.seed, augment=recipe["augmentation"]),
                          epochs=args.epochs, steps_per_epoch=steps, validation_data=eval_dataset(*data["val"]),
                          callbacks=[Timer()], verbose=2)
    train_seconds = time.time() - started
    row = {
        "data": data.describe(), "arch": args.arch, "width": args.width, "image_size": args.image_size,
        "method": args.method, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "augment": args.augment, "class_weight": args.class_weight, "seed": args.seed,
        "params": int(classifier.count_params()), "macs": count_macs(classifier, args.image_size),
        "load_seconds": round(load_seconds, 2), "train_seconds": round(train_seconds, 1),
        "first_epoch_seconds": round(epoch_times[0], 1),
        "epoch_seconds": round(float(np.median(epoch_times[1:] or epoch_times)), 2),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "val_accuracy_by_epoch": [round(float(a), 4) for a in history.history["val_accuracy"]],
        "val": per_class(classifier, *data["val"], data.classes),
    }
    if args.test:
        row["test"] = per_class(classifier, *data["test"], data.classes)
    if args.save:
        classifier.save(args.save)
    line = json.dumps(row)
    print(line)
    if args.log:
        with open(args.log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
