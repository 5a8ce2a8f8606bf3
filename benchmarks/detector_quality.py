"""How well does each UAD part catch adversaries, plain and adaptive, and which combination to deploy?

Run mode (real scans, a trained run; the reference):

    python benchmarks/detector_quality.py --run RUN --split val --eps 1/255,2/255 \\
        --detector-dir RUN/uad_all --out RUN/uad_val.md          # writes RUN/uad_val.json (the choice)
    python benchmarks/detector_quality.py --run RUN --split test --eps 1/255,2/255 \\
        --detector-dir RUN/uad_all --choice RUN/uad_val.json --out RUN/uad_test.md

1. The run's classifier; a detector with every part (medrobust.detection.ALL_PARTS) fitted on the clean
   training split (no labels) and calibrated on clean val, saved to --detector-dir (loaded from there if
   present, so val and test use the same one).
2. Each candidate (parts subset x combination rule, --candidates) is the same detector restricted to
   those parts and re-calibrated on clean val (split-conformal threshold at --target-fpr).
3. On --split, against the correctly classified images: PGD-L-inf (--steps; or APGD) plain (cross-
   entropy), and the adaptive attacker (`adaptive_objective`): the same attack on
   min(max_(j!=y) z_j - z_y, kappa) - w relu(combined - threshold) for every kappa in --kappas and w in
   --weights. kappa = 0 is medrobust.evaluate's adaptive objective, whose classifier term stops at the first
   misclassification (so the attacker may drift back towards the decision boundary, where the boundary
   part sees it); kappa > 0 asks for a confident wrong class (Carlini & Wagner 2017), the attacker that
   takes the boundary part's value away ("auto" = the median clean margin). An image is a silent failure if
   the plain attack or any (kappa, w) leaves it misclassified and unflagged. Per part: detection AUROC of
   clean split images vs the successful adversaries, plain and adaptive (the adaptive adversaries of the
   worst (kappa, w) against the whole all-parts detector). Per candidate: clean false-referral rate,
   classifier-only risk, system risk plain and adaptive (95% Clopper-Pearson intervals).
4. A bright-only attacker: PGD whose perturbation is confined to the pixels outside the residual part's
   dark region (so the noise-residual score cannot see it), plain and adaptive, against the chosen
   candidate (or, if it has no residual part, the first candidate that has).
5. --split val picks, among the candidates that flag >= 95% of every kind of non-OCT input (noise,
   inverted scans, smooth blobs, checkerboards), the one with the lowest sum over eps of the adaptive system
   risk (then fewer parts) and writes it to the .json next to --out. --split test needs --choice (a
   .json written on val): the test split is only evaluated for a choice fixed beforehand, plus the
   all-parts and legacy detectors for the per-part table and the baseline.

Phantom mode (no --run; SYNTHETIC): trains a standard small CNN on the phantom and reports every part's
plain PGD AUROC and the rules, as before:

    python benchmarks/detector_quality.py --data phantom --out runs/detector_quality.md

Figures on the phantom are labelled SYNTHETIC: they are computer-generated images, not OCT scans.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SUBSETS = {
    "legacy": ("reconstruction", "feature", "mahalanobis", "boundary"),
    "all": None,  # every part (filled in from ALL_PARTS)
    "no_ae": ("mahalanobis", "mahalanobis_early", "mahalanobis_middle", "residual", "squeeze_bits", "squeeze_median",
              "boundary"),
}
DEFAULT_CANDIDATES = "legacy:max,all:max,all:sum_positive,no_ae:max,boundary+squeeze_bits:max_all"


def parse_args(argv=None):
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a trained run folder (run mode); without it: phantom mode")
    p.add_argument("--data", default=None, help="run mode: default the run's data; phantom mode: phantom | path")
    p.add_argument("--split", default="val", choices=("val", "test"), help="run mode: split to attack")
    p.add_argument("--choice", default=None, help="run mode, --split test: the .json a val run wrote")
    p.add_argument("--detector-dir", default=None, help="run mode: where the all-parts detector is kept")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help="subset:rule,... (subsets legacy, all, no_ae or parts joined by +)")
    p.add_argument("--adaptive", default="true", choices=("true", "false"))
    p.add_argument("--weights", default="0.1,1,10", help="adaptive attacker's weights")
    p.add_argument("--kappas", default="0,auto",
                   help="adaptive attacker's confidence margins (logits); auto = median clean val margin")
    p.add_argument("--bright-only", default="true", choices=("true", "false"),
                   help="run mode: also run the bright-region-only attacker")
    p.add_argument("--limit", type=int, default=None, help="run mode: first N images of the split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--phantom-size", default="4000,2000,2000", help="phantom train,val,test sizes")
    p.add_argument("--classifier", default=None, help="phantom mode: a trained classifier.keras")
    p.add_argument("--epochs", type=int, default=8, help="phantom mode: classifier epochs when training one")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--detector-epochs", type=int, default=10)
    p.add_argument("--eps", default=None, help="budgets (run mode default 1/255,2/255; phantom 0.001..0.008)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (run mode: also APGD steps)")
    p.add_argument("--attack", default="pgd", choices=("pgd", "apgd"), help="run mode: the gradient attack")
    p.add_argument("--n-attack", type=int, default=1000, help="phantom mode: attacked test images")
    p.add_argument("--target-fpr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the report (markdown) here (and .json in run mode)")
    args = p.parse_args(argv)
    from medrobust import cli

    default_eps = "1/255,2/255" if args.run else "0.001,0.002,0.004,0.008"
    args.eps_list = list(cli.parse_floats(args.eps or default_eps, "eps"))
    args.weight_list = list(cli.parse_floats(args.weights, "weights"))
    if any(not 0 < e <= 1 for e in args.eps_list):
        p.error(f"--eps values must be in (0, 1], got {args.eps_list}")
    if not 0 < args.target_fpr < 1:
        p.error(f"--target-fpr must be in (0, 1), got {args.target_fpr}")
    if args.run:
        if not (Path(args.run) / "classifier.keras").is_file():
            p.error(f"{args.run}: not a trained run (no classifier.keras)")
        if args.split == "test" and not args.choice:
            p.error("--split test needs --choice (the .json a --split val run wrote): the combination is chosen "
                    "on val, never on test")
        if args.choice and not Path(args.choice).is_file():
            p.error(f"{args.choice}: no such file")
        args.candidate_list = parse_candidates(args.candidates, p.error)
    return args


def parse_candidates(text: str, error) -> list[tuple[str, tuple[str, ...], str]]:
    from medrobust.detection import ALL_PARTS, COMBINATIONS

    out = []
    for item in text.split(","):
        if ":" not in item:
            error(f"--candidates: {item!r} is not subset:rule")
        subset, rule = item.strip().split(":")
        parts = SUBSETS.get(subset, tuple(subset.split("+")))
        parts = tuple(ALL_PARTS) if parts is None else parts
        bad = [q for q in parts if q not in ALL_PARTS]
        if bad or rule not in COMBINATIONS:
            error(f"--candidates: {item!r}: unknown part {bad} or rule {rule!r} (rules: {', '.join(COMBINATIONS)})")
        out.append((item.strip(), parts, rule))
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def risk_interval(silent: int, n: int) -> tuple[float, float]:
    """95% Clopper-Pearson interval of a proportion (scipy.stats.binomtest)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(silent, n).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


