"""The paper's experiment in one command: which defence keeps an OCT screening system safe?

    python examples/compare_defenses.py [--data phantom] [--epochs 10] [--fractions 0.1,1.0]
        [--methods standard,pgd_at,trades,ssat] [--eps 0.001,0.002,0.003,1/255,2/255,4/255,8/255]
        [--attack pgd] [--limit 0] [--out runs/compare_defenses] [--results docs/compare_defenses]

For each method and label fraction it runs `python -m medrobust.train` (same epochs, seed and model for
every method; SSAT also fits the UAD detector) and then `python -m medrobust.evaluate` with one attack
over the budgets: the paper's own tiny ones (eps <= 0.003 on [0, 1] images) beside the usual 1-8/255.
SSAT+UAD rows are also attacked adaptively (classifier and detector together, worst case over the
trade-off weights). It writes to --results: README.md (the tables, the command, data and machine),
results.json and two plots. Finished runs under --out are reused, so an interrupted comparison resumes.
On the phantom every figure is SYNTHETIC: it shows the code works, not how a model behaves on real OCT.

Ablations use --train-option, e.g. SSAT labelling itself (the paper's variant, no snapshot teacher):
    python examples/compare_defenses.py --methods ssat --fractions 0.1 --detector-for none \
        --train-option teacher=none --out runs/ssat_selflabel --results docs/ssat_selflabel
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

DEFAULT_EPS = "0.001,0.002,0.003,1/255,2/255,4/255,8/255"


def main(argv: list[str] | None = None) -> None:
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="phantom", help="phantom | octmnist | auto | PATH (as the train CLI)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fractions", default="0.1,1.0", help="label fractions every method trains at")
    parser.add_argument("--methods", default="standard,pgd_at,trades,ssat")
    parser.add_argument("--detector-for", default="ssat", help="methods that also get the UAD detector (or all, none)")
    parser.add_argument("--eps", default=DEFAULT_EPS, help="L-inf test budgets in [0, 1] scale; k/255 allowed")
    parser.add_argument("--attack", default="pgd", help="evaluate attack for the table (pgd = PGD-20, apgd = APGD-CE-100)")
    parser.add_argument("--adaptive", default="true", choices=("true", "false"), help="adaptive attack on detector rows")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on N test images (0 = the whole test split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/compare_defenses", help="where the trained runs go")
    parser.add_argument("--results", default="docs/compare_defenses", help="where the table and plots go")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra option for every train run, e.g. width=16 (repeatable)")
    args = parser.parse_args(argv)

    from medrobust import cli
    from medrobust.evaluate import evaluate
    from medrobust.train import METHODS, train

    methods = cli.parse_names(args.methods, "methods", METHODS)
    if args.detector_for in ("all", "none"):
        with_detector = set(METHODS) if args.detector_for == "all" else set()
    else:
        with_detector = set(cli.parse_names(args.detector_for, "detector-for", METHODS))
    fractions = cli.parse_floats(args.fractions, "fractions")
    budgets = cli.parse_floats(args.eps, "eps")
    extra = {key: _value(value) for key, value in (option.split("=", 1) for option in args.train_option)}

    started, rows = time.time(), []
    for fraction in fractions:
        for method in methods:
            detector = method in with_detector
            run = Path(args.out) / f"{method}_frac{fraction:g}_ep{args.epochs}_seed{args.seed}"
            print(f"== {method} at label fraction {fraction:g}" + (" + UAD" if detector else ""), flush=True)
            metrics = train(data=args.data, method=method, label_fraction=fraction, epochs=args.epochs, out=str(run),
                            detector=str(detector).lower(), seed=args.seed, progress="false", **extra)
            adaptive = args.adaptive == "true" and detector
            eval_dir = run / (f"eval_{args.attack}_limit{args.limit}" + ("_adaptive" if adaptive else ""))
            report = _finished_report(eval_dir, budgets)
            if report is None:
                report = evaluate(str(run), attacks=args.attack, eps=",".join(f"{e:.8g}" for e in budgets),
                                  adaptive=str(adaptive).lower(), limit=args.limit or None, out=str(eval_dir),
                                  seed=args.seed, progress="false")
            rows.append(summarise(method, fraction, detector, metrics, report, args.attack))

    results = {
        "command": "python " + " ".join([sys.argv[0] if argv is None else "examples/compare_defenses.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
        "data_source": report["data_source"], "synthetic_data": report["synthetic_data"],
        "n_test_images": report["n_images"], "epochs": args.epochs, "seed": args.seed,
        "attack": args.attack, "eps": list(budgets), "train_options": extra, "machine": machine(),
        "date": datetime.date.today().isoformat(), "rows": rows,
        # Wall time of this invocation (small when every run was reused) and the measured work behind the table.
        "minutes_this_invocation": round((time.time() - started) / 60, 1),
        "compute_minutes": round(sum(r["train_seconds"] or 0 for r in rows) / 60
                                 + sum(r["detector_fit_seconds"] or 0 for r in rows) / 60
                                 + sum(r["evaluate_seconds"] or 0 for r in rows) / 60, 1),
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    from medrobust.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", results)
    plots = write_plots(results, out)
    atomic_write_text(out / "README.md", markdown(results, plots))
    print(markdown(results, plots))
    print(f"wrote {out}")


def _value(text: str):
    """A --train-option value as Python reads it (3 -> int, 0.5 -> float), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _finished_report(eval_dir: Path, budgets) -> dict | None:
    """A finished evaluation of the same budgets, so a rerun (e.g. after an interruption) skips it."""
    path = eval_dir / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if [round(e, 8) for e in report["eps"]] == [round(e, 8) for e in budgets] else None


