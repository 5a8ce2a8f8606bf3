"""python -m medrobust.evaluate: how safe is a trained system? Robust accuracy, detection, system risk.

Writes report.json, report.md and PNG plots to --out (default RUN/eval).
"""

from __future__ import annotations

import time
from pathlib import Path

from medrobust import cli
from medrobust.io import atomic_write_json, atomic_write_text, read_json

DEFAULT_EPS = "0.001,0.002,0.004,0.008"


def evaluate(run: str, data: str | None = None, attacks="fgsm,pgd,apgd,cw,square", eps=DEFAULT_EPS,
             adaptive="true", limit: int | None = None, out: str | None = None, batch_size: int = 250,
             pgd_steps: int = 20, apgd_steps: int = 100, cw_steps: int = 100, square_queries: int = 1000,
             seed: int = 0, progress="true") -> dict:
    """Attack the run's classifier (and detector) on the test split and write report.json, report.md, plots.

    Args:
      run: a folder written by python -m medrobust.train.
      data: test data (default: the data the run was trained on, as recorded in its config.json; another
        source is named in a warning).
      attacks: any of fgsm, pgd, apgd, cw, square (comma-separated).
      eps: L-inf budgets in [0, 1] pixel scale (0.002 ~ 0.5/255).
      adaptive: also attack classifier and detector together (PGD/APGD), reporting the worst case.
      limit: evaluate on the first N test images of a fixed shuffle (quick runs).
      out: report folder (default: RUN/eval).
      batch_size: images per attack batch.
      pgd_steps: PGD iterations.
      apgd_steps: APGD-CE iterations.
      cw_steps: Carlini-Wagner L2 optimisation steps.
      square_queries: Square Attack queries per image.
      seed: random seed (the --limit shuffle and the attacks' random starts).
      progress: true | false: show progress bars.
    """
    from medrobust.evaluation.suite import ATTACK_NAMES

    run_dir = Path(str(run))
    if not (run_dir / "classifier.keras").is_file():
        raise cli.UsageError(f"{run_dir}: not a trained run (no classifier.keras); train with python -m medrobust.train")
    names = cli.parse_names(attacks, "attacks", ATTACK_NAMES)
    budgets = cli.parse_floats(eps, "eps")
    if any(not 0 < e <= 1 for e in budgets):
        raise cli.UsageError(f"--eps values must be in (0, 1], got {budgets}")
    if limit is not None and int(limit) < 1:
        raise cli.UsageError(f"--limit must be a positive integer, got {limit}")
    config = read_json(run_dir / "config.json")
    out_dir = Path(str(out)) if out else run_dir / "eval"
    return _evaluate(run_dir, config, data, names, budgets, cli.parse_bool(adaptive, "adaptive"),
                     limit, out_dir, batch_size, seed, cli.parse_bool(progress, "progress"),
                     dict(pgd_steps=pgd_steps, apgd_steps=apgd_steps, cw_steps=cw_steps, square_queries=square_queries))


def _evaluate(run_dir, config, data, names, budgets, adaptive, limit, out_dir, batch_size, seed, progress, steps):
    from medrobust.data import load_run_data

    # Data first: a bad dataset fails in a second, before TensorFlow loads. Default: the run's own data.
    dataset = load_run_data(config, data)
    cli.import_tensorflow()
    import keras
    import numpy as np

    from medrobust.evaluation.plots import write_plots
    from medrobust.evaluation.report import markdown
    from medrobust.evaluation.runner import SystemEvaluator, eps_key
    from medrobust.evaluation.suite import AttackSettings
    from medrobust.models import load_classifier

    keras.utils.set_random_seed(seed)
    started = time.time()
    classifier = load_classifier(run_dir / "classifier.keras")
    detector = None
    if (run_dir / "detector").exists():
        from medrobust.detection import Detector

        detector = Detector.load(run_dir / "detector", classifier)
    x, y = dataset["test"]
    if limit:
        keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:int(limit)])
        x, y = x[keep], y[keep]
    print(f"evaluating {run_dir} on {dataset.describe()}; {len(y)} test images"
          + ("" if detector else "; no detector in this run"))
    evaluator = SystemEvaluator(classifier, detector, x, y, AttackSettings(seed=seed, **steps), batch_size, progress)
    report = {"run": str(run_dir), "data_source": dataset.source, "synthetic_data": dataset.synthetic,
              "n_images": int(len(y)), "eps": list(budgets), "adaptive": adaptive, "settings": steps,
              **evaluator.clean_report(), "attacks": {}}
    for name in names:
        report["attacks"][name] = {}
        for eps in budgets:
            entry = evaluator.attack_entry(name, eps, adaptive=adaptive)
            report["attacks"][name][eps_key(eps)] = entry
            line = f"{name:>6} eps={eps:g}: robust acc {entry['robust_accuracy']:.3f}, system risk {entry['system_risk']:.3f}"
            if entry.get("adaptive"):
                line += f" (adaptive {entry['adaptive']['system_risk']:.3f})"
            print(line, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, evaluator.curves, out_dir)
    report["seconds"] = round(time.time() - started, 1)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown(report))
    print(f"wrote {out_dir / 'report.json'}, report.md and {len(report['plots'])} plots in {report['seconds']} s")
    return report


def main() -> None:
    cli.run(evaluate)


if __name__ == "__main__":
    main()
