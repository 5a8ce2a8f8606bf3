"""python -m medrobust.evaluate: how safe is a trained system? Robust accuracy, detection, system risk.

Writes report.json, report.md and PNG plots to --out (default RUN/eval). Every finished (attack, eps) is
saved to OUT/progress/ as it finishes (and report.md rewritten, marked INCOMPLETE until the end; report.json
appears once the evaluation is complete): Ctrl-C stops within seconds, and rerunning the same command resumes.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from medrobust import cli
from medrobust.io import atomic_write_json, atomic_write_text, read_json, read_run_config

DEFAULT_EPS = "0.001,0.002,0.004,0.008"
DEFAULT_ATTACKS = "fgsm,pgd,apgd,cw,square,fmn"
SPLITS = ("test", "val", "all")
RUN_CONFIG_KEYS = ("method", "epochs", "epochs_resolved", "label_fraction", "arch", "width", "image_size", "seed",
                   "data_source", "eps", "lam", "augmentation", "class_weights")


def evaluate(run: str, data: str | None = None, split: str = "test", attacks=DEFAULT_ATTACKS, eps=DEFAULT_EPS,
             eps_l2="auto", adaptive="true", limit: int | None = None, out: str | None = None, batch_size: int = 250,
             pgd_steps: int = 20, apgd_steps: int = 100, cw_steps: int = 100, square_queries: int = 1000,
             fmn_steps: int = 100, seed: int = 0, progress="true") -> dict:
    """Attack the run's classifier (and detector) and write report.json, report.md and plots.

    Args:
      run: a folder written by python -m medrobust.train.
      data: the images to evaluate on (default: the data the run was trained on, as recorded in its
        config.json; another source is named in a warning).
      split: test (the data's test split) | val (its validation split: for choosing a recipe without
        looking at test; the detector's threshold was set on these images, so its false-referral rate
        there is not an estimate) | all (every image of a folder of class folders, e.g. scans from
        another site; refused for the run's own training data).
      attacks: any of fgsm, pgd, apgd, cw, square, fmn (comma-separated). cw is reported under L2.
      eps: L-inf budgets in [0, 1] pixel scale (0.002 ~ 0.5/255).
      eps_l2: L2 budgets of the L2 attacks (cw); auto = each L-inf budget times sqrt(pixels), the L2
        length of a perturbation that moves every pixel by eps.
      adaptive: also attack classifier and detector together (PGD/APGD), reporting the worst case.
      limit: evaluate on the first N images of a fixed shuffle (quick runs).
      out: report folder (default: RUN/eval).
      batch_size: images per attack batch.
      pgd_steps: PGD iterations.
      apgd_steps: APGD-CE iterations.
      cw_steps: Carlini-Wagner L2 optimisation steps.
      square_queries: Square Attack queries per image.
      fmn_steps: FMN (fast minimum-norm) iterations.
      seed: random seed (the --limit shuffle and the attacks' random starts).
      progress: true | false: show progress bars (on a terminal; never in a log file or pipe).
    """
    from medrobust.evaluation.suite import ATTACK_NAMES

    run_dir = Path(str(run))
    if not (run_dir / "classifier.keras").is_file():
        raise cli.UsageError(f"{run_dir}: not a trained run (no classifier.keras); train with python -m medrobust.train")
    names = cli.parse_names(attacks, "attacks", ATTACK_NAMES)
    budgets = _budgets(eps, "eps", upper=1.0)
    if str(eps_l2).strip().lower() != "auto":
        _budgets(eps_l2, "eps-l2", upper=math.inf)
    split = str(split).strip().lower()
    if split not in SPLITS:
        raise cli.UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    for value, name in ((limit, "limit"), (batch_size, "batch-size"), (pgd_steps, "pgd-steps"),
                        (apgd_steps, "apgd-steps"), (cw_steps, "cw-steps"), (square_queries, "square-queries"),
                        (fmn_steps, "fmn-steps")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise cli.UsageError(f"--{name} must be a positive integer, got {value!r}")
    config = read_run_config(run_dir)
    if data is not None and split != "all":  # its splits are used as given, so they must be complete
        from medrobust.data.folders import split_layout_problem

        problem = split_layout_problem(Path(str(data)).expanduser())
        if problem:
            raise cli.UsageError(f"--data {problem}")
    if split == "all":
        if data is None:
            raise cli.UsageError("--split all evaluates a whole folder of other scans: pass it with --data PATH")
        _check_whole_folder(str(data), config)
    out_dir = Path(str(out)) if out else run_dir / "eval"
    return _evaluate(run_dir, config, data, split, names, budgets, eps_l2, cli.parse_bool(adaptive, "adaptive"),
                     limit, out_dir, batch_size, seed, cli.parse_bool(progress, "progress"),
                     dict(pgd_steps=pgd_steps, apgd_steps=apgd_steps, cw_steps=cw_steps, square_queries=square_queries,
                          fmn_steps=fmn_steps))


def _budgets(value, name: str, upper: float) -> tuple[float, ...]:
    budgets = tuple(sorted(set(cli.parse_floats(value, name))))
    if any(not 0 < e <= upper for e in budgets):
        raise cli.UsageError(f"--{name} values must be in (0, {upper:g}], got {budgets}")
    return budgets


def _check_whole_folder(data: str, config: dict) -> None:
    from medrobust.data import run_data_argument

    path = Path(data).expanduser()
    if not path.is_dir():
        raise cli.UsageError(f"--split all evaluates a folder of class folders; {data!r} is not a folder")
    trained_on = Path(run_data_argument(config)).expanduser()
    if trained_on.exists() and path.resolve() == trained_on.resolve():
        raise cli.UsageError(f"{path}: the run was trained on this data, so --split all would evaluate it on its own "
                             "training images; use --split test, or pass a folder of other scans")


def _load_images(config: dict, data: str | None, split: str, image_size: int, progress: bool):
    """(x, y, description dict). split 'test': the data's test split; 'all': every image of the folder
    (medrobust.data.folders.load_image_tree; unreadable files skipped and listed)."""
    import warnings

    if split == "all":
        from medrobust.data import folders

        part = folders.load_image_tree(data, image_size, progress=progress)
        for file, reason in part.skipped:
            warnings.warn(f"skipped {file}: {reason}", stacklevel=2)
        source = f"folder:{Path(data).expanduser()}"
        overlap = _training_overlap(config, part, image_size)
        info = {"source": source, "split": "all", "whole_folder": True, "synthetic": False,
                "skipped": [list(s) for s in part.skipped], "training_overlap": overlap,
                "describe": f"{source} (real scans, {image_size}x{image_size}; the whole folder, {len(part.y)} images)"}
        return part.x, part.y, info
    from medrobust.data import load_run_data

    dataset = load_run_data(config, data)  # default: the run's own data; other data is named in a warning
    x, y = dataset[split]
    info = {"source": dataset.source, "split": split, "whole_folder": False, "synthetic": dataset.synthetic,
            "skipped": [list(s) for s in dataset.skipped], "describe": dataset.describe()}
    return x, y, info


def _training_overlap(config: dict, part, image_size: int) -> dict:
    """How much of a whole folder the run was trained on: images identical (after preprocessing) to a
    training image, and images of patients in the training split (Kermany file names). Refuses a folder
    that is all training images; warns, naming the counts, for a partial overlap."""
    import hashlib
    import warnings

    import numpy as np

    from medrobust.data import load_run_data
    from medrobust.data.folders import patient_id

    try:
        trained = load_run_data(config, image_size=image_size)
    except ValueError as exc:  # the training data is gone: say that the check could not be made
        warnings.warn(f"could not check the folder against the run's training data: {exc}", stacklevel=3)
        return {"checked": False}
    x_train, _ = trained["train"]
    digest = lambda im: hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest()  # noqa: E731
    seen = {digest(im) for im in x_train}
    identical = np.array([digest(im) in seen for im in part.x], bool)
    train_patients = {p for p in trained.patients.get("train", []) if p is not None}
    ids = [patient_id(f) for f in part.files]
    of_patients = np.array([p in train_patients for p in ids], bool)
    either = identical | of_patients
    overlap = {"checked": True, "images": int(either.sum()), "identical_images": int(identical.sum()),
               "training_patients": len({p for p, o in zip(ids, of_patients) if o})}
    if len(either) and either.all():
        raise cli.UsageError(f"every image of this folder is one the run was trained on ({overlap['identical_images']} "
                             "identical, the rest from training patients); evaluate other scans, or use --split test")
    if either.any():
        warnings.warn(f"TRAINING DATA: {overlap['images']} of {len(either)} images of this folder come from the run's "
                      f"training split ({overlap['identical_images']} identical images, "
                      f"{overlap['training_patients']} training patients); their figures are optimistic "
                      "(report.json data.training_overlap)", stacklevel=3)
    return overlap


def _evaluate(run_dir, config, data, split, names, budgets, eps_l2, adaptive, limit, out_dir, batch_size, seed,
              progress, steps):
    # Data first: a bad dataset fails in a second, before TensorFlow loads.
    x, y, data_info = _load_images(config, data, split, config["image_size"], progress)
    cli.import_tensorflow()
    import numpy as np

    from medrobust.evaluation.plots import PLOT_NAMES, write_plots
    from medrobust.evaluation.progress import Progress, fingerprint
    from medrobust.evaluation.report import markdown, small_sample_warning
    from medrobust.evaluation.runner import SystemEvaluator, eps_key
    from medrobust.evaluation.suite import MINIMUM_NORM, NORMS, AttackSettings
    from medrobust.models import load_classifier

    if limit:
        keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:int(limit)])
        x, y = x[keep], y[keep]
    l2_budgets = (tuple(e * math.sqrt(float(np.prod(x.shape[1:]))) for e in budgets)
                  if str(eps_l2).strip().lower() == "auto" else _budgets(eps_l2, "eps-l2", upper=math.inf))
    settings = AttackSettings(seed=seed, **steps)
    model_files = [run_dir / "classifier.keras"] + sorted((run_dir / "detector").glob("*")) \
        if (run_dir / "detector").is_dir() else [run_dir / "classifier.keras"]
    options = {"eps": budgets, "eps_l2": l2_budgets, "adaptive": adaptive, "settings": settings.as_dict()}
    state = Progress(out_dir)
    finished = state.open(fingerprint(x, y, model_files, options), PLOT_NAMES)

    started = time.time()
    classifier = load_classifier(run_dir / "classifier.keras")
    detector = None
    if (run_dir / "detector").exists():
        from medrobust.detection import Detector

        detector = Detector.load(run_dir / "detector", classifier)
    print(f"evaluating {run_dir} on {data_info['describe']}; {len(y)} images"
          + ("" if detector else "; no detector in this run")
          + (f"; resuming: {finished} (attack, eps) results already in {state.dir}" if finished else ""))
    referral = _run_referral(run_dir)
    evaluator = SystemEvaluator(classifier, detector, x, y, settings, batch_size, progress,
                                referral_threshold=referral["threshold"] if referral else None)
    report = {"run": str(run_dir), "complete": False, "command": _command(),
              "run_config": {k: config.get(k) for k in RUN_CONFIG_KEYS},
              "data_source": data_info["source"], "synthetic_data": data_info["synthetic"],
              "data": {k: data_info.get(k) for k in ("source", "split", "whole_folder", "skipped", "training_overlap")}
                      | {"limit": limit},
              "n_images": int(len(y)), "eps": list(budgets), "eps_l2": [round(e, 6) for e in l2_budgets],
              "adaptive": adaptive, "settings": settings.as_dict(),
              "attack_settings": {n: {"norm": NORMS[n], "description": settings.describe(n),
                                      "budgets": list(l2_budgets if NORMS[n] == "l2" else budgets)} for n in names},
              "norms": {n: NORMS[n] for n in names},
              "warnings": [w for w in [small_sample_warning(len(y))] if w],
              "referral_point": ({k: referral.get(k) for k in ("target_sensitivity", "threshold", "score", "chosen_on")}
                                 if referral else None),
              **evaluator.clean_report(), "attacks": {}, "min_norm": {}}
    if state.seconds("clean") is None:
        state.set_seconds("clean", round(time.time() - started, 1))

    def write_report():
        """report.md after every (attack, eps), marked INCOMPLETE until the end; report.json (what other
        tools read) only once complete: the partial results are in progress/state.json."""
        report["min_norm_crosscheck"] = _crosscheck(report)
        report["seconds"] = round(sum(state.state["seconds"].values())
                                  + sum(e.get("seconds", 0) for a in report["attacks"].values() for e in a.values()), 1)
        if report["complete"]:
            atomic_write_json(out_dir / "report.json", report)
        atomic_write_text(out_dir / "report.md", markdown(report))

    for name in names:
        own = l2_budgets if NORMS[name] == "l2" else budgets
        done = state.entries(name)
        report["attacks"][name] = {eps_key(e): done[eps_key(e)] for e in own if eps_key(e) in done}
        if name in state.min_norms():
            report["min_norm"][name] = state.min_norms()[name]
        for eps, entry, curves, carry in evaluator.sweep(name, own, adaptive, state.carry(name), done):
            state.save(name, eps_key(eps), entry, curves, carry)
            if name in MINIMUM_NORM and name not in report["min_norm"]:
                report["min_norm"][name] = _min_norm_info(carry["norms"], evaluator.clean_correct, NORMS[name])
                state.save_min_norm(name, report["min_norm"][name])
            report["attacks"][name] = {eps_key(e): state.entries(name)[eps_key(e)] for e in own
                                       if eps_key(e) in state.entries(name)}
            line = (f"{name:>6} eps={eps:g}{' (L2)' if NORMS[name] == 'l2' else ''}: robust acc "
                    f"{entry['robust_accuracy']:.3f}, system risk {_f(entry['system_risk'])}")
            if entry.get("adaptive"):
                line += f" (adaptive {_f(entry['adaptive']['system_risk'])})"
            print(line + f" [{entry['seconds']:.0f} s]", flush=True)
            write_report()
    out_dir.mkdir(parents=True, exist_ok=True)
    report["complete"] = True
    report["plots"] = write_plots(report, state.curves(), out_dir)
    for stale in set(PLOT_NAMES) - set(report["plots"]):  # e.g. an adaptive plot of an earlier run
        (out_dir / stale).unlink(missing_ok=True)
    write_report()
    state.finish()
    print(f"wrote {out_dir / 'report.json'}, report.md and {len(report['plots'])} plots "
          f"({report['seconds']} s of compute)")
    return report


def _run_referral(run_dir: Path) -> dict | None:
    """The referral operating point the run chose on its validation split (metrics.json), or None (older runs:
    the report then gives referral at the arg-max decision only)."""
    path = run_dir / "metrics.json"
    metrics = read_json(path) if path.is_file() else {}
    point = metrics.get("referral") if isinstance(metrics, dict) else None
    return point if isinstance(point, dict) and isinstance(point.get("threshold"), (int, float)) else None


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _min_norm_info(norms, clean_correct, norm: str) -> dict:
    import numpy as np

    norms = np.asarray(norms, np.float64)
    cc = norms[np.asarray(clean_correct, bool)]
    finite = cc[np.isfinite(cc)]
    return {"norm": norm, "norms": [None if not np.isfinite(v) else round(float(v), 7) for v in norms],
            "median_clean_correct": float(np.median(cc)) if len(cc) and np.isfinite(np.median(cc)) else None,
            "not_found": int(len(cc) - len(finite))}


def _crosscheck(report: dict) -> dict:
    """Robust accuracy of each minimum-norm attack beside the bounded attacks of its norm, at each budget."""
    out = {}
    for name in report.get("min_norm", {}):
        norm = report["norms"][name]
        rows = {}
        for eps, entry in report["attacks"].get(name, {}).items():
            row = {name: entry["robust_accuracy"]}
            for other, by_eps in report["attacks"].items():
                if other != name and report["norms"].get(other) == norm and other != "fgsm" and eps in by_eps:
                    row[other] = by_eps[eps]["robust_accuracy"]
            rows[eps] = row
        out[name] = rows
    return out


def _command() -> str:
    if sys.argv and sys.argv[0].endswith(("evaluate.py", "medrobust-evaluate")):
        return "python -m medrobust.evaluate " + " ".join(sys.argv[1:])
    return "medrobust.evaluate.evaluate() called from Python"


def main() -> None:
    cli.run(evaluate)


if __name__ == "__main__":
    main()
