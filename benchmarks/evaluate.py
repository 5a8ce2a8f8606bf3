"""Time a full evaluation: every attack (and the adaptive sweep) on N test images at 4 budgets.

python benchmarks/evaluate.py [--run RUN] [--n 1000] [--attacks fgsm,pgd,apgd,cw,square]

Without --run it trains a quick standard system (small CNN + UAD) on the SYNTHETIC phantom first (not
timed). Prints the wall time of each attack's sweep and the total, from one run on this machine's CPU,
then APGD-CE-100 throughput on the same classifier against IBM ART's AutoProjectedGradientDescent
(one start each, early stopping off in ours so both do every step on every image; one warm-up call
each, then the median of --repeats calls), with both robust accuracies as a sanity check.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run folder (default: train a quick phantom system)")
    parser.add_argument("--n", type=int, default=1000, help="test images")
    parser.add_argument("--eps", default="0.001,0.002,0.004,0.008")
    parser.add_argument("--attacks", default="fgsm,pgd,apgd,cw,square")
    parser.add_argument("--adaptive", default="true")
    parser.add_argument("--art-images", type=int, default=256, help="images for the APGD vs ART timing (0 = skip)")
    parser.add_argument("--art-eps", type=float, default=0.004)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    run = Path(args.run) if args.run else _quick_run()
    from medrobust.cli import import_tensorflow

    import_tensorflow()
    from medrobust.data.phantom import make_phantom
    from medrobust.detection import Detector
    from medrobust.evaluation.runner import SystemEvaluator
    from medrobust.io import read_json
    from medrobust.models import load_classifier

    config = read_json(run / "config.json")
    clf = load_classifier(run / "classifier.keras")
    det = Detector.load(run / "detector", clf) if (run / "detector").exists() else None
    x, y = make_phantom(args.n, config["image_size"], seed=12345)  # fresh SYNTHETIC test images
    print(f"evaluation of {args.n} SYNTHETIC phantom images at eps {args.eps} "
          f"({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}); detector: {det is not None}")
    started = time.perf_counter()
    evaluator = SystemEvaluator(clf, det, x, y, progress=False)
    evaluator.clean_report()
    print(f"  {'clean + detector scores':32s} {time.perf_counter() - started:8.1f} s", flush=True)
    adaptive = args.adaptive.lower() == "true"
    for name in args.attacks.split(","):  # each line as its sweep ends: a full run takes long
        t = time.perf_counter()
        for eps in (float(e) for e in args.eps.split(",")):
            evaluator.attack_entry(name, eps, adaptive=adaptive)
        label = name + (" (+ adaptive sweep)" if adaptive and name in ("pgd", "apgd") and det else "")
        print(f"  {label:32s} {time.perf_counter() - t:8.1f} s", flush=True)
    total = time.perf_counter() - started
    print(f"  {'total':32s} {total:8.1f} s  ({args.n * len(args.eps.split(',')) / total:.1f} image-budgets/s)")
    if args.art_images:
        apgd_against_art(clf, x[:args.art_images], y[:args.art_images], args.art_eps, args.repeats)


def apgd_against_art(model, x, y, eps: float, repeats: int) -> None:
    import numpy as np
    import tensorflow as tf

    from attacks import art_apgd, art_classifier, median_seconds
    from medrobust.attacks import APGD

    ours = APGD(model, steps=100, loss="ce", early_stop=False)
    theirs = art_apgd(art_classifier(model, x.shape[1:]), eps, 100, len(x))
    adv = {}
    xt, yt = tf.constant(x), tf.constant(y, tf.int32)

    def run_ours():
        adv["medrobust"] = ours(xt, yt, eps).numpy()

    def run_art():
        adv["ART"] = theirs.generate(x, y)

    seconds = {"medrobust": median_seconds("medrobust APGD-100", run_ours, repeats),
               "ART": median_seconds("ART APGD-100", run_art, repeats)}
    print(f"APGD-CE-100 on the same classifier, {len(x)} images, eps {eps:g} (median of {repeats} calls after a warm-up):")
    for name, s in seconds.items():
        accuracy = float(np.mean(np.argmax(model.predict(adv[name], verbose=0), 1) == y))
        print(f"  {name:10s} {s:7.2f} s  {len(x) / s:7.1f} images/s  robust accuracy {accuracy:.3f}")
    print(f"  throughput ratio medrobust / ART: {seconds['ART'] / seconds['medrobust']:.2f}x")


def _quick_run() -> Path:
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "medrobust.train", "--data", "phantom", "--method", "standard", "--label-fraction",
           "1.0", "--epochs", "5", "--detector-epochs", "5", "--progress", "false", "--out", str(out)]
    print("training a quick SYNTHETIC phantom system:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return out


if __name__ == "__main__":
    main()
