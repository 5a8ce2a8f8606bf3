"""Time a full evaluation: every attack (and the adaptive sweep) on N test images at 4 budgets.

python benchmarks/evaluate.py [--run RUN] [--n 1000] [--attacks fgsm,pgd,apgd,cw,square]

Without --run it trains a quick standard system (small CNN + UAD) on the SYNTHETIC phantom first (not
timed). Prints the wall time of each attack's sweep and the total, from one run on this machine's CPU.
APGD-100 throughput against IBM ART's APGD is printed by benchmarks/attacks.py.
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run folder (default: train a quick phantom system)")
    parser.add_argument("--n", type=int, default=1000, help="test images")
    parser.add_argument("--eps", default="0.001,0.002,0.004,0.008")
    parser.add_argument("--attacks", default="fgsm,pgd,apgd,cw,square")
    parser.add_argument("--adaptive", default="true")
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
    started = time.perf_counter()
    evaluator = SystemEvaluator(clf, det, x, y, progress=False)
    evaluator.clean_report()
    timings = {"clean + detector scores": time.perf_counter() - started}
    adaptive = args.adaptive.lower() == "true"
    for name in args.attacks.split(","):
        t = time.perf_counter()
        for eps in (float(e) for e in args.eps.split(",")):
            evaluator.attack_entry(name, eps, adaptive=adaptive)
        timings[name + (" (+ adaptive sweep)" if adaptive and name in ("pgd", "apgd") and det else "")] = time.perf_counter() - t
    total = time.perf_counter() - started
    print(f"evaluation of {args.n} SYNTHETIC phantom images at eps {args.eps} "
          f"({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}); detector: {det is not None}")
    for name, seconds in timings.items():
        print(f"  {name:32s} {seconds:8.1f} s")
    print(f"  {'total':32s} {total:8.1f} s  ({args.n * len(args.eps.split(',')) / total:.1f} image-budgets/s)")


def _quick_run() -> Path:
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "medrobust.train", "--data", "phantom", "--method", "standard", "--label-fraction",
           "1.0", "--epochs", "5", "--detector-epochs", "5", "--progress", "false", "--out", str(out)]
    print("training a quick SYNTHETIC phantom system:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return out


if __name__ == "__main__":
    main()
