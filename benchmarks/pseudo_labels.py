"""How good are an SSAT run's pseudo-labels, class by class? (the teacher's answers on its unlabeled pool)

    python benchmarks/pseudo_labels.py RUN [RUN ...] [--json OUT.json]

RUN is a `--method ssat` run folder trained at a label fraction below 1 (its config.json names the data,
seed, label fraction, image size and teacher). The unlabeled pool is the part of the training split
whose labels the run did not use (medrobust.data.splits.labeled_unlabeled_split with the run's seed), so
its true labels are known here, though never shown to training; val and test are not read. For each
run it prints, per class, the pool's count, the recall of the teacher's hard pseudo-labels (share of the
class's scans labeled as that class) and their precision, for three ways of labeling:
- raw: arg-max of the teacher's softmax (what SSAT uses);
- flip: arg-max of the softmax averaged over the scan and its horizontal mirror (test-time flip);
- aligned: distribution alignment (Berthelot et al. 2020, ReMixMatch): softmax x (labeled class
  shares / the pool's mean softmax), renormalised, so the pseudo-class shares follow the labeled ones.
Figures from the synthetic phantom are marked SYNTHETIC. A `--unlabeled PATH` pool has no labels, so
only the training split's part is scored.
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

LABELINGS = ("raw", "flip", "aligned")


def pseudo_label_quality(probs: np.ndarray, y: np.ndarray) -> dict:
    """Per-class quality of hard pseudo-labels argmax(probs) against the true labels y.

    probs: float [n, 4] (rows need not sum to 1); y: int [n]. Recall is clinical_metrics' sensitivity,
    precision is read off its confusion matrix. Returns {"accuracy", "balanced_accuracy" (mean recall over
    the classes present), "per_class": [{"count", "pseudo_count", "recall", "precision"}] (None where
    undefined)}. Raises ValueError on mismatched shapes or an empty pool.
    """
    probs, y = np.asarray(probs, np.float64), np.asarray(y).astype(np.int64)
    if probs.ndim != 2 or probs.shape[0] != y.shape[0] or probs.shape[0] == 0 or probs.shape[1] != len(CLASSES):
        raise ValueError(f"probs must be [n, {len(CLASSES)}] with n = len(y) > 0, got {probs.shape} and {y.shape}")
    metrics = clinical_metrics(y, probs)
    cm = np.asarray(metrics["confusion_matrix"])
    per_class = [{"count": int(cm[c].sum()), "pseudo_count": int(cm[:, c].sum()),
                  "recall": metrics["per_class"][name]["sensitivity"],
                  "precision": float(cm[c, c] / cm[:, c].sum()) if cm[:, c].any() else None}
                 for c, name in enumerate(CLASSES)]
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": balanced_accuracy(metrics["per_class"]),
            "per_class": per_class}


def aligned(probs: np.ndarray, labeled_shares: np.ndarray) -> np.ndarray:
    """Distribution alignment (ReMixMatch): probs [n, C] x labeled_shares [C] / probs.mean(0), rows renormalised."""
    out = np.asarray(probs, np.float64) * np.asarray(labeled_shares, np.float64) / np.asarray(probs).mean(0)
    return out / out.sum(1, keepdims=True)


def _teacher_path(run: Path, config: dict) -> Path:
    if config.get("method") != "ssat" or float(config.get("label_fraction", 1.0)) >= 1.0:
        raise cli.UsageError(f"{run}: not an SSAT run with unlabeled scans (method {config.get('method')}, "
                             f"label fraction {config.get('label_fraction')})")
    teacher = (config.get("teacher_run") or {}).get("path") or config.get("teacher")
    if teacher in (None, "snapshot", "none", "auto", "standard"):
        raise cli.UsageError(f"{run}: its pseudo-labels come from {teacher!r}, not a saved teacher model: "
                             "only a run with --teacher standard or --teacher PATH can be scored")
    path = Path(teacher)
    if not path.is_file():
        raise cli.UsageError(f"{run}: its teacher {path} is no longer there")
    return path


def score_run(run: Path, config: dict) -> dict:
    """The three labelings' quality for one run folder and its config.json (see the module docstring)."""
    import keras

    from medrobust.data import load_run_data
    from medrobust.data.splits import labeled_unlabeled_split

    teacher_path = _teacher_path(run, config)
    data = load_run_data(config)
    x, y = data["train"]
    labeled, unlabeled = labeled_unlabeled_split(y, float(config["label_fraction"]), int(config.get("seed", 0)))
    teacher = keras.models.load_model(teacher_path, compile=False, safe_mode=True)

    def softmax(images):
        return keras.ops.convert_to_numpy(keras.ops.softmax(teacher.predict(images, batch_size=256, verbose=0)))

    pool = x[unlabeled]
    raw = softmax(pool)
    shares = np.bincount(y[labeled], minlength=len(CLASSES)) / len(labeled)
    probs = {"raw": raw, "flip": (raw + softmax(pool[:, :, ::-1])) / 2, "aligned": aligned(raw, shares)}
    return {"run": str(run), "teacher": str(teacher_path), "data_source": data.source,
            "synthetic_data": data.synthetic, "seed": config.get("seed"), "label_fraction": config["label_fraction"],
            "n_labeled": int(len(labeled)), "n_pool": int(len(unlabeled)),
            **{name: pseudo_label_quality(p, y[unlabeled]) for name, p in probs.items()}}


def table(result: dict) -> list[str]:
    mark = " (SYNTHETIC phantom)" if result["synthetic_data"] else ""
    lines = [f"{result['run']}: teacher {result['teacher']}, seed {result['seed']}, {result['n_labeled']} labeled, "
             f"{result['n_pool']} pool scans of {result['data_source']}{mark}",
             "| labeling | accuracy | balanced | " + " | ".join(f"{c} recall / precision (n)" for c in CLASSES) + " |",
             "|---|---:|---:|" + "---:|" * len(CLASSES)]
    for name in LABELINGS:
        q = result[name]
        cells = [f"{_f(p['recall'])} / {_f(p['precision'])} ({p['pseudo_count']} of {p['count']})"
                 for p in q["per_class"]]
        lines.append(f"| {name} | {q['accuracy']:.3f} | {q['balanced_accuracy']:.3f} | " + " | ".join(cells) + " |")
    return lines


def _f(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="SSAT run folders")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file (a new file)")
    args = parser.parse_args(argv)
    configs = {}
    for run in map(Path, args.runs):  # every run checked before any model loads
        if not (run / "config.json").is_file():
            raise cli.UsageError(f"{run}: no config.json (not a medrobust run folder)")
        try:
            configs[run] = read_run_config(run)
        except ValueError as exc:  # names the file and what is wrong with it
            raise cli.UsageError(str(exc)) from None
        _teacher_path(run, configs[run])
    cli.check_new_json(args.json)
    cli.import_tensorflow()
    results = []
    for run, config in configs.items():
        results.append(score_run(run, config))
        print("\n".join(table(results[-1])) + "\n", flush=True)
    cli.write_json_results(args.json, results, "benchmarks/pseudo_labels.py", argv)


if __name__ == "__main__":
    cli.run_script(main)
