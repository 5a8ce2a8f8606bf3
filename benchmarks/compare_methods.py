"""Does SSAT defend? Clean and PGD-20 accuracy of standard, PGD-AT, TRADES and SSAT, trained alike.

    python benchmarks/compare_methods.py [--data phantom] [--epochs 10] [--fractions 0.1] [--ssat-fractions 1.0]

Every method trains with the train CLI's defaults (`medrobust.train.train`, --detector false) for the
same number of epochs (equal epochs = equal optimizer steps, see medrobust.data.pipeline) at each label
fraction in --fractions; SSAT is also trained at each of --ssat-fractions (e.g. 1.0: all labels, the
unlabeled batch is the labeled one). Extra SSAT rows: --teacher-row, pseudo-labels from the frozen
standard model of the same fraction (--teacher PATH, no pre-training); --current-model-row, pseudo-labels
from the model being trained (--teacher none), the variant that collapses on the phantom.
Each model is then attacked on the test split with `medrobust.attacks.PGD(model, steps=20)` (L-inf,
random start) at every --eps, and the script prints a markdown table. Finished runs under --out are
reused; run folders carry a fingerprint of the data, so a changed dataset trains afresh.
Results on the phantom are on SYNTHETIC data and say nothing clinical.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="phantom", help="phantom | octmnist | auto | PATH (as the train CLI)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fractions", default="0.1", help="label fractions every method trains at")
    parser.add_argument("--ssat-fractions", default="1.0", help="extra label fractions for SSAT only ('' = none)")
    parser.add_argument("--methods", default="standard,pgd_at,trades,ssat")
    parser.add_argument("--teacher-row", default="true", choices=("true", "false"),
                        help="also train SSAT with the standard model as its frozen teacher")
    parser.add_argument("--current-model-row", default="true", choices=("true", "false"),
                        help="also train SSAT with pseudo-labels from the current model (--teacher none)")
    parser.add_argument("--eps", default="0.002,0.004", help="L-inf test budgets in [0, 1] pixel scale")
    parser.add_argument("--attack-steps", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=0, help="attack only the first N test images (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--out", default="runs/compare_methods")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train() option for every run, e.g. lam=1.0 or eps=0.001,0.003 (repeatable)")
    args = parser.parse_args()

    from medrobust.attacks import PGD, accuracy, robust_accuracy
    from medrobust.data import load_data
    from medrobust.models import load_classifier
    from medrobust.train import train

    extra = dict(option.split("=", 1) for option in args.train_option)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    fractions = _floats(args.fractions)
    runs = [(m, m, f, {}) for f in fractions for m in methods]  # (row label, method, fraction, options)
    runs += [("ssat", "ssat", f, {}) for f in _floats(args.ssat_fractions)
             if f not in fractions or "ssat" not in methods]
    if args.teacher_row == "true":
        runs += [("ssat, teacher = standard model", "ssat", f, {"teacher": "standard", "pretrain_epochs": 0.0})
                 for f in fractions]
    if args.current_model_row == "true":
        runs += [("ssat, teacher = current model", "ssat", f, {"teacher": "none"}) for f in fractions]
    eps_list = _floats(args.eps)

    data = load_data(args.data, seed=args.seed)
    fingerprint = hashlib.sha1(b"".join(data[s][0][:64].tobytes() + data[s][1].tobytes()
                                        for s in ("train", "val", "test"))).hexdigest()[:8]
    x_test, y_test = data["test"]
    if args.n_test:
        x_test, y_test = x_test[:args.n_test], y_test[:args.n_test]

    rows, folders = [], {}
    for label, method, fraction, options in runs:
        options = {**extra, **options}
        tag = {None: "", "standard": "_teacher", "none": "_selflabel"}.get(options.get("teacher"), "_custom")
        out = Path(args.out) / f"{method}{tag}_frac{fraction:g}_ep{args.epochs}_seed{args.seed}_data{fingerprint}"
        if options.get("teacher") == "standard":
            if ("standard", fraction) not in folders:
                raise SystemExit("--teacher-row needs the standard method in --methods")
            options["teacher"] = str(folders["standard", fraction] / "classifier.keras")
        started = time.time()
        metrics = train(data=args.data, method=method, label_fraction=fraction, epochs=args.epochs, out=str(out),
                        detector="false", progress="false", seed=args.seed, width=args.width, **options)
        folders[label, fraction] = out
        model = load_classifier(out / "classifier.keras")
        attack = PGD(model, steps=args.attack_steps)
        robust = [robust_accuracy(model, attack, x_test, y_test, eps, progress=False) for eps in eps_list]
        rows.append((label, fraction, accuracy(model, x_test, y_test), robust,
                     metrics.get("train_seconds_last_session")))
        print(f"{label} @ {fraction:g}: clean {rows[-1][2]:.3f}, PGD-{args.attack_steps} "
              + ", ".join(f"eps {e:g}: {r:.3f}" for e, r in zip(eps_list, robust))
              + f" ({time.time() - started:.0f} s)", flush=True)

    kind = "SYNTHETIC phantom (computer-generated, not real OCT)" if data.synthetic else "real scans"
    print(f"\nData: {data.source} (fingerprint {fingerprint}), {kind}; {len(y_test)} test images; "
          f"{args.epochs} epochs each; seed {args.seed}; "
          f"attack: PGD-{args.attack_steps} L-inf, random start" + (f"; train options {extra}" if extra else ""))
    print()
    print("| method | label fraction | clean | " + " | ".join(f"PGD-{args.attack_steps} eps={e:g}" for e in eps_list)
          + " | train s (last session) |")
    print("|---|---:|---:|" + "---:|" * len(eps_list) + "---:|")
    for method, fraction, clean, robust, seconds in rows:
        print(f"| {method} | {fraction:g} | {clean:.3f} | " + " | ".join(f"{r:.3f}" for r in robust)
              + f" | {seconds if seconds is not None else '-'} |")
    if data.synthetic:
        print("\nSYNTHETIC data: these numbers exercise the code; they are not evidence about real OCT scans.")


if __name__ == "__main__":
    main()
