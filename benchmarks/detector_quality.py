"""How well does the UAD detector catch PGD adversaries, and what does it make of real scans?

    python benchmarks/detector_quality.py                       # phantom, eps 0.001..0.008
    python benchmarks/detector_quality.py --out runs/detector_quality.md

1. Trains a standard small CNN (cross-entropy, cosine learning-rate decay) and fits the detector
   (default rule "max"); the rules "sum" and "max_all" are re-calibrated on the same validation
   images (same autoencoder and Gaussians) for comparison.
2. For each eps: PGD-Linf (20 steps) on the first --n-attack test images; AUROC of every score,
   all clean test images vs the SUCCESSFUL adversaries of correctly classified images (an attack
   that did not change the class needs no detecting; the "all" column counts every PGD output).
   Plain baselines on the same adversaries: Mahalanobis alone (Lee et al. 2018, no input
   pre-processing), reconstruction error alone (MagNet-style) and max-softmax (Hendrycks & Gimpel).
3. Real scans ($MEDROBUST_DATA/oct2017_subset, else /work/shared/data/oct2017_subset), if present:
   (a) the share of the 90 real scans the phantom-fitted detector flags; (b) detectors fitted on
   app_samples/ + unsplit/ (patients split 2/3 fit, 1/3 threshold), false alarms counted on val/.
   The classifier is the phantom-trained one (no real-scan classifier is trained here).

Figures on the phantom are labelled SYNTHETIC: they are computer-generated images, not OCT scans.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="phantom", help="phantom | octmnist | path (see medrobust.data.load_data)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--phantom-size", default="4000,2000,2000", help="phantom train,val,test sizes")
    p.add_argument("--classifier", default=None, help="a trained classifier.keras (else one is trained)")
    p.add_argument("--epochs", type=int, default=8, help="classifier epochs when training one")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--detector-epochs", type=int, default=10)
    p.add_argument("--eps", default="0.001,0.002,0.004,0.008")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n-attack", type=int, default=1000)
    p.add_argument("--target-fpr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", default=None, help="folder of the real scans (default: the oct2017_subset)")
    p.add_argument("--real-splits", type=int, default=5, help="random patient splits for (b)")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    return p.parse_args(argv)


def train_classifier(x, y, image_size, width, epochs, seed):
    import keras

    from medrobust.data.pipeline import steps_per_epoch, train_dataset
    from medrobust.models import build_classifier
    from medrobust.training import make_trainer

    keras.utils.set_random_seed(seed)
    steps = steps_per_epoch(len(x), 64)
    clf = build_classifier("small_cnn", image_size, width=width)
    trainer = make_trainer("standard", clf)
    trainer.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, epochs * steps)))
    trainer.fit(train_dataset(x, y, 64, seed=seed), epochs=epochs, steps_per_epoch=steps, verbose=0)
    return clf


def max_softmax_score(classifier, x):
    from medrobust.attacks.driver import _compiled_call

    call = _compiled_call(classifier)
    logits = np.concatenate([call(x[i:i + 512]).numpy() for i in range(0, len(x), 512)])
    p = np.exp(logits - logits.max(1, keepdims=True))
    return 1.0 - (p / p.sum(1, keepdims=True)).max(1)


def find_real_scans(arg):
    if arg:
        return Path(arg)
    root = os.environ.get("MEDROBUST_DATA")
    for path in ([Path(root) / "oct2017_subset"] if root else []) + [Path("/work/shared/data/oct2017_subset")]:
        if path.is_dir():
            return path
    return None


def main(argv=None) -> str:
    args = parse_args(argv)
    from medrobust.cli import import_tensorflow

    import_tensorflow()  # without TensorFlow's CPU start-up noise (cuInit)
    from sklearn.metrics import roc_auc_score

    from medrobust.attacks import PGD, accuracy, attack_batches, predict_labels
    from medrobust.data import load_data
    from medrobust.detection import PARTS, Detector
    from medrobust.models import load_classifier

    started = time.time()
    sizes = tuple(int(v) for v in args.phantom_size.split(","))
    data = load_data(args.data, image_size=args.image_size, seed=args.seed, phantom_size=sizes)
    tag = " [SYNTHETIC phantom]" if data.synthetic else ""
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"data: {data.describe()}")
    (x_tr, y_tr), (x_va, _), (x_te, y_te) = data["train"], data["val"], data["test"]
    if args.classifier:
        clf = load_classifier(args.classifier)
    else:
        log(f"training a standard small CNN (width {args.width}, {args.epochs} epochs)")
        clf = train_classifier(x_tr, y_tr, args.image_size, args.width, args.epochs, args.seed)
    clean_acc = accuracy(clf, x_te, y_te)
    log(f"clean test accuracy {clean_acc:.4f}; fitting the detector ({args.detector_epochs} AE epochs)")
    det = Detector.fit(clf, x_tr, x_va, epochs=args.detector_epochs, seed=args.seed, target_fpr=args.target_fpr)

    rules = ("max", "sum", "max_all")
    # Same autoencoder and Gaussians, each rule calibrated on the same validation images.
    dets = {rule: Detector(clf, det.autoencoder, det.stats, dict(det.config)).calibrate(x_va, combination=rule)
            for rule in rules}
    det = dets["max"]
    clean = {rule: dets[rule].score(x_te) for rule in rules}
    fpr_test = float(np.mean(clean["max"]["combined"] > det.threshold))
    clean_msp = max_softmax_score(clf, x_te)

    eps_list = [float(e) for e in args.eps.split(",")]
    n = min(args.n_attack, len(x_te))
    xa_src, ya_src = x_te[:n], y_te[:n]
    correct = predict_labels(clf, xa_src) == ya_src
    attack = PGD(clf, steps=args.steps)
    header = ("| eps | attack success | n adv | **combined (max, default)** | combined (sum) | combined (max_all) | "
              "reconstruction alone | feature | Mahalanobis alone | boundary | max-softmax baseline | "
              "TPR at threshold (max) | combined (max), all PGD outputs |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]

    def auc(clean_scores, adv_scores):
        if not len(adv_scores):
            return float("nan")
        labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(adv_scores))]
        return roc_auc_score(labels, np.r_[clean_scores, adv_scores])

    for eps in eps_list:
        log(f"PGD-Linf eps={eps} ({args.steps} steps) on {n} test images")
        x_adv = attack_batches(attack, xa_src, ya_src, eps, progress=False)
        fooled = correct & (predict_labels(clf, x_adv) != ya_src)
        adv = {rule: dets[rule].score(x_adv) for rule in rules}
        f = fooled
        cells = [f"{eps:g}", f"{f.sum() / max(1, correct.sum()):.3f}", f"{int(f.sum())}"]
        cells += [f"{auc(clean[r]['combined'], adv[r]['combined'][f]):.3f}" for r in rules]
        cells += [f"{auc(clean['max'][p], adv['max'][p][f]):.3f}" for p in PARTS]
        cells.append(f"{auc(clean_msp, max_softmax_score(clf, x_adv[f])):.3f}")
        cells.append(f"{np.mean(adv['max']['combined'][f] > det.threshold):.3f}")
        cells.append(f"{auc(clean['max']['combined'], adv['max']['combined']):.3f}")
        rows.append("| " + " | ".join(cells) + " |")

    lines = [f"## UAD detection AUROC vs PGD-Linf ({args.steps} steps){tag}", "",
             f"Data: {data.describe()}. Standard small CNN (width {args.width}), clean test accuracy "
             f"{clean_acc:.3f}. Detector: {det.config['autoencoder']['params']} AE parameters, "
             f"{args.detector_epochs} AE epochs, threshold {det.threshold:.3f} for target FPR {args.target_fpr:g}; "
             f"clean FPR on {len(x_te)} test images {fpr_test:.4f} (validation {det.config['val_fpr']:.4f}). "
             f"AUROC: {len(x_te)} clean test images vs successful adversaries of the first {n} "
             f"(attack success = share of the correctly classified ones fooled).", "", *rows, ""]

    real = find_real_scans(args.real)
    if real is None:
        lines.append("Real scans: folder not found, skipped.")
    else:
        lines += real_scan_report(real, det, clf, args, log)
    lines.append(f"\n(total {time.time() - started:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        from medrobust.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return text


def real_scan_report(root: Path, det, clf, args, log) -> list[str]:
    from medrobust.data.folders import load_image_tree, patient_id
    from medrobust.detection import PARTS, Detector

    scans = load_image_tree(root, args.image_size)
    groups = np.array(scans.groups)
    log(f"real scans: {len(scans)} from {root}")
    flags = det.predict(scans.x)
    per_group = ", ".join(f"{g} {int(flags[groups == g].sum())}/{int((groups == g).sum())}"
                          for g in sorted(set(groups)))
    part_flags = det.part_flags(det.score(scans.x))
    parts = ", ".join(f"{p} {part_flags[p].mean():.2f}" for p in PARTS)
    lines = ["## Real Kermany OCT2017 scans (90, not synthetic)", "",
             f"(a) phantom-fitted detector (SYNTHETIC training data) flags {int(flags.sum())}/{len(flags)} "
             f"= {flags.mean():.3f} of the real scans ({per_group}); per part at its own 95% threshold: {parts}.", ""]

    fit_mask = groups != "val"
    x_fit, x_val = scans.x[fit_mask], scans.x[~fit_mask]
    patients = np.array([patient_id(f) or f for f, m in zip(scans.files, fit_mask) if m])
    unique = np.unique(patients)
    rates, counts = [], []
    for split in range(args.real_splits):
        rng = np.random.default_rng(args.seed + split)
        held_patients = rng.permutation(unique)[: max(1, len(unique) // 3)]
        held = np.isin(patients, held_patients)
        real_det = Detector.fit(clf, x_fit[~held], x_fit[held], epochs=args.detector_epochs, seed=args.seed + split,
                                target_fpr=args.target_fpr)
        val_flags = real_det.predict(x_val)
        rates.append(float(val_flags.mean()))
        counts.append(f"{int(val_flags.sum())}/{len(val_flags)} "
                      f"(fit {int((~held).sum())}, threshold {int(held.sum())})")
        log(f"real split {split}: {counts[-1]}")
    lines += [f"(b) detector fitted on app_samples/ + unsplit/ ({len(x_fit)} scans; patients split 2/3 fit, 1/3 "
              f"threshold; classifier = the phantom-trained CNN), false alarms on val/ (target {args.target_fpr:g}) "
              f"over {args.real_splits} random patient splits: " + "; ".join(counts)
              + f". Mean FPR {np.mean(rates):.3f} (range {min(rates):.3f}-{max(rates):.3f}). "
              "With ~20 threshold images the 95% quantile is close to their maximum, so this rate is very noisy.", ""]
    return lines


if __name__ == "__main__":
    main()
