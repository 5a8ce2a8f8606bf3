"""Time a full evaluation, and show in the same run what the sweep's shortcuts save and that they cost no
attack strength.

    python benchmarks/evaluate.py --run RUN [--data PATH] [--limit N] [--attacks fgsm,pgd,apgd,cw,square,fmn]
                                  [--compare-images 100] [--art-images 256]

Without --run it trains a quick standard system (small CNN + UAD) on the SYNTHETIC phantom first (not
timed). The images are the test split of --data (default: what the run was trained on; the phantom gets
--n fresh SYNTHETIC images). Prints, each as it is measured:
1. the evaluation `python -m medrobust.evaluate` does (SystemEvaluator: every attack at every budget,
   the adaptive sweep included): wall and process-CPU seconds per attack, and the total;
2. on --compare-images of those images, for PGD and APGD at every budget: the sweep (clean errors skipped,
   warm start from the last budget, fooled images kept) against independent cold-start runs of the same
   attack on every image (how the evaluation ran before): time ratio and both robust accuracies;
3. on the same images at the largest budget, the adaptive PGD attacker: the sweep (one shared detector
   pass per step, caught adversaries only, warm start, early exit over the weights) against the former
   way (classifier and detector called separately for the loss and again for success, every image, every
   weight): time ratio and both system risks;
4. APGD-CE-100 throughput on the classifier against IBM ART's AutoProjectedGradientDescent (one start each,
   early stopping off in ours so both do every step on every image; one warm-up call each, then the
   median of --repeats calls), with both robust accuracies as a sanity check.
On a shared machine the wall times grow with other processes' load (printed); CPU seconds much less.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def clock():
    return time.perf_counter(), time.process_time()


def since(start) -> tuple[float, float]:
    return time.perf_counter() - start[0], time.process_time() - start[1]


def main() -> None:
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run folder (default: train a quick phantom system)")
    parser.add_argument("--data", help="images to evaluate on (default: the run's training data's test split)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images of a fixed shuffle")
    parser.add_argument("--n", type=int, default=1000, help="fresh phantom test images when the data is the phantom")
    parser.add_argument("--eps", default="0.001,0.002,0.004,0.008")
    parser.add_argument("--attacks", default="fgsm,pgd,apgd,cw,square,fmn")
    parser.add_argument("--adaptive", default="true")
    parser.add_argument("--compare-images", type=int, default=100, help="images for parts 2 and 3 (0 = skip)")
    parser.add_argument("--art-images", type=int, default=256, help="images for the APGD vs ART timing (0 = skip)")
    parser.add_argument("--art-eps", type=float, default=0.004)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    run = Path(args.run) if args.run else _quick_run()
    from medrobust.cli import import_tensorflow

    import_tensorflow()
    import numpy as np

    from medrobust.detection import Detector
    from medrobust.evaluation.runner import SystemEvaluator
    from medrobust.evaluation.suite import NORMS
    from medrobust.io import read_run_config
    from medrobust.models import load_classifier

    config = read_run_config(run)
    clf = load_classifier(run / "classifier.keras")
    det = Detector.load(run / "detector", clf) if (run / "detector").exists() else None
    x, y, what = _images(args, config)
    budgets = [float(e) for e in args.eps.split(",")]
    side = float(np.prod(x.shape[1:])) ** 0.5
    adaptive = args.adaptive.lower() == "true"
    print(f"evaluation of {len(y)} {what} at eps {args.eps} ({os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}); detector: {det is not None}; adaptive: {adaptive}", flush=True)
    start = clock()
    evaluator = SystemEvaluator(clf, det, x, y, progress=False)
    evaluator.clean_report()
    wall, cpu = since(start)
    print(f"  {'clean + detector scores':32s} {wall:8.1f} s {cpu:8.1f} CPU s", flush=True)
    for name in args.attacks.split(","):  # each line as its sweep ends: a full run takes long
        t = clock()
        own = [e * side for e in budgets] if NORMS[name] == "l2" else budgets
        for _ in evaluator.sweep(name, own, adaptive=adaptive):
            pass
        wall_a, cpu_a = since(t)
        label = name + (" (+ adaptive sweep)" if adaptive and name in ("pgd", "apgd") and det else "")
        print(f"  {label:32s} {wall_a:8.1f} s {cpu_a:8.1f} CPU s", flush=True)
    wall, cpu = since(start)
    print(f"  {'total':32s} {wall:8.1f} s {cpu:8.1f} CPU s  (load average now {os.getloadavg()[0]:.1f})", flush=True)
    if args.compare_images:
        k = min(args.compare_images, len(y))
        sweep_against_cold_starts(clf, det, x[:k], y[:k], budgets)
        if det is not None and adaptive:
            adaptive_against_former_way(clf, det, x[:k], y[:k], max(budgets))
    if args.art_images:
        apgd_against_art(clf, x[:args.art_images], y[:args.art_images], args.art_eps, args.repeats)


def _images(args, config):
    import numpy as np

    from medrobust.data import load_data
    from medrobust.data.phantom import make_phantom

    data = args.data or config["data"]
    if data == "phantom":
        x, y = make_phantom(args.n, config["image_size"], seed=12345)  # fresh SYNTHETIC test images
        what = "fresh SYNTHETIC phantom images"
    else:
        dataset = load_data(data, image_size=config["image_size"], seed=config.get("seed", 0))
        x, y = dataset["test"]
        what = f"test images of {dataset.source} ({'SYNTHETIC' if dataset.synthetic else 'real scans'})"
    if args.limit:
        keep = np.sort(np.random.default_rng(0).permutation(len(y))[:args.limit])
        x, y = x[keep], y[keep]
    return x, y, what


def sweep_against_cold_starts(clf, det, x, y, budgets) -> None:
    import keras
    import numpy as np

    from medrobust.attacks import predict_labels
    from medrobust.evaluation.runner import SystemEvaluator
    from medrobust.evaluation.suite import AttackSettings, make_attack

    print(f"sweep vs independent cold-start runs at every budget, {len(y)} images (plain attacks):", flush=True)
    for name in ("pgd", "apgd"):
        keras.utils.set_random_seed(0)
        evaluator = SystemEvaluator(clf, det, x, y, progress=False)
        attack = make_attack(name, clf, AttackSettings())
        for warm in (evaluator._attack(name), attack):  # tracing is not what is compared
            warm.run(x[:2], y[:2], budgets[0])
        t = clock()
        swept = {eps: entry["robust_accuracy"] for eps, entry, _, _ in evaluator.sweep(name, budgets)}
        wall_sweep, _ = since(t)  # includes its figures (a prediction and detector scoring per budget)
        t = clock()
        cold = {}
        for eps in budgets:
            x_adv = np.concatenate([attack.run(x[i:i + 250], y[i:i + 250], eps)[0] for i in range(0, len(y), 250)])
            cold[eps] = float(np.mean(predict_labels(clf, x_adv) == y))
        wall_cold, _ = since(t)
        rows = ", ".join(f"eps {e:g}: {swept[e]:.3f} vs {cold[e]:.3f}" for e in budgets)
        print(f"  {name}: sweep {wall_sweep:.1f} s vs cold starts {wall_cold:.1f} s "
              f"({wall_cold / wall_sweep:.2f}x faster); robust accuracy sweep vs cold: {rows}", flush=True)


def adaptive_against_former_way(clf, det, x, y, eps) -> None:
    import numpy as np
    import tensorflow as tf

    from medrobust.attacks import PGD, attack_batches, predict_labels
    from medrobust.attacks.losses import misclassified
    from medrobust.evaluation.adaptive import DEFAULT_WEIGHTS, margin_term
    from medrobust.evaluation.runner import SystemEvaluator

    print(f"adaptive PGD-20 at eps {eps:g}, {len(y)} images: the sweep vs the former way", flush=True)
    evaluator = SystemEvaluator(clf, det, x, y, progress=False)
    evaluator._attack("pgd", adaptive=True).run(x[:2], y[:2], eps)  # tracing is not what is compared
    t = clock()
    (_, entry, _, _), = evaluator.sweep("pgd", [eps], adaptive=True)
    wall_new, _ = since(t)
    threshold = tf.constant(det.threshold, tf.float32)
    weight = tf.Variable(0.0)

    def objective(xa, ya):  # the former objective: classifier and detector called separately
        return margin_term(clf(xa, training=False), ya) - weight * tf.nn.relu(det.score_tensor(xa)["combined"] - threshold)

    def success(xa, ya):
        return misclassified(clf(xa, training=False), ya) & (det.score_tensor(xa)["combined"] <= threshold)

    attack = PGD(clf, steps=20, objective_fn=objective, success_fn=success)
    plain = PGD(clf, steps=20)
    for warm in (attack, plain):
        warm.run(x[:2], y[:2], eps)
    clean_correct = predict_labels(clf, x) == y
    silent_any = np.zeros(len(y), bool)
    t = clock()
    x_plain = attack_batches(plain, x, y, eps, progress=False)
    silent_any |= (predict_labels(clf, x_plain) != y) & ~det.predict(x_plain) & clean_correct
    for w in DEFAULT_WEIGHTS:
        weight.assign(w)
        x_w = attack_batches(attack, x, y, eps, progress=False)
        silent_any |= (predict_labels(clf, x_w) != y) & ~det.predict(x_w) & clean_correct
    wall_old, _ = since(t)
    old_risk = float(silent_any.sum() / max(clean_correct.sum(), 1))
    print(f"  sweep {wall_new:.1f} s (system risk {entry['adaptive']['system_risk']:.3f}) vs former way "
          f"{wall_old:.1f} s (system risk {old_risk:.3f}): {wall_old / wall_new:.2f}x faster", flush=True)


def apgd_against_art(model, x, y, eps: float, repeats: int) -> None:
    import numpy as np

    from attacks import art_apgd, art_classifier, median_seconds
    from medrobust.attacks import APGD

    ours = APGD(model, steps=100, loss="ce", early_stop=False)
    theirs = art_apgd(art_classifier(model, x.shape[1:]), eps, 100, len(x))
    adv = {}

    def run_ours():
        adv["medrobust"] = ours.run(x, y, eps)[0]

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