def summarise(method: str, fraction: float, detector: bool, metrics: dict, report: dict, attack: str) -> dict:
    """One table row from a run's metrics.json and its evaluation report."""
    by_eps = report["attacks"][attack]
    row = {"method": method + (" + UAD" if detector else ""), "label_fraction": fraction,
           "clean_accuracy": report["clean_accuracy"], "macro_auroc": report.get("macro_auroc"),
           "urgent_referral": report.get("urgent_referral"), "train_seconds": metrics.get("train_seconds_last_session"),
           "detector_fit_seconds": metrics.get("detector_fit_seconds"), "evaluate_seconds": report.get("seconds"),
           "robust_accuracy": {k: e["robust_accuracy"] for k, e in by_eps.items()},
           "classifier_only_risk": {k: e["classifier_only_risk"] for k, e in by_eps.items()}}
    if detector:
        row["clean_false_referral_rate"] = report["detector"]["clean_false_referral_rate"]
        row["system_risk"] = {k: e["system_risk"] for k, e in by_eps.items()}
        row["detection_auroc"] = {k: e["detection_auroc"] for k, e in by_eps.items()}
        row["adaptive_system_risk"] = {k: (e.get("adaptive") or {}).get("system_risk") for k, e in by_eps.items()}
    return row


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from medrobust.io import package_versions

    return {"cpu": model, "cores": cores, "gpu": "none used", **package_versions()}


def _eps_label(key: str) -> str:
    k = float(key) * 255  # keys carry 6 significant digits: 4/255 reads back as 4.0000065
    return f"{key} ({k:.2g}/255)" if abs(k - round(k)) > 1e-4 else f"{round(k)}/255"