# ------------------------------------------------------------------------------------------------ run mode

def run_mode(args) -> str:
    import keras

    from medrobust.data import load_data
    from medrobust.detection import ALL_PARTS, Detector
    from medrobust.io import read_json, read_run_config
    from medrobust.models import load_classifier

    started = time.time()
    run = Path(args.run)
    config = read_run_config(run)
    data = load_data(args.data or config["data"], image_size=config["image_size"], seed=config.get("seed", 0))
    tag = " [SYNTHETIC phantom]" if data.synthetic else ""
    log(f"data: {data.describe()}")
    keras.utils.set_random_seed(args.seed)
    clf = load_classifier(run / "classifier.keras")
    x_tr, _ = data["train"]
    x_va, _ = data["val"]
    x, y = data[args.split]
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    det_dir = Path(args.detector_dir) if args.detector_dir else None
    if det_dir is not None and (det_dir / "detector.json").is_file():
        full = Detector.load(det_dir, clf)
        log(f"loaded the all-parts detector from {det_dir}")
    else:
        log(f"fitting an all-parts detector on {len(x_tr)} clean training images (no labels), "
            f"threshold on {len(x_va)} clean val images")
        full = Detector.fit(clf, x_tr, x_va, epochs=args.detector_epochs, seed=args.seed, target_fpr=args.target_fpr,
                            parts=ALL_PARTS, progress=True)
        if det_dir is not None:
            full.save(det_dir)
    missing = [q for q in ALL_PARTS if q not in full.parts]
    if missing:
        raise SystemExit(f"{det_dir}: the detector lacks parts {missing}; use another --detector-dir")

    candidates = list(args.candidate_list)
    choice = None
    if args.split == "test":
        choice = read_json(args.choice)
        if choice.get("run") != str(run) or choice.get("split") != "val":
            raise SystemExit(f"{args.choice}: written for run {choice.get('run')!r} split {choice.get('split')!r}, "
                             f"not {run} on val")
        chosen = (choice["name"], tuple(choice["parts"]), choice["combination"])
        keep = {chosen[0], "all:max", "legacy:max"}
        candidates = [chosen] + [c for c in candidates if c[0] in keep and c[0] != chosen[0]]
    adaptive = args.adaptive == "true"
    weights = tuple(args.weight_list)
    kappas = resolve_kappas(args.kappas, clf, x_va, data["val"][1])
    log(f"adaptive attacker: weights {weights}, confidence margins kappa {[round(k, 3) for k in kappas]}")

    results, per_part, dets = {}, {}, {}
    for name, parts, rule in candidates:
        det = full.with_parts(parts, x_va, combination=rule, target_fpr=args.target_fpr)
        log(f"candidate {name}: threshold {det.threshold:.4f}, val FPR {det.config['val_fpr']:.3f}")
        t0 = time.time()
        entries = evaluate_candidate(clf, det, x, y, args, weights if adaptive else (), kappas)
        results[name] = {"parts": list(parts), "combination": rule, "threshold": det.threshold,
                         "val_fpr": det.config["val_fpr"], "clean_accuracy": entries.pop("clean_accuracy"),
                         "clean_false_referral_rate": entries.pop("clean_false_referral_rate"),
                         "off_distribution_flag_rate": entries.pop("off_distribution_flag_rate"),
                         "n": int(len(y)), "seconds": round(time.time() - t0, 1), "eps": entries}
        if name.startswith("all:") and not per_part:
            per_part = {"candidate": name, "eps": entries}
        dets[name] = det

    selection = None
    if args.split == "val":
        selection = select(results, args.eps_list, adaptive)
    target = selection[0] if selection else candidates[0][0]
    if "residual" not in dets[target].parts:  # measure it where the residual part is in play
        target = next((n for n in dets if "residual" in dets[n].parts), target)
    if args.bright_only == "true" and "residual" in dets[target].parts:
        log(f"bright-only attacker against {target}")
        results[target]["bright_only"] = bright_only(clf, dets[target], x, y, args, weights if adaptive else (),
                                                     kappas)
    lines = report_lines(args, data, config, clf, full, results, per_part, selection, choice, tag,
                         time.time() - started, kappas)
    text = "\n".join(lines)
    print(text)
    if args.out:
        from medrobust.io import atomic_write_json, atomic_write_text

        atomic_write_text(args.out, text + "\n")
        payload = {"run": str(run), "split": args.split, "data_source": data.source, "synthetic_data": data.synthetic,
                   "eps": args.eps_list, "attack": args.attack, "steps": args.steps, "weights": list(weights),
                   "kappas": kappas, "adaptive": adaptive,
                   "target_fpr": args.target_fpr, "detector_dir": str(det_dir) if det_dir else None,
                   "command": " ".join(sys.argv), "results": _jsonable(results)}
        if selection:
            payload.update(name=selection[0], parts=results[selection[0]]["parts"],
                           combination=results[selection[0]]["combination"], criterion=selection[1])
        atomic_write_json(Path(args.out).with_suffix(".json"), payload)
    return text


