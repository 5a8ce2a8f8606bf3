"""python -m export verify: does the exported bundle behave like the Keras models it came from?

    python -m export verify --bundle bundles/NAME [--data ...] [--limit N] [--eps 0.004]
                            [--min-top1-agreement P] [--max-accuracy-drop D] [--max-auroc-drop D]
                            [--min-flag-agreement P]

On the test split of the run's data (or --data), for every model file in the bundle: top-1 agreement
with the Keras classifier, accuracy and its change, ``detection_auroc_all_pgd`` and its change, flag
agreement, whether a screening model's baked-in threshold is the one the manifest states, and for
float models the max absolute difference of every output. Then the robust accuracy of the exported
classifier: PGD adversaries transferred from the float Keras model, and a Square Attack (score-based,
black-box) run directly against the exported TFLite classifier. Prints a table, the tolerances, and a
verdict per file (pass/fail); writes parity.json into the bundle (atomically); exits with status 1
when any file fails (2 for bad input).

Two AUROCs, two names:

* ``detection_auroc_all_pgd`` (here): the detector's AUROC separating the clean test images from
  *all* their PGD-perturbed versions (eps, steps as given), whether or not the attack flipped the
  class. It needs no labels of success, so it is the same quantity for the Keras and every exported
  model: what parity compares.
* ``detection_auroc`` (``python -m medrobust.evaluate``, report.json): clean images against the
  *successful* adversarial examples only (those that changed the prediction): how well the detector
  catches the attacks that matter. Usually higher than the all-PGD figure, and not comparable with it.

Tolerances (TOLERANCES, by the file's precision; each --option overrides it for every file): a file
passes when top-1 agreement >= min_top1_agreement, accuracy change >= -max_accuracy_drop, change of
detection_auroc_all_pgd >= -max_auroc_drop, flag agreement >= min_flag_agreement (clean and PGD
images, each model at its own threshold), and, for screening models, the baked-in threshold equals
the manifest's. A metric the file does not produce (e.g. AUROC for a classifier) is not checked.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medrobust import cli
from medrobust.io import atomic_write_json

from medrobust_screen.manifest import BundleError, read_manifest, verify_files
from medrobust_screen.screener import (OUTPUT_FLAG, OUTPUT_PART_SCORES, OUTPUT_PROBABILITIES, OUTPUT_SCORE,
                                       OUTPUT_THRESHOLD)

PARITY = "parity.json"

# Per precision: float32 must match Keras up to near-ties; float16 and int8 round, int8 much more (its
# thresholds are also recalibrated, so flags near the threshold move in both directions). The AUROC of
# 800 clean against 800 attacked images has a standard error of about 0.015: an int8 drop beyond 0.03
# is a real loss. These hold on 800 or more test images; with --limit, chance alone moves every figure.
TOLERANCES = {
    "float32": {"min_top1_agreement": 0.995, "max_accuracy_drop": 0.005, "max_auroc_drop": 0.005,
                "min_flag_agreement": 0.99},
    "float16": {"min_top1_agreement": 0.99, "max_accuracy_drop": 0.01, "max_auroc_drop": 0.01,
                "min_flag_agreement": 0.95},
    "int8": {"min_top1_agreement": 0.97, "max_accuracy_drop": 0.02, "max_auroc_drop": 0.03,
             "min_flag_agreement": 0.90},
}
TOLERANCE_NAMES = ("min_top1_agreement", "max_accuracy_drop", "max_auroc_drop", "min_flag_agreement")


def verify(bundle: str, data: str | None = None, limit: int | None = None, run: str | None = None,
           eps: float = 0.004, pgd_steps: int = 10, square_queries: int = 300, square_limit: int = 100,
           seed: int = 0, min_top1_agreement: float | None = None, max_accuracy_drop: float | None = None,
           max_auroc_drop: float | None = None, min_flag_agreement: float | None = None,
           progress="true") -> dict:
    """Compare every exported model with its Keras original; give each file a pass/fail verdict against
    the tolerances; write parity.json into the bundle; exit with status 1 if a file fails.

    Args:
      bundle: bundle folder written by `python -m export bundle`.
      data: dataset to test on (default: the data the source run was trained on); its test split is used.
      limit: test on at most this many images (a seeded, class-stratified sample).
      run: the source run folder, if it moved since the export (default: manifest source_run.path).
      eps: L-inf budget of the PGD and Square attacks, [0, 1] pixel scale.
      pgd_steps: PGD steps.
      square_queries: Square Attack queries per image against the TFLite classifier (0 = skip).
      square_limit: images attacked by Square (the first ones of the test sample).
      seed: random seed (the --limit sample and the attacks).
      min_top1_agreement: override, for every file: least top-1 agreement with Keras (0..1).
      max_accuracy_drop: override: largest accuracy drop against Keras (0..1).
      max_auroc_drop: override: largest drop of detection_auroc_all_pgd against Keras (0..1).
      min_flag_agreement: override: least agreement of the refer flags with Keras (0..1).
      progress: true | false: show progress.
    """
    if limit is not None and int(limit) < 1:
        raise cli.UsageError(f"--limit must be a positive integer, got {limit}")
    if not 0 <= float(eps) <= 1:
        raise cli.UsageError(f"--eps must be in [0, 1], got {eps}")
    overrides = {}
    for name, value in (("min_top1_agreement", min_top1_agreement), ("max_accuracy_drop", max_accuracy_drop),
                        ("max_auroc_drop", max_auroc_drop), ("min_flag_agreement", min_flag_agreement)):
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise cli.UsageError(f"--{name.replace('_', '-')} must be a number in [0, 1], got {value!r}") from None
        if not 0 <= value <= 1:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        overrides[name] = value
    verbose = cli.parse_bool(progress, "progress")
    report = verify_bundle(bundle, data=data, limit=None if limit is None else int(limit), run=run,
                           eps=float(eps), pgd_steps=int(pgd_steps), square_queries=int(square_queries),
                           square_limit=int(square_limit), seed=int(seed), tolerances=overrides, progress=verbose,
                           log=(lambda m: print(m, flush=True)) if verbose else (lambda m: None))
    if not verbose:  # the table and the file name are the result, not progress
        print(format_table(report))
        print(f"wrote {Path(bundle) / PARITY}")
    if report["verdict"] != "pass":
        raise SystemExit(1)
    return report


def tolerances_for(precision: str | None, overrides: dict | None = None) -> dict:
    """The tolerances a file of this precision is held to (TOLERANCES, with `overrides` applied)."""
    return {**TOLERANCES.get(str(precision), TOLERANCES["int8"]), **(overrides or {})}


def judge(row: dict, tolerances: dict) -> list[str]:
    """The reasons a file fails its tolerances (empty: it passes)."""
    failures = []

    def pct(v):
        return f"{100 * v:.1f}%"

    agreement = row.get("top1_agreement")
    if agreement is not None and agreement < tolerances["min_top1_agreement"]:
        failures.append(f"top-1 agreement {pct(agreement)} < {pct(tolerances['min_top1_agreement'])}")
    drop = row.get("accuracy_delta")
    if drop is not None and drop < -tolerances["max_accuracy_drop"]:
        failures.append(f"accuracy change {100 * drop:+.1f} points < -{100 * tolerances['max_accuracy_drop']:.1f}")
    if "detection_auroc_all_pgd" in row:
        delta = row.get("detection_auroc_all_pgd_delta")
        if delta is None:
            failures.append("detection_auroc_all_pgd could not be computed (non-finite scores)")
        elif delta < -tolerances["max_auroc_drop"]:
            failures.append(f"detection_auroc_all_pgd change {delta:+.3f} < -{tolerances['max_auroc_drop']:.3f}")
    flags = row.get("flag_agreement")
    if flags is not None and flags < tolerances["min_flag_agreement"]:
        failures.append(f"flag agreement {pct(flags)} < {pct(tolerances['min_flag_agreement'])}")
    if row.get("threshold_matches") is False:
        failures.append(f"baked-in threshold {row.get('baked_threshold')!r} is not the manifest's "
                        f"{row.get('threshold')!r}")
    return failures


def verify_bundle(bundle, data=None, limit: int | None = None, run=None, eps: float = 0.004, pgd_steps: int = 10,
                  square_queries: int = 300, square_limit: int = 100, seed: int = 0, detector=None,
                  tolerances: dict | None = None, progress: bool = False, log=print, write: bool = True) -> dict:
    """The work behind `verify`; returns the parity report (report['verdict'] 'pass' or 'fail', and per
    file 'verdict', 'failures', 'tolerances'). `data` may be a name/path, an OCTData, or an (x, y) pair
    of arrays; `detector` may be given instead of loading the run's detector/; `tolerances` overrides
    TOLERANCES for every file."""
    from export.bundle import check_run, load_detector

    bundle_dir = Path(bundle)
    try:
        manifest = read_manifest(bundle_dir)
        verify_files(bundle_dir, manifest)
    except BundleError as exc:
        raise cli.UsageError(str(exc)) from None
    run_dir = Path(run) if run else Path(manifest.get("source_run", {}).get("path", ""))
    config = check_run(run_dir, need_detector=detector is None)

    cli.import_tensorflow()  # quietly, before anything else imports it
    from medrobust.models import load_classifier

    from export import converters, screening
    image_size = int(manifest["preprocessing"]["image_size"])
    classifier = load_classifier(run_dir / "classifier.keras")
    if detector is None:
        detector = load_detector(run_dir, classifier)
    # The Keras reference flags at the Keras threshold; each exported file at its own (recalibrated) one.
    threshold = float(manifest.get("detector", {}).get("keras_threshold", manifest["threshold"]))

    x, y, source = _test_data(data, config, image_size, limit, seed, log)
    log(f"test data: {source}: {len(y)} images")
    started = time.time()

    # Keras references (float32), clean and PGD-attacked.
    from medrobust.attacks import PGD, attack_batches

    keras_screen = screening.screening_model(classifier, detector, threshold)
    keras_clf = screening.classifier_model(classifier)
    ref = {"clean": {**converters.run_keras(keras_screen, x), **converters.run_keras(keras_clf, x)}}
    log(f"PGD adversaries (eps {eps:g}, {pgd_steps} steps) on the float Keras classifier...")
    x_adv = attack_batches(PGD(classifier, steps=pgd_steps), x, y, eps, progress=progress, desc="pgd")
    ref["adv"] = {**converters.run_keras(keras_screen, x_adv), **converters.run_keras(keras_clf, x_adv)}
    keras = _summary(ref["clean"], ref["adv"], y, threshold)
    keras["robust_accuracy_pgd"] = keras.pop("adv_accuracy")

    models: dict[str, dict] = {}
    exported_classifier = None
    for name, entry in manifest["files"].items():
        if not name.endswith((".tflite", ".onnx")):
            continue
        content = (bundle_dir / name).read_bytes()
        run_fn = converters.run_tflite if name.endswith(".tflite") else converters.run_onnx
        log(f"running {name}...")
        clean, adv = run_fn(content, x), run_fn(content, x_adv)
        own = float(entry.get("threshold", manifest["threshold"]))
        row = {"model": entry.get("model"), "format": entry.get("format"), "precision": entry.get("precision"),
               **({"threshold": own} if entry.get("model") in ("screening", "detector") else {}),
               **_compare(clean, adv, ref, y, own, keras, threshold)}
        if OUTPUT_THRESHOLD in clean:  # a screening model: the threshold its flags really use
            baked = float(np.asarray(clean[OUTPUT_THRESHOLD], np.float32).reshape(-1)[0])
            row["baked_threshold"] = baked
            row["threshold_matches"] = bool(np.float32(baked) == np.float32(own)
                                            and np.all(np.asarray(clean[OUTPUT_THRESHOLD]) == np.float32(baked)))
        row["tolerances"] = tolerances_for(row["precision"], tolerances)
        row["failures"] = judge(row, row["tolerances"])
        row["verdict"] = "fail" if row["failures"] else "pass"
        models[name] = row
        if name == manifest["models"]["classifier"]["file"]:
            exported_classifier = content

    robust = {"eps": eps, "keras_pgd": keras["robust_accuracy_pgd"]}
    if exported_classifier is not None:
        file = manifest["models"]["classifier"]["file"]
        robust["file"] = file
        robust["precision"] = manifest["models"]["classifier"].get("precision")
        robust["pgd_transfer"] = models[file]["adv_accuracy"]
        robust.update(_square(exported_classifier, x, y, eps, square_queries, square_limit, seed, log))

    report = {
        "bundle": str(bundle_dir.resolve()), "source_run": str(run_dir.resolve()), "data": source,
        "synthetic_data": _is_synthetic(source), "n_images": int(len(y)), "eps": eps, "pgd_steps": pgd_steps,
        "threshold": float(manifest["threshold"]), "keras_threshold": threshold, "keras": keras,
        "models": models, "robust_accuracy": robust,
        "tolerances": {p: tolerances_for(p, tolerances) for p in TOLERANCES},
        "verdict": "fail" if any(r["verdict"] == "fail" for r in models.values()) else "pass",
        "definitions": {
            "detection_auroc_all_pgd": "AUROC of the anomaly score separating the clean test images from all their "
                                       "PGD-perturbed versions (successful or not); not evaluate's "
                                       "detection_auroc, which uses the successful adversarial examples only",
            "top1_agreement": "share of clean test images where the file's top-1 class equals the Keras model's",
            "flag_agreement": "share of clean and PGD images where the file's refer flag (at its own threshold) "
                              "equals the Keras flag (at the Keras threshold)"},
        "seconds": round(time.time() - started, 1),
    }
    log(format_table(report))
    if write:
        atomic_write_json(bundle_dir / PARITY, report)
        log(f"wrote {bundle_dir / PARITY}")
    return report


def _is_synthetic(source: str) -> bool:
    return "SYNTHETIC" in source or source.startswith("phantom")


def _test_data(data, config: dict, image_size: int, limit, seed: int, log):
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y, source = np.asarray(data[0], np.float32), np.asarray(data[1]), "given arrays"
    else:
        if data is None or isinstance(data, str):
            from medrobust.data import load_run_data

            data = load_run_data(config, data, image_size=image_size)  # default: the run's own data
        x, y = data["test"]
        source = f"test split of {data.source}" + (" (SYNTHETIC phantom)" if data.synthetic else "")
    if x.shape[1:] != (image_size, image_size, 1):
        raise cli.UsageError(f"test images are {x.shape[1:]}, the bundle takes ({image_size}, {image_size}, 1)")
    if len(y) == 0:
        raise cli.UsageError("no test images")
    if limit is not None and limit < len(y):
        idx = _stratified(y, limit, seed)
        x, y = x[idx], y[idx]
    return x, np.asarray(y).astype(np.int64), source


def _stratified(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices, classes in proportion (seeded), in their original order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    # Round-robin over classes in a seeded order keeps the proportions to within one image.
    by_class = {c: list(order[y[order] == c]) for c in np.unique(y)}
    picked = []
    share = {c: len(v) / len(y) for c, v in by_class.items()}
    for c in by_class:
        picked += by_class[c][:int(np.floor(share[c] * n))]
    taken = set(picked)
    rest = [i for i in order if i not in taken]
    picked += rest[: n - len(picked)]
    return np.sort(np.asarray(picked, np.int64))


def _auroc(clean: np.ndarray, adv: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([clean, adv]).astype(np.float64)
    if not np.all(np.isfinite(scores)):
        return None
    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(adv))], scores))


def _preds(out: dict) -> np.ndarray | None:
    for key in ("logits", OUTPUT_PROBABILITIES):
        if key in out:
            return np.asarray(out[key]).argmax(axis=1)
    return None


def _summary(clean: dict, adv: dict, y: np.ndarray, threshold: float) -> dict:
    out: dict = {}
    pred, pred_adv = _preds(clean), _preds(adv)
    if pred is not None:
        out["accuracy"] = float(np.mean(pred == y))
        out["adv_accuracy"] = float(np.mean(pred_adv == y))
    if OUTPUT_SCORE in clean:
        out["detection_auroc_all_pgd"] = _auroc(clean[OUTPUT_SCORE], adv[OUTPUT_SCORE])
        out["clean_flag_rate"] = float(np.mean(clean[OUTPUT_SCORE] > threshold))
        out["adv_flag_rate"] = float(np.mean(adv[OUTPUT_SCORE] > threshold))
    return out


def _compare(clean: dict, adv: dict, ref: dict, y: np.ndarray, threshold: float, keras: dict,
             keras_threshold: float) -> dict:
    row = _summary(clean, adv, y, threshold)
    pred, pred_adv = _preds(clean), _preds(adv)
    if pred is not None:
        keras_pred = ref["clean"]["logits"].argmax(axis=1)
        row["top1_agreement"] = float(np.mean(pred == keras_pred))
        row["top1_agreement_adv"] = float(np.mean(pred_adv == ref["adv"]["logits"].argmax(axis=1)))
        row["accuracy_delta"] = row["accuracy"] - keras["accuracy"]
    if OUTPUT_SCORE in clean:
        mine, theirs = row["detection_auroc_all_pgd"], keras.get("detection_auroc_all_pgd")
        row["keras_detection_auroc_all_pgd"] = theirs
        row["detection_auroc_all_pgd_delta"] = None if mine is None or theirs is None else mine - theirs
        flags = np.r_[clean[OUTPUT_FLAG] > 0.5 if OUTPUT_FLAG in clean else clean[OUTPUT_SCORE] > threshold,
                      adv[OUTPUT_FLAG] > 0.5 if OUTPUT_FLAG in adv else adv[OUTPUT_SCORE] > threshold]
        keras_flags = np.r_[ref["clean"][OUTPUT_SCORE] > keras_threshold, ref["adv"][OUTPUT_SCORE] > keras_threshold]
        row["flag_agreement"] = float(np.mean(flags == keras_flags))
    row["max_abs_diff"] = {k: float(np.max(np.abs(np.asarray(v, np.float64) - ref["clean"][k])))
                           for k, v in clean.items()
                           if k in ref["clean"] and k not in (OUTPUT_FLAG, OUTPUT_THRESHOLD) and np.size(v)}
    if OUTPUT_SCORE in clean:  # the score is unbounded (z-units, logs): also relative to max(1, |score|)
        keras_score = np.asarray(ref["clean"][OUTPUT_SCORE], np.float64)
        row["max_rel_diff_anomaly_score"] = float(np.max(np.abs(clean[OUTPUT_SCORE] - keras_score)
                                                         / np.maximum(1.0, np.abs(keras_score))))
    if OUTPUT_PART_SCORES in clean and OUTPUT_PART_SCORES in ref["clean"]:  # z-units like the score
        keras_parts = np.asarray(ref["clean"][OUTPUT_PART_SCORES], np.float64)
        row["max_rel_diff_part_scores"] = float(np.max(np.abs(clean[OUTPUT_PART_SCORES] - keras_parts)
                                                       / np.maximum(1.0, np.abs(keras_parts))))
    return row


def _square(model_bytes: bytes, x, y, eps, queries: int, limit: int, seed: int, log) -> dict:
    if queries < 1 or limit < 1:
        return {"square": None, "square_note": "skipped (--square-queries 0)"}
    try:
        from medrobust.attacks.square import SquareAttack
    except ImportError:
        return {"square": None, "square_note": "medrobust.attacks.square is not available"}
    from export import converters

    _, runner = converters.tflite_runner(model_bytes)
    key = "logits" if "logits" in runner.get_output_details() else OUTPUT_PROBABILITIES

    def predict(batch: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(batch), 256):
            out.append(np.array(runner(image=np.ascontiguousarray(batch[start:start + 256], np.float32))[key]))
        return np.concatenate(out)

    n = min(limit, len(y))
    log(f"Square Attack on the exported classifier ({n} images, {queries} queries, eps {eps:g})...")
    attack = SquareAttack(predict, n_queries=queries, seed=seed, output="logits" if key == "logits" else "probs")
    x_adv, used, _ = attack.run(x[:n], y[:n], eps)
    acc = float(np.mean(predict(x_adv).argmax(axis=1) == y[:n]))
    clean = float(np.mean(predict(x[:n]).argmax(axis=1) == y[:n]))
    return {"square": acc, "square_clean_accuracy": clean, "square_images": int(n), "square_queries": queries,
            "square_mean_queries_used": float(np.mean(used)) if len(used) else 0.0}


def _fmt(v, pct: bool = False, signed: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def format_table(report: dict) -> str:
    k = report["keras"]
    lines = [f"parity on {report['n_images']} images ({report['data']}); PGD eps {report['eps']:g}, "
             f"{report['pgd_steps']} steps",
             f"keras float32: accuracy {_fmt(k.get('accuracy'), True)}%, PGD robust accuracy "
             f"{_fmt(k.get('robust_accuracy_pgd'), True)}%, detection AUROC clean vs all PGD "
             f"{_fmt(k.get('detection_auroc_all_pgd'))}, clean scans referred {_fmt(k.get('clean_flag_rate'), True)}%",
             f"{'file':<24}{'prec':>8}{'top-1 agr%':>11}{'acc%':>7}{'Δacc':>7}{'AUROC*':>8}{'ΔAUROC*':>9}"
             f"{'flag agr%':>10}{'referred%':>10}{'max|Δ|':>10}  verdict"]
    for name, r in report["models"].items():
        diff = max(r["max_abs_diff"].values()) if r.get("max_abs_diff") else None
        lines.append(f"{name:<24}{str(r.get('precision')):>8}{_fmt(r.get('top1_agreement'), True):>11}"
                     f"{_fmt(r.get('accuracy'), True):>7}{_fmt(r.get('accuracy_delta'), True, True):>7}"
                     f"{_fmt(r.get('detection_auroc_all_pgd')):>8}"
                     f"{_fmt(r.get('detection_auroc_all_pgd_delta'), signed=True):>9}"
                     f"{_fmt(r.get('flag_agreement'), True):>10}{_fmt(r.get('clean_flag_rate'), True):>10}"
                     f"{(f'{diff:.2e}' if diff is not None else '-'):>10}  {r.get('verdict', '-').upper()}")
    lines.append("AUROC* = detection_auroc_all_pgd: clean test images vs all their PGD versions (not evaluate's "
                 "detection_auroc, which counts successful adversaries only)")
    rb = report.get("robust_accuracy", {})
    if rb.get("file"):
        line = (f"robust accuracy of {rb['file']} ({rb.get('precision')}), eps {rb['eps']:g}: PGD transferred "
                f"from Keras {_fmt(rb.get('pgd_transfer'), True)}% (Keras itself {_fmt(rb.get('keras_pgd'), True)}%)")
        if rb.get("square") is not None:
            line += (f"; Square Attack on the TFLite model {_fmt(rb['square'], True)}% of {rb['square_images']} "
                     f"images ({rb['square_queries']} queries; clean {_fmt(rb['square_clean_accuracy'], True)}%)")
        else:
            line += f"; Square: {rb.get('square_note')}"
        lines.append(line)
    lines.append("tolerances (a file passes when all hold; a metric a file lacks is not checked):")
    shown = {}
    for r in report["models"].values():
        shown.setdefault(str(r.get("precision")), r.get("tolerances") or tolerances_for(r.get("precision")))
    for precision, t in shown.items():
        lines.append(f"  {precision:<8} top-1 agreement >= {100 * t['min_top1_agreement']:.1f}%, accuracy drop <= "
                     f"{100 * t['max_accuracy_drop']:.1f} points, AUROC* drop <= {t['max_auroc_drop']:.3f}, flag "
                     f"agreement >= {100 * t['min_flag_agreement']:.1f}%, screening: baked-in threshold = manifest")
    failed = {n: r for n, r in report["models"].items() if r.get("verdict") == "fail"}
    for name, r in failed.items():
        lines.append(f"FAIL {name}: {'; '.join(r['failures'])}")
    lines.append(f"verdict: {'FAIL' if failed else 'PASS'} ({len(failed)} of {len(report['models'])} files outside "
                 "tolerance)" if failed else f"verdict: PASS (all {len(report['models'])} files within tolerance)")
    if report.get("synthetic_data"):
        lines.append("note: SYNTHETIC phantom data: these numbers check the export, not clinical performance")
    return "\n".join(lines)


def main() -> None:
    cli.run(verify)


if __name__ == "__main__":
    main()
