"""Attack throughput: medrobust's compiled PGD / APGD vs IBM ART, and vs a bare eager gradient loop.

    python benchmarks/attacks.py [--batch 256] [--size 28] [--width 32] [--repeats 3] [--jit]

One model (the default small CNN, random weights: speed does not depend on training) and one batch
of phantom scans, L-inf eps = 4/255. Labels are the model's own predictions, so every image starts
correctly classified; ART only attacks such images, so both libraries do the full work on every
image. Our attacks run with early_stop=False for the same reason (early stopping only saves time).
Every attack is called once before timing (warm-up: tf.function tracing and ART's own set-up are
EXCLUDED); each figure is the median over --repeats timed calls. Prints images/s and ratios:
  - PGD-10: ours vs ART ProjectedGradientDescent (max_iter=10, one random start);
  - PGD-10: ours vs a bare eager loop of 10 tf.GradientTape gradient evaluations (no sign, step,
    projection or bookkeeping), the floor for any 10-step gradient attack run eagerly;
  - APGD-100 (CE): ours vs ART AutoProjectedGradientDescent (max_iter=100, one start).
--jit adds our attacks compiled with XLA: on CPU they were 4-6x SLOWER than the default graph
(oneDNN kernels) in our runs, so jit_compile=True is for GPUs/TPUs.
The machine's load (other processes) is printed too: on a shared CPU the absolute numbers move, the
ratios less so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np


def median_seconds(name: str, fn, repeats: int) -> float:
    print(f"timing {name} ...", file=sys.stderr, flush=True)
    fn()  # warm-up: tracing / set-up excluded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def art_classifier(model, input_shape):
    """IBM ART's wrapper of a Keras logits model on [0, 1] images."""
    import keras

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.estimators.classification import TensorFlowV2Classifier
    return TensorFlowV2Classifier(model, nb_classes=int(model.output_shape[-1]), input_shape=input_shape,
                                  loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                  clip_values=(0.0, 1.0))


def art_apgd(classifier, eps: float, steps: int, batch_size: int):
    """ART's APGD-CE, one start, as AutoAttack configures it (initial step 2 * eps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.evasion import AutoProjectedGradientDescent
    return AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
                                        nb_random_init=1, batch_size=batch_size, loss_type="cross_entropy",
                                        verbose=False)


def main() -> None:
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="images per attack call")
    parser.add_argument("--size", type=int, default=28, help="image side (pixels)")
    parser.add_argument("--width", type=int, default=None, help="small CNN width (default: the model's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per attack (median reported)")
    parser.add_argument("--eps", type=float, default=4 / 255)
    parser.add_argument("--jit", action="store_true", help="also time our attacks with jit_compile=True (XLA)")
    parser.add_argument("--skip-art", action="store_true", help="only our attacks and the eager loop")
    args = parser.parse_args()
    from medrobust.cli import import_tensorflow

    import_tensorflow()  # without TensorFlow's CPU start-up noise (cuInit)

    import keras
    import tensorflow as tf

    from medrobust.attacks import APGD, PGD, predict_labels
    from medrobust.data.phantom import make_phantom
    from medrobust.models import build_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier("small_cnn", args.size, width=args.width)
    x, _ = make_phantom(args.batch, args.size, seed=0)
    y = predict_labels(model, x)
    eps, n = args.eps, args.batch
    xt, yt = tf.constant(x), tf.constant(y, tf.int32)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def eager_loop():
        x_adv = xt
        for _ in range(10):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = loss_object(yt, model(x_adv, training=False))
            x_adv = x_adv + 0.0 * tape.gradient(loss, x_adv)  # use the gradient, nothing else
        return x_adv.numpy()

    ours_pgd = PGD(model, steps=10, early_stop=False)
    ours_apgd = APGD(model, steps=100, loss="ce", early_stop=False)
    results: dict[str, float] = {}
    results["ours PGD-10"] = median_seconds("ours PGD-10", lambda: ours_pgd(xt, yt, eps).numpy(), args.repeats)
    results["eager 10 gradients"] = median_seconds("eager 10 gradients", eager_loop, args.repeats)
    results["ours APGD-100"] = median_seconds("ours APGD-100", lambda: ours_apgd(xt, yt, eps).numpy(), args.repeats)
    if args.jit:
        jit_pgd = PGD(model, steps=10, early_stop=False, jit_compile=True)
        jit_apgd = APGD(model, steps=100, loss="ce", early_stop=False, jit_compile=True)
        results["ours PGD-10 (XLA)"] = median_seconds("ours PGD-10 (XLA)", lambda: jit_pgd(xt, yt, eps).numpy(), args.repeats)
        results["ours APGD-100 (XLA)"] = median_seconds("ours APGD-100 (XLA)", lambda: jit_apgd(xt, yt, eps).numpy(),
                                               args.repeats)
    if not args.skip_art:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import art
            from art.attacks.evasion import ProjectedGradientDescent
        classifier = art_classifier(model, x.shape[1:])
        art_pgd = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=0.25 * eps, max_iter=10,
                                           num_random_init=1, batch_size=n, verbose=False)
        art_apgd100 = art_apgd(classifier, eps, 100, n)
        results["ART PGD-10"] = median_seconds("ART PGD-10", lambda: art_pgd.generate(x, y), args.repeats)
        results["ART APGD-100"] = median_seconds("ART APGD-100", lambda: art_apgd100.generate(x, y), args.repeats)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}"
          + ("" if args.skip_art else f", ART {art.__version__}")
          + f"; {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"model small_cnn {args.size}x{args.size} width {model.get_layer('features').units // 4}, "
          f"{model.count_params():,} parameters; batch {n}; eps {eps:.4f}; "
          f"median of {args.repeats} timed calls after one warm-up call (tracing excluded)")
    print(f"{'attack':<24}{'seconds':>10}{'images/s':>12}")
    for name, seconds in results.items():
        print(f"{name:<24}{seconds:>10.3f}{n / seconds:>12.1f}")
    print("ratios (throughput; > 1 means ours is faster):")
    print(f"  PGD-10  ours / eager 10-gradient loop: {results['eager 10 gradients'] / results['ours PGD-10']:.2f}x")
    if not args.skip_art:
        print(f"  PGD-10  ours / ART:                    {results['ART PGD-10'] / results['ours PGD-10']:.2f}x")
        print(f"  APGD-100 ours / ART:                   {results['ART APGD-100'] / results['ours APGD-100']:.2f}x")
    if args.jit:
        print(f"  PGD-10  ours XLA / ours:               {results['ours PGD-10'] / results['ours PGD-10 (XLA)']:.2f}x")
        print(f"  APGD-100 ours XLA / ours:              "
              f"{results['ours APGD-100'] / results['ours APGD-100 (XLA)']:.2f}x")


if __name__ == "__main__":
    main()
