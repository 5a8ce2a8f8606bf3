"""Time of one training step of each method over a standard (clean) step, from one run.

    python benchmarks/ssat_step.py [--batch-size 64] [--width 32] [--steps 30] [--jit]

    python benchmarks/ssat_step.py --image-size 64 --arch strided_cnn   # the real-scan setting of issue #22

Every method sees the same labeled batch; SSAT also gets an unlabeled batch of the same size (the
train CLI's default). "ssat (fgsm)" takes pseudo-labels from the current model, so one inference
forward pass of x_u gives both the labels and the FGSM gradient; the paper's form with its snapshot
teacher adds one inference pass of x_u. Steps are compiled tf.functions of the trainers' own
`train_step`; after a warm-up the methods are timed in interleaved rounds (so load from other processes
hits all of them alike) and the median per method is reported.

The robust self-training form (loss="trades", the train CLI's default for --method ssat) attacks the
labeled and the unlabeled batch (twice TRADES' images) and runs two training-mode passes over both; its
rows use a snapshot teacher (the same cost as the CLI's trained standard teacher: one inference pass of
x_u) and are timed after pre-training (during it the PGD forms skip their attacks). One row per inner
KL step count (PGD-10, 5, 3 and one step from TRADES' Gaussian start), and the CLI default, --attack
free, whose adversaries come from the update's own backward pass (no attack pass at all). Goals:
SSAT (FGSM) <= 3x and the CLI default <= 5x a standard step.

Design choices this measures: SSAT's update runs x and x_adv through two training-mode passes (each
with its own BatchNorm batch statistics); the "joint forward" variant concatenates them into one pass
(shared statistics, a different method) and was not faster on CPU. --jit (XLA) was much slower on CPU
in TF 2.21, most of all for the PGD loops, so the trainers do not use it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

RST_STEPS = (10, 5, 3)  # inner PGD steps of the robust self-training rows (plus --pgd-steps)
DEFAULT_FORM = "ssat trades (--attack free: one backward pass, the CLI default)"
GOALS = {"ssat (fgsm)": 3.0, DEFAULT_FORM: 5.0}  # x standard (README, issue #22)


def main() -> None:
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="labeled and unlabeled batch size")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--width", type=int, default=None, help="model width (default: the architecture's)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pgd-steps", type=int, default=10, help="k of PGD-AT and TRADES")
    parser.add_argument("--jit", action="store_true", help="XLA-compile every step (jit_compile=True)")
    parser.add_argument("--no-variants", action="store_true", help="skip SSAT's joint-forward and PGD variants")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the snapshot-teacher rows pre-train for one step)")
    from medrobust.cli import import_tensorflow

    import_tensorflow()  # without TensorFlow's CPU start-up noise (cuInit)

    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per trainer: the retracing notice is expected
    from medrobust.models import build_classifier
    from medrobust.training import make_trainer

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 1)
    x = tf.constant(rng.uniform(0, 1, shape).astype(np.float32))
    x_u = tf.constant(rng.uniform(0, 1, shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 4, args.batch_size))

    k = args.pgd_steps
    methods = {  # name: (method, options, batch)
        "standard": ("standard", {}, (x, y)),
        "ssat (fgsm)": ("ssat", {}, ((x, x_u), y)),
        # Timed after the warm-up, i.e. after its one labeled-only pre-training step.
        "ssat (fgsm, snapshot teacher: the paper's form, --ssat-loss ce --teacher snapshot)": (
            "ssat", dict(teacher="snapshot", pretrain_steps=1),
                                                       ((x, x_u), y)),
        f"pgd_at-{k}": ("pgd_at", dict(eps=0.004, steps=k), (x, y)),
        f"trades-{k}": ("trades", dict(eps=0.004, steps=k), (x, y)),
    }
    # SSAT's robust self-training form (the train CLI's default): labeled and unlabeled batches both
    # attacked (2x the images of TRADES) with a frozen teacher (a trained standard model in the CLI;
    # here a snapshot, which costs the same: one inference pass of x_u), at each inner-step count.
    trades_form = dict(loss="trades", eps_range=(0.004, 0.004), teacher="snapshot", pretrain_steps=1)
    for steps_k in sorted({k, *RST_STEPS}, reverse=True):
        methods[f"ssat trades (kl pgd-{steps_k})"] = ("ssat", {**trades_form, "pgd_steps": steps_k}, ((x, x_u), y))
    methods["ssat trades (kl one step from TRADES' start, --attack fgsm)"] = (
        "ssat", {**trades_form, "attack": "fgsm"}, ((x, x_u), y))
    methods[DEFAULT_FORM] = ("ssat", {**trades_form, "attack": "free"}, ((x, x_u), y))
    methods["ssat trades (free with N-FGSM noise, --attack free --free-noise 2)"] = (
        "ssat", {**trades_form, "attack": "free", "free_noise": 2.0}, ((x, x_u), y))
    if not args.no_variants:
        methods["ssat (fgsm, joint forward)"] = ("ssat", dict(joint_forward=True), ((x, x_u), y))
        methods[f"ssat (pgd-{k})"] = ("ssat", dict(attack="pgd", pgd_steps=k), ((x, x_u), y))

    steps = {}
    for name, (method, options, batch) in methods.items():
        keras.utils.set_random_seed(0)
        classifier = build_classifier(args.arch, args.image_size, args.width)
        trainer = make_trainer(method, classifier, **options)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        trainer.optimizer.build(classifier.trainable_variables)
        step = tf.function(trainer.train_step, jit_compile=args.jit)
        for _ in range(args.warmup):
            step(batch)["loss"].numpy()
        steps[name] = (step, batch)

    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, (step, batch) in steps.items():
            start = time.perf_counter()
            step(batch)["loss"].numpy()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["standard"]
    print(f"CPU: {_cpu_model()}, {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.arch} width {args.width or 'default'}, {args.image_size}px, batch {args.batch_size} labeled"
          f" (+{args.batch_size} unlabeled for SSAT), jit_compile={args.jit}, median of {args.steps} steps,"
          f" TF {tf.__version__}, {tf.config.threading.get_intra_op_parallelism_threads() or 'default'} threads\n")
    print("| method | ms / step | x standard |")
    print("|---|---:|---:|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f} |")
    print()
    for name, goal in GOALS.items():
        ratio = median[name] / base
        print(f"{name} / standard = {ratio:.2f} (goal <= {goal:g}): {'met' if ratio <= goal else 'NOT met'}")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