def resolve_kappas(text: str, clf, x_val, y_val) -> list[float]:
    """Confidence margins of the adaptive attacker; 'auto' = the median top-1 minus top-2 logit margin of the
    correctly classified clean val images (an adversary that confident looks like a typical clean scan to
    the boundary part)."""
    from medrobust.attacks.driver import _compiled_call

    out = []
    for item in str(text).split(","):
        item = item.strip()
        if item == "auto":
            call = _compiled_call(clf)
            logits = np.concatenate([call(x_val[i:i + 256]).numpy() for i in range(0, len(x_val), 256)])
            top2 = np.sort(logits, axis=1)[:, -2:]
            correct = logits.argmax(1) == y_val
            out.append(float(np.median((top2[:, 1] - top2[:, 0])[correct])))
        elif item:
            out.append(float(item))
    return sorted(set(out))


def off_distribution_images(x: np.ndarray, n: int = 100, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs that are not OCT B-scans, made from the split's scans where possible (as in
    tests/test_detection.py): uniform noise, inverted scans, smooth blobs, checkerboards; float32 [n, s, s, 1]."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n = min(n, len(x))
    s = x.shape[1]
    blobs = ndimage.gaussian_filter(rng.random((n, s, s, 1)), (0, s / 10, s / 10, 0))
    lo, hi = blobs.min(axis=(1, 2, 3), keepdims=True), blobs.max(axis=(1, 2, 3), keepdims=True)
    yy, xx = np.mgrid[:s, :s]
    checker = np.stack([(((yy // k) + (xx // k)) % 2)[..., None] for k in rng.integers(2, max(3, s // 4), n)])
    out = {"uniform noise": rng.random((n, s, s, 1)), "inverted scan": 1.0 - x[:n],
           "smooth blobs": (blobs - lo) / (hi - lo), "checkerboard": checker}
    return {k: v.astype(np.float32) for k, v in out.items()}


def adaptive_objective(det, weight, kappa, effective=None):
    """(objective_fn, success_fn) of the adaptive attacker for medrobust's PGD/APGD, one detector pass each:

        min(max_{j != y} z_j - z_y, kappa) - weight * relu(combined - threshold)

    kappa = 0 is medrobust.evaluation.adaptive's objective (the classifier term stops at the first
    misclassification); kappa > 0 asks for a wrong class that confident (Carlini & Wagner 2017's confidence),
    the attacker that takes the boundary part's value away. success = misclassified and not flagged.
    weight and kappa may be tf.Variables; effective(x_adv) maps the attack variable to the image (bright-only
    attacker)."""
    import tensorflow as tf

    from medrobust.attacks.losses import misclassified

    threshold = tf.constant(det.threshold, tf.float32)

    def scored(x_adv):
        out = det.score_tensor(x_adv if effective is None else effective(x_adv), with_logits=True)
        return out["logits"], out["combined"]

    def objective(x_adv, y):
        logits, score = scored(x_adv)
        y = tf.cast(y, tf.int32)
        true = tf.gather(logits, y, batch_dims=1)
        other = tf.reduce_max(tf.where(tf.one_hot(y, tf.shape(logits)[-1]) > 0, -1e9, logits), axis=-1)
        return tf.minimum(other - true, kappa) - weight * tf.nn.relu(score - threshold)

    def success(x_adv, y):
        logits, score = scored(x_adv)
        return misclassified(logits, y) & (score <= threshold)

    return objective, success


def make_gradient_attack(name: str, clf, steps: int, objective_fn=None, success_fn=None):
    from medrobust.attacks import PGD
    from medrobust.attacks.apgd import APGD

    if name == "apgd":
        return APGD(clf, steps=steps, loss="ce", objective_fn=objective_fn, success_fn=success_fn)
    return PGD(clf, steps=steps, objective_fn=objective_fn, success_fn=success_fn)


def evaluate_candidate(clf, det, x, y, args, weights, kappas) -> dict:
    """Per eps: the plain attack (cross-entropy) and, for every (kappa, weight), the adaptive attacker, on the
    correctly classified images. An image is a silent failure if ANY of them leaves it misclassified and
    unflagged (the attacker picks per image). Figures as medrobust.evaluation reports them."""
    import tensorflow as tf

    from medrobust.attacks import attack_batches, predict_labels
    from medrobust.evaluation.metrics import detection_auroc

    clean = det.score(x)
    correct = predict_labels(clf, x) == y
    idx = np.flatnonzero(correct)
    n_correct = len(idx)
    out = {"clean_accuracy": float(correct.mean()),
           "clean_false_referral_rate": float(np.mean(clean["combined"] > det.threshold)),
           "off_distribution_flag_rate": {k: float(det.predict(v).mean())
                                          for k, v in off_distribution_images(x).items()}}
    wv, kv = tf.Variable(0.0, trainable=False), tf.Variable(0.0, trainable=False)
    plain_attack = make_gradient_attack(args.attack, clf, args.steps)
    adaptive_attack = make_gradient_attack(args.attack, clf, args.steps, *adaptive_objective(det, wv, kv))

    def figures(x_adv):
        wrong = predict_labels(clf, x_adv) != y[idx]
        scores = det.score(x_adv)
        flagged = scores["combined"] > det.threshold
        fig = {"attack_success_rate": float(wrong.mean()) if n_correct else None,
               "system_risk": float((wrong & ~flagged).mean()) if n_correct else None,
               "tpr_at_fpr": float(flagged[wrong].mean()) if wrong.any() else None,
               "detection_auroc": detection_auroc(clean["combined"], scores["combined"][wrong]),
               "detection_auroc_parts": {q: detection_auroc(clean[q], scores[q][wrong]) for q in det.score_names}}
        return fig, wrong & ~flagged

    for eps in args.eps_list:
        t0 = time.time()
        x_adv = attack_batches(plain_attack, x[idx], y[idx], eps, args.batch_size, progress=False)
        entry, silent_any = figures(x_adv)
        entry.update(classifier_only_risk=entry["attack_success_rate"], n_clean_correct=n_correct,
                     max_linf=float(np.abs(x_adv - x[idx]).max()) if n_correct else 0.0)
        if weights:
            worst, settings = None, []
            for kappa in kappas:
                for w in weights:
                    wv.assign(w)
                    kv.assign(kappa)
                    xa = attack_batches(adaptive_attack, x[idx], y[idx], eps, args.batch_size, progress=False)
                    fig, silent = figures(xa)
                    silent_any |= silent
                    settings.append({"kappa": kappa, "weight": w, **fig})
                    if worst is None or fig["system_risk"] > worst[0]["system_risk"]:
                        worst = (fig, kappa, w)
            entry["adaptive"] = {**worst[0], "system_risk": float(silent_any.mean()) if n_correct else None,
                                 "worst_setting": {"kappa": worst[1], "weight": worst[2]}, "per_setting": settings}
        entry["seconds"] = round(time.time() - t0, 1)
        log(f"  eps {eps * 255:.3g}/255: classifier-only {fmt(entry['classifier_only_risk'])}, system risk plain "
            f"{fmt(entry['system_risk'])}, adaptive {fmt(entry.get('adaptive', {}).get('system_risk'))} "
            f"({entry['seconds']:.0f} s)")
        out[f"{eps:g}"] = entry
    return out


def select(results: dict, eps_list, adaptive: bool, min_ood: float = 0.95):
    """Among the candidates that flag at least `min_ood` of every kind of non-OCT input (what the UAD
    detector promised before: docs/security.md), the one with the lowest sum over eps of the (adaptive, if
    measured) system risk, then with fewer parts (cheaper on the edge). If none qualifies, all compete."""
    key_name = "adaptive system risk" if adaptive else "system risk"

    def risk(r, e):
        entry = r["eps"][f"{e:g}"]
        v = entry["adaptive"]["system_risk"] if adaptive and "adaptive" in entry else entry["system_risk"]
        return 1.0 if v is None else v

    eligible = [n for n, r in results.items() if min(r["off_distribution_flag_rate"].values()) >= min_ood]
    order = sorted(eligible or list(results), key=lambda n: (round(sum(risk(results[n], e) for e in eps_list), 9),
                                                             len(results[n]["parts"])))
    criterion = (f"lowest sum over eps {', '.join(f'{e * 255:.3g}/255' for e in eps_list)} of the {key_name} on val "
                 f"among the candidates flagging >= {min_ood:g} of every kind of non-OCT input"
                 + ("" if eligible else " (none did: all compared)")
                 + ", ties broken by fewer parts; each threshold from clean val at the target false-referral rate")
    return order[0], criterion


def bright_only(clf, det, x, y, args, weights, kappas) -> dict:
    """The attacks of `evaluate_candidate` confined to the pixels outside the residual part's dark region
    (hard mask from the clean image): plain (cross-entropy) and adaptive (each kappa and weight; worst case
    per image), on the correctly classified images. Returns per-eps figures."""
    import tensorflow as tf

    from medrobust.attacks import predict_labels
    from medrobust.attacks.losses import cross_entropy, misclassified
    from medrobust.detection.scores import dark_mask
    from medrobust.evaluation.metrics import detection_auroc

    correct = predict_labels(clf, x) == y
    x, y = x[correct], y[correct]
    res = det.config.get("residual", {})
    mask = (~dark_mask(x, res.get("dark_fraction", 0.5), res.get("background", 5))).astype(np.float32)
    bs = args.batch_size
    x0v = tf.Variable(tf.zeros((bs,) + x.shape[1:]), trainable=False)
    mv = tf.Variable(tf.zeros((bs,) + x.shape[1:]), trainable=False)
    wv, kv = tf.Variable(0.0, trainable=False), tf.Variable(0.0, trainable=False)

    def effective(x_adv):
        return x0v + mv * (x_adv - x0v)

    attacks = {
        "plain": make_gradient_attack(args.attack, clf, args.steps,
                                      lambda a, b: cross_entropy(clf(effective(a), training=False), b),
                                      lambda a, b: misclassified(clf(effective(a), training=False), b)),
        "adaptive": make_gradient_attack(args.attack, clf, args.steps,
                                         *adaptive_objective(det, wv, kv, effective=effective))}
    clean_scores = det.score(x)
    out = {"pixels_attackable": float(mask.mean())}
    settings = [(0.0, 0.0)] + [(k, w) for k in kappas for w in weights]
    for eps in args.eps_list:
        silent_any = np.zeros(len(x), bool)
        entry = {}
        for kappa, w in settings:
            attack = attacks["plain" if w == 0 else "adaptive"]
            wv.assign(w)
            kv.assign(kappa)
            adv = np.empty_like(x)
            for start in range(0, len(x), bs):
                stop = min(start + bs, len(x))
                pad = bs - (stop - start)
                xb = np.concatenate([x[start:stop], np.repeat(x[stop - 1:stop], pad, 0)])
                mb = np.concatenate([mask[start:stop], np.repeat(mask[stop - 1:stop], pad, 0)])
                yb = np.concatenate([y[start:stop], np.repeat(y[stop - 1:stop], pad, 0)])
                x0v.assign(xb)
                mv.assign(mb)
                xa = np.asarray(attack(xb, yb, eps))
                adv[start:stop] = (xb + mb * (xa - xb))[:stop - start]
            wrong = predict_labels(clf, adv) != y
            scores = det.score(adv)
            silent = wrong & ~(scores["combined"] > det.threshold)
            silent_any |= silent
            key = "plain" if w == 0 else f"kappa={kappa:.3g}, w={w:g}"
            entry[key] = {
                "attack_success_rate": float(wrong.mean()) if len(x) else None,
                "system_risk": float(silent.mean()) if len(x) else None,
                "detection_auroc": detection_auroc(clean_scores["combined"], scores["combined"][wrong]),
                "detection_auroc_parts": {q: detection_auroc(clean_scores[q], scores[q][wrong]) for q in det.parts},
            }
            e = entry[key]
            log(f"  bright-only eps {eps * 255:.3g}/255 {key}: success {fmt(e['attack_success_rate'])}, "
                f"risk {fmt(e['system_risk'])}, residual AUROC {fmt(e['detection_auroc_parts'].get('residual'))}")
        entry["system_risk_worst"] = float(silent_any.mean()) if len(x) else None
        out[f"{eps:g}"] = entry
    return out


def report_lines(args, data, config, clf, full, results, per_part, selection, choice, tag, seconds,
                 kappas) -> list[str]:
    from medrobust.detection import ALL_PARTS

    split = args.split
    adaptive = args.adaptive == "true"
    n = len(data[split][1]) if not args.limit else min(args.limit, len(data[split][1]))
    lines = [f"# UAD parts and combinations on {split}{tag}", "",
             f"Run `{args.run}` ({config.get('method')}, {config.get('arch')}, label fraction "
             f"{config.get('label_fraction')}, {config.get('image_size')} px); data {data.describe()}; "
             f"{n} {split} images. Detector: every part fitted on the clean training split without labels, "
             f"standardised and thresholded on clean val (target false-referral rate {args.target_fpr:g}). "
             f"Attack: {args.attack.upper()}-L-inf {args.steps} steps on the correctly classified images; plain = "
             "cross-entropy; adaptive = the same attack on min(max_(j!=y) z_j - z_y, kappa) - w relu(combined - "
             f"threshold), kappa in {{{', '.join(f'{k:.3g}' for k in kappas)}}} (0 = medrobust.evaluate's adaptive "
             "attacker; >0 asks for a confident wrong class), "
             f"w in {{{', '.join(f'{w:g}' for w in args.weight_list)}}}; "
             "an image counts as a silent failure if the plain attack or any (kappa, w) hides it.", ""]
    if per_part:
        lines += [f"## Detection AUROC of each part ({split}; clean {split} images vs successful adversaries)", "",
                  f"Adaptive adversaries attack the whole detector `{per_part['candidate']}`.", ""]
        head = "| part | " + " | ".join(
            f"plain {float(e) * 255:.3g}/255" + (f" | adaptive {float(e) * 255:.3g}/255" if adaptive else "")
            for e in per_part["eps"]) + " |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for part in ("combined",) + tuple(ALL_PARTS):
            cells = []
            for e, entry in per_part["eps"].items():
                cells.append(fmt((entry.get("detection_auroc_parts") or {}).get(part)))
                if adaptive:
                    a = entry.get("adaptive", {}).get("detection_auroc_parts") or {}
                    cells.append(fmt(a.get(part)))
            lines.append(f"| {part} | " + " | ".join(cells) + " |")
        counts = ", ".join(f"{float(e) * 255:.3g}/255: plain success {fmt(v['attack_success_rate'])}"
                           + (f", adaptive success {fmt(v['adaptive']['attack_success_rate'])}" if adaptive else "")
                           for e, v in per_part["eps"].items())
        lines += ["", f"Attack success rates (share of correctly classified images fooled): {counts}.", ""]

    lines += [f"## Candidates: system risk on {split}", "",
              "System risk = share of correctly classified clean images whose attacked version is misclassified "
              "and not flagged (95% Clopper-Pearson interval); classifier-only = misclassified.", ""]
    head = "| candidate | threshold | clean false-referral | non-OCT flagged (min over kinds) | " + " | ".join(
        f"{float(e) * 255:.3g}/255 classifier-only | {float(e) * 255:.3g}/255 plain"
        + (f" | {float(e) * 255:.3g}/255 **adaptive**" if adaptive else "") for e in args.eps_list) + " | seconds |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        cells = [f"{r['threshold']:.3f}", fmt(r["clean_false_referral_rate"]),
                 fmt(min(r["off_distribution_flag_rate"].values()), 2)]
        for e in args.eps_list:
            entry = r["eps"][f"{e:g}"]
            nc = entry.get("n_clean_correct") or 0
            cells.append(fmt(entry["classifier_only_risk"]))
            cells.append(fmt(entry["system_risk"]))
            if adaptive:
                a = entry["adaptive"]["system_risk"]
                lo, hi = risk_interval(int(round((a or 0) * nc)), nc)
                cells.append(f"**{fmt(a)}** [{fmt(lo, 2)}, {fmt(hi, 2)}]")
        marker = " (chosen)" if (selection and name == selection[0]) or (choice and name == choice["name"]) else ""
        lines.append(f"| {name}{marker} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    lines.append("")
    for name, r in results.items():
        b = r.get("bright_only")
        if not b:
            continue
        lines += [f"## Bright-only attacker against `{name}` ({split})", "",
                  f"{args.attack.upper()} confined to the {b['pixels_attackable']:.0%} of pixels outside the residual "
                  "part's dark region (hard mask of the clean image), so the noise-residual score cannot see it.", "",
                  "| eps | attacker | attack success | system risk | combined AUROC | residual AUROC |",
                  "|---|---|---|---|---|---|"]
        for e in args.eps_list:
            entry = b[f"{e:g}"]
            for key, v in entry.items():
                if key == "system_risk_worst":
                    continue
                lines.append(f"| {e * 255:.3g}/255 | {key} | {fmt(v['attack_success_rate'])} | "
                             f"{fmt(v['system_risk'])} | {fmt(v['detection_auroc'])} | "
                             f"{fmt(v['detection_auroc_parts'].get('residual'))} |")
            lines.append(f"| {e * 255:.3g}/255 | worst per image | | **{fmt(entry['system_risk_worst'])}** | | |")
        lines.append("")
    if selection:
        lines += [f"**Chosen on val:** `{selection[0]}` ({selection[1]}).", ""]
    if choice:
        lines += [f"**Evaluated the choice made on val:** `{choice['name']}` ({choice.get('criterion', '')}); "
                  f"from {args.choice}.", ""]
    lines.append(f"(total {seconds:.0f} s; command: `python benchmarks/detector_quality.py {' '.join(sys.argv[1:])}`)")
    return lines


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


# -------------------------------------------------------------------------------------------- phantom mode

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


def phantom_mode(args) -> str:
    from sklearn.metrics import roc_auc_score

    from medrobust.attacks import PGD, accuracy, attack_batches, predict_labels
    from medrobust.data import load_data
    from medrobust.detection import ALL_PARTS, COMBINATIONS, Detector
    from medrobust.models import load_classifier

    started = time.time()
    sizes = tuple(int(v) for v in args.phantom_size.split(","))
    data = load_data(args.data or "phantom", image_size=args.image_size, seed=args.seed, phantom_size=sizes)
    tag = " [SYNTHETIC phantom]" if data.synthetic else ""
    log(f"data: {data.describe()}")
    (x_tr, y_tr), (x_va, _), (x_te, y_te) = data["train"], data["val"], data["test"]
    if args.classifier:
        clf = load_classifier(args.classifier)
    else:
        log(f"training a standard small CNN (width {args.width}, {args.epochs} epochs)")
        clf = train_classifier(x_tr, y_tr, args.image_size, args.width, args.epochs, args.seed)
    clean_acc = accuracy(clf, x_te, y_te)
    log(f"clean test accuracy {clean_acc:.4f}; fitting the detector ({args.detector_epochs} AE epochs)")
    det = Detector.fit(clf, x_tr, x_va, epochs=args.detector_epochs, seed=args.seed, target_fpr=args.target_fpr,
                       parts=ALL_PARTS)
    dets = {rule: det.with_parts(det.parts, x_va, combination=rule) for rule in COMBINATIONS}
    det = dets["max"]
    clean = {rule: dets[rule].score(x_te) for rule in COMBINATIONS}
    fpr_test = float(np.mean(clean["max"]["combined"] > det.threshold))
    clean_msp = max_softmax_score(clf, x_te)

    n = min(args.n_attack, len(x_te))
    xa_src, ya_src = x_te[:n], y_te[:n]
    correct = predict_labels(clf, xa_src) == ya_src
    attack = PGD(clf, steps=args.steps)
    header = ("| eps | attack success | n adv | " + " | ".join(f"combined ({r})" for r in COMBINATIONS) + " | "
              + " | ".join(ALL_PARTS) + " | max-softmax baseline | TPR at threshold (max) |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]

    def auc(clean_scores, adv_scores):
        if not len(adv_scores):
            return float("nan")
        labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(adv_scores))]
        return roc_auc_score(labels, np.r_[clean_scores, adv_scores])

    for eps in args.eps_list:
        log(f"PGD-Linf eps={eps} ({args.steps} steps) on {n} test images")
        x_adv = attack_batches(attack, xa_src, ya_src, eps, progress=False)
        f = correct & (predict_labels(clf, x_adv) != ya_src)
        adv = {rule: dets[rule].score(x_adv) for rule in COMBINATIONS}
        cells = [f"{eps:g}", f"{f.sum() / max(1, correct.sum()):.3f}", f"{int(f.sum())}"]
        cells += [f"{auc(clean[r]['combined'], adv[r]['combined'][f]):.3f}" for r in COMBINATIONS]
        cells += [f"{auc(clean['max'][p], adv['max'][p][f]):.3f}" for p in ALL_PARTS]
        cells.append(f"{auc(clean_msp, max_softmax_score(clf, x_adv[f])):.3f}")
        cells.append(f"{np.mean(adv['max']['combined'][f] > det.threshold):.3f}")
        rows.append("| " + " | ".join(cells) + " |")

    lines = [f"## UAD detection AUROC vs PGD-Linf ({args.steps} steps){tag}", "",
             f"Data: {data.describe()}. Standard small CNN (width {args.width}), clean test accuracy "
             f"{clean_acc:.3f}. Detector: every part, {args.detector_epochs} AE epochs, threshold "
             f"{det.threshold:.3f} (rule max) for target FPR {args.target_fpr:g}; clean FPR on {len(x_te)} test "
             f"images {fpr_test:.4f} (validation {det.config['val_fpr']:.4f}). AUROC: {len(x_te)} clean test "
             f"images vs successful adversaries of the first {n} (attack success = share of the correctly "
             "classified ones fooled).", "", *rows, "", f"(total {time.time() - started:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from medrobust.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return text


def main(argv=None) -> str:
    args = parse_args(argv)
    from medrobust.cli import import_tensorflow

    import_tensorflow()  # without TensorFlow's CPU start-up noise (cuInit)
    return run_mode(args) if args.run else phantom_mode(args)


if __name__ == "__main__":
    main()