def _cell(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(results: dict, plots: list[str]) -> str:
    rows = results["rows"]
    keys = list(rows[0]["robust_accuracy"])
    attack = {"pgd": "PGD-20", "apgd": "APGD-CE-100"}.get(results["attack"], results["attack"])
    kind = ("SYNTHETIC OCT phantom (computer-generated images, not real scans)" if results["synthetic_data"]
            else results["data_source"])
    m = results["machine"]
    lines = [
        "# Which defence keeps the screening system safe? (" + ("SYNTHETIC" if results["synthetic_data"] else "measured") + ")",
        "",
        f"- **Command:** `{results['command']}` ({results['compute_minutes']} min of training and evaluation on "
        "this machine)",
        f"- **Data:** {kind}; {results['n_test_images']} test images.",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores, no GPU; TensorFlow {m['tensorflow']}, Keras {m['keras']}, "
        f"Python {m['python']}; {results['date']}.",
        f"- **Training:** {results['epochs']} epochs for every method (equal optimizer steps), small CNN, seed "
        f"{results['seed']}" + (f", options {results['train_options']}" if results["train_options"] else "") + ".",
        f"- **Attack:** {attack} L∞ with random start. ε is in [0, 1] pixel scale: the paper's own budgets "
        "(≤ 0.003) and then 1, 2, 4, 8/255.",
        "- **train s** is wall time on this shared machine, often with other jobs running: compare it loosely.",
        "",
        f"## Robust accuracy ({attack})",
        "",
        "| method | labels | clean | " + " | ".join(_eps_label(k) for k in keys) + " | train s |",
        "|---|---:|---:|" + "---:|" * len(keys) + "---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['label_fraction']:g} | {r['clean_accuracy']:.3f} | "
                     + " | ".join(_cell(r["robust_accuracy"][k]) for k in keys) + f" | {r['train_seconds'] or '–'} |")
    detector_rows = [r for r in rows if "system_risk" in r]
    if detector_rows:
        lines += [
            "", "## System adversarial risk",
            "",
            "Over test images the classifier gets right when clean: the share whose attacked version is misclassified "
            "and **not** flagged by the detector (a silent wrong diagnosis). *Classifier only* is the same without a "
            "detector; *adaptive* is an attacker who targets classifier and detector together (worst case per image "
            "over the trade-off weights). Lower is safer.",
            "",
            "| method | labels | clean false referrals | risk | " + " | ".join(_eps_label(k) for k in keys) + " |",
            "|---|---:|---:|---|" + "---:|" * len(keys),
        ]
        for r in detector_rows:
            for name, key in (("classifier only", "classifier_only_risk"), ("with UAD", "system_risk"),
                              ("with UAD, adaptive", "adaptive_system_risk"), ("detection AUROC", "detection_auroc")):
                lines.append(f"| {r['method']} | {r['label_fraction']:g} | {r['clean_false_referral_rate']:.3f} | "
                             f"{name} | " + " | ".join(_cell(r[key][k]) for k in keys) + " |")
    lines += ["", *[f"![{p}]({p})" for p in plots]]
    if results["synthetic_data"]:
        lines += ["", "SYNTHETIC data: these numbers show what the code measures; they are not evidence about real "
                  "OCT scans. Run the same command with `--data octmnist` where the download is possible."]
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medrobust.evaluation.plots import _save

    tag = "SYNTHETIC OCT phantom" if results["synthetic_data"] else results["data_source"]
    fractions = sorted({r["label_fraction"] for r in results["rows"]})
    written = []
    fig, axes = plt.subplots(1, len(fractions), figsize=(5.5 * len(fractions), 4.2), squeeze=False, sharey=True)
    for ax, fraction in zip(axes[0], fractions):
        for r in (r for r in results["rows"] if r["label_fraction"] == fraction):
            eps = [float(k) for k in r["robust_accuracy"]]
            ax.plot([0.0005, *eps], [r["clean_accuracy"], *r["robust_accuracy"].values()], marker="o", label=r["method"])
        ax.set(xscale="log", xlabel="ε (L∞, [0,1] scale; first point = clean)", ylabel="accuracy", ylim=(0, 1.02),
               title=f"Robust accuracy, {fraction:g} of labels\n({tag})")
        ax.legend(fontsize=8)
    written.append(_save(fig, out / "robust_accuracy.png"))

    detector_rows = [r for r in results["rows"] if "system_risk" in r]
    if detector_rows:
        fig, axes = plt.subplots(1, len(detector_rows), figsize=(5.5 * len(detector_rows), 4.2), squeeze=False, sharey=True)
        for ax, r in zip(axes[0], detector_rows):
            eps = [float(k) for k in r["system_risk"]]
            for name, key, style in (("classifier only", "classifier_only_risk", "-"), ("with UAD", "system_risk", "-"),
                                     ("with UAD, adaptive attacker", "adaptive_system_risk", "--")):
                values = [v if v is not None else float("nan") for v in r[key].values()]
                ax.plot(eps, values, ls=style, marker="o", label=name)
            ax.set(xscale="log", xlabel="ε (L∞, [0,1] scale)", ylabel="system adversarial risk", ylim=(0, 1.02),
                   title=f"{r['method']}, {r['label_fraction']:g} of labels\n({tag})")
            ax.legend(fontsize=8)
        written.append(_save(fig, out / "system_risk.png"))
    return written


if __name__ == "__main__":
    main()
