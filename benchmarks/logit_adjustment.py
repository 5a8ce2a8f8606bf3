"""Would moving the decision towards the rare classes after training help? Post-hoc logit adjustment on val.

    python benchmarks/logit_adjustment.py RUN [RUN ...] [--taus 0,0.25,...,2] [--json OUT.json]

Post-hoc logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment", ICLR): predict
argmax_c (logit_c - tau * log prior_c), prior = the class shares of the run's labeled scans (its seed and
label fraction, medrobust.data.splits.labeled_unlabeled_split). tau = 0 is the model as trained; tau = 1
suits a calibrated model trained on the natural class shares. A run trained with --class-weight balanced
(or --pseudo-class-weight balanced) already leans towards the rare classes, so any tau > 0 shifts on top of
that correction; the tau that helps, if any, is then below 1. The shift is one bias per class, so it could be folded
into the last layer at no inference cost. For each run and tau it prints val accuracy, balanced accuracy
(mean per-class sensitivity), the worst class's sensitivity and per-class sensitivity, then the mean over
the runs (its worst-class column is the mean of each run's worst class). Only the validation
split is read, so a tau can be chosen here without looking at test. Figures from the synthetic phantom are
marked SYNTHETIC.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrobust import cli  # noqa: E402  (after the path insert, so a checkout runs without installing)
from medrobust.classes import CLASSES  # noqa: E402
from medrobust.evaluation.metrics import balanced_accuracy, clinical_metrics  # noqa: E402
from medrobust.io import read_run_config  # noqa: E402

DEFAULT_TAUS = "0,0.25,0.5,0.75,1,1.25,1.5,1.75,2"


def adjusted_predictions(logits: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """int [n]: argmax of logits [n, C] - tau * log(prior [C]). A class absent from the prior (share 0) is
    never predicted once tau > 0. Raises ValueError on mismatched shapes or a negative tau."""
    logits, prior = np.asarray(logits, np.float64), np.asarray(prior, np.float64)
    if logits.ndim != 2 or prior.shape != (logits.shape[1],) or tau < 0:
        raise ValueError(f"need logits [n, C], prior [C] and tau >= 0; got {logits.shape}, {prior.shape}, {tau}")
    if tau == 0:
        return np.argmax(logits, axis=1)
    with np.errstate(divide="ignore"):
        shift = np.where(prior > 0, tau * np.log(prior), np.inf)  # an unseen class: never the prediction
    return np.argmax(logits - shift, axis=1)


def scores(y: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy, balanced accuracy (mean over the classes present in y), the worst class's sensitivity and
    per-class sensitivity (None if absent), from clinical_metrics on the hard predictions."""
    metrics = clinical_metrics(y, np.eye(len(CLASSES))[predicted])
    sens = {c: v["sensitivity"] for c, v in metrics["per_class"].items()}
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": balanced_accuracy(metrics["per_class"]),
            "worst_class": min(v for v in sens.values() if v is not None), "sensitivity": sens}


def score_run(run: Path, config: dict, taus: list[float]) -> dict:
    from medrobust.attacks.driver import predict_logits
    from medrobust.data import load_run_data
    from medrobust.data.splits import labeled_unlabeled_split
    from medrobust.models import load_classifier

    data = load_run_data(config)
    _, y_train = data["train"]
    labeled, _ = labeled_unlabeled_split(y_train, float(config.get("label_fraction", 1.0)), int(config.get("seed", 0)))
    prior = np.bincount(y_train[labeled], minlength=len(CLASSES)) / len(labeled)
    x_val, y_val = data["val"]
    logits = predict_logits(load_classifier(run / "classifier.keras"), x_val)
    return {"run": str(run), "method": config.get("method"), "data_source": data.source,
            "synthetic_data": data.synthetic, "seed": config.get("seed"), "n_val": int(len(y_val)),
            "prior": [round(float(p), 4) for p in prior],
            "taus": [{"tau": t, **scores(y_val, adjusted_predictions(logits, prior, t))} for t in taus]}


def table(rows: list[dict]) -> list[str]:
    lines = ["| tau | val accuracy | balanced | worst class | " + " / ".join(CLASSES) + " |", "|---:|---:|---:|---:|---|"]
    for r in rows:
        sens = " / ".join("-" if v is None else f"{v:.2f}" for v in r["sensitivity"].values())
        lines.append(f"| {r['tau']:g} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {r['worst_class']:.2f} "
                     f"| {sens} |")
    return lines


def mean_rows(results: list[dict]) -> list[dict]:
    rows = []
    for i, t in enumerate(results[0]["taus"]):
        per = [r["taus"][i] for r in results]
        sens = {c: (None if any(p["sensitivity"][c] is None for p in per)
                    else float(np.mean([p["sensitivity"][c] for p in per]))) for c in CLASSES}
        rows.append({"tau": t["tau"], "accuracy": float(np.mean([p["accuracy"] for p in per])),
                     "balanced_accuracy": float(np.mean([p["balanced_accuracy"] for p in per])),
                     "worst_class": float(np.mean([p["worst_class"] for p in per])), "sensitivity": sens})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (classifier.keras and config.json)")
    parser.add_argument("--taus", default=DEFAULT_TAUS, help="adjustment strengths >= 0, comma-separated")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file (a new file)")
    args = parser.parse_args(argv)
    taus = cli.parse_floats(args.taus, "taus")
    if min(taus) < 0:
        raise cli.UsageError(f"--taus must be >= 0, got {args.taus}")
    configs = {}
    for run in map(Path, args.runs):  # every run checked before any model loads
        if not (run / "config.json").is_file() or not (run / "classifier.keras").is_file():
            raise cli.UsageError(f"{run}: no config.json and classifier.keras (not a finished medrobust run)")
        try:
            configs[run] = read_run_config(run)
        except ValueError as exc:  # names the file and what is wrong with it
            raise cli.UsageError(str(exc)) from None
    sources = {run: str(config.get("data_source")) for run, config in configs.items()}
    if len(set(sources.values())) > 1:  # their mean row would average scans of different data sets
        raise cli.UsageError("the runs were trained on different data ("
                             + "; ".join(f"{run}: {source}" for run, source in sources.items())
                             + "); score each data set's runs in a command of its own")
    cli.check_new_json(args.json)
    cli.import_tensorflow()
    results = []
    for run, config in configs.items():
        results.append(score_run(run, config, taus))
        r = results[-1]
        print(f"{run}: {r['method']}, seed {r['seed']}, {r['n_val']} val scans of {r['data_source']}"
              + (" (SYNTHETIC phantom)" if r["synthetic_data"] else "") + f"; labeled class shares {r['prior']}")
        print("\n".join(table(r["taus"])) + "\n", flush=True)
    if len(results) > 1:
        print(f"mean over the {len(results)} runs:\n" + "\n".join(table(mean_rows(results))))
    cli.write_json_results(args.json, results, "benchmarks/logit_adjustment.py", argv)


if __name__ == "__main__":
    cli.run_script(main)
