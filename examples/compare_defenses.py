"""The paper's experiment in one command: which defence keeps an OCT screening system safe?

    python examples/compare_defenses.py --data ../shared/data/kermany --image-size 64
        [--epochs auto] [--fractions 0.1,1.0] [--methods standard,pgd_at,trades,ssat,ssat_paper]
        [--seeds 0,1,2] [--split test|val] [--eps 0.001,0.002,1/255,2/255] [--attacks pgd,apgd] [--limit 0]
        [--out runs/compare_defenses] [--results docs/compare_defenses]

For each method and label fraction it runs `python -m medrobust.train` (same epochs, seed, model and
training recipe for every method; the SSAT rows also fit the UAD detector) and then
`python -m medrobust.evaluate` with the attacks over the budgets: the paper's own tiny ones (eps <= 0.003
on [0, 1] images) beside 1/255 and 2/255. Rows with the detector are also attacked adaptively
(classifier and detector together, worst case per image over the trade-off weights). ssat is the
train CLI's default (a standard teacher on the same labels, then SSAT's robust self-training form,
--attack free, at --train-eps auto = 0.008); ssat_paper is the paper's form (--ssat-loss ce --teacher
snapshot: lam * CE on FGSM adversaries of pseudo-labeled scans); ssat_pgd is the default recipe with
PGD-10 adversaries at 0.004 (the form measured before the cheap default); ssat_trades the robust self-training form with the snapshot teacher
and PGD-10. With --seeds every method trains and is evaluated once per seed (seed = data split, label
subset, initialisation, attacks' random starts), and the tables give mean +- sd over the seeds first.
With both standard and ssat at a fraction below 1, the standard row is the default's own standard teacher
(OUT/ssat_rst_.../teacher: the same labels, epochs and recipe), trained once and evaluated as its own row;
its training time is counted once in compute_minutes and still belongs to ssat's cost in the table.
--split val evaluates on the validation split (to choose a recipe without looking at test). It writes to
--results: README.md (tables per attack, per-class sensitivity, system risk; the command, data and
machine), results.json and two plots. Finished runs and evaluations under --out are reused, so an
interrupted comparison resumes.
On the phantom every figure is SYNTHETIC: it shows the code works, not how a model behaves on real OCT.

Ablations use --train-option, e.g. SSAT labelling itself (the paper's variant, no snapshot teacher):
    python examples/compare_defenses.py --methods ssat_paper --fractions 0.1 --detector-for none \
        --train-option teacher=none --out runs/ssat_selflabel --results docs/ssat_selflabel
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

DEFAULT_EPS = "0.001,0.002,1/255,2/255"
BASELINES = ("pgd_at", "trades", "mart")  # the rows --baseline-steps applies to
# Rows of the table that are not train.py methods: (method, extra train options).
VARIANTS = {"ssat_paper": ("ssat", {"ssat_loss": "ce", "teacher": "snapshot"}),
            "ssat_pgd": ("ssat", {"attack": "pgd"}),
            "ssat_trades": ("ssat", {"ssat_loss": "trades", "teacher": "snapshot", "attack": "pgd"})}
# Run folders under --out: the paper's form keeps the name "ssat" had when it was the default, so runs
# of earlier comparisons are reused; the default recipe gets a name of its own.
RUN_NAMES = {"ssat_paper": "ssat", "ssat": "ssat_rst"}
ATTACK_TITLES = {"pgd": "PGD-20", "apgd": "APGD-CE-100", "fgsm": "FGSM", "square": "Square-1000"}


def main(argv: list[str] | None = None) -> None:
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="phantom", help="phantom | octmnist | auto | PATH (as the train CLI)")
    parser.add_argument("--image-size", type=int, default=None, help="as the train CLI (default: its default)")
    parser.add_argument("--epochs", default="auto", help="auto (the train CLI's rule) or a number, same for every method")
    parser.add_argument("--fractions", default="0.1,1.0", help="label fractions every method trains at")
    parser.add_argument("--methods", default="standard,pgd_at,trades,ssat,ssat_paper",
                        help="standard, pgd_at, trades, ssat (the train CLI's default recipe), ssat_paper "
                             "(the paper's form), ssat_pgd, ssat_trades")
    parser.add_argument("--detector-for", default="ssat,ssat_paper,ssat_pgd,ssat_trades",
                        help="methods that also get the UAD detector (or all, none)")
    parser.add_argument("--eps", default=DEFAULT_EPS, help="L-inf test budgets in [0, 1] scale; k/255 allowed")
    parser.add_argument("--attacks", default="pgd,apgd", help="evaluate attacks (pgd = PGD-20, apgd = APGD-CE-100)")
    parser.add_argument("--adaptive", default="true", choices=("true", "false"), help="adaptive attack on detector rows")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on N test images (0 = the whole test split)")
    parser.add_argument("--seed", type=int, default=0, help="one seed (see --seeds)")
    parser.add_argument("--seeds", default=None, help="several seeds, e.g. 0,1,2: mean +- sd per method and fraction")
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="evaluate on the test split, or on val (to choose a recipe)")
    parser.add_argument("--out", default="runs/compare_defenses", help="where the trained runs go")
    parser.add_argument("--results", default="docs/compare_defenses", help="where the table and plots go")
    parser.add_argument("--baseline-steps", type=int, default=None, metavar="K",
                        help="inner PGD steps of the PGD-AT, TRADES and MART rows only (default: the train CLI's "
                             "--pgd-steps, 10); the cost of the comparison is mostly theirs (README)")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra option for every train run, e.g. width=16 (repeatable)")
    args = parser.parse_args(argv)

    from medrobust import cli
    from medrobust.evaluation.suite import ATTACK_NAMES
    from medrobust.train import METHODS

    names = (*METHODS, *VARIANTS)
    methods = cli.parse_names(args.methods, "methods", names)
    if args.detector_for in ("all", "none"):
        with_detector = set(names) if args.detector_for == "all" else set()
    else:
        with_detector = set(cli.parse_names(args.detector_for, "detector-for", names))
    seeds = [args.seed] if args.seeds is None else [cli.parse_int(s, "seeds") for s in args.seeds.split(",")]
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise cli.UsageError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    fractions = cli.parse_floats(args.fractions, "fractions")
    if any(not 0 < f <= 1 for f in fractions):
        raise cli.UsageError(f"--fractions must be in (0, 1], got {fractions}")
    budgets = cli.parse_floats(args.eps, "eps")
    if any(not 0 < e <= 1 for e in budgets):
        raise cli.UsageError(f"--eps values must be in (0, 1], got {budgets}")
    attacks = cli.parse_names(args.attacks, "attacks", ATTACK_NAMES)
    epochs = "auto" if str(args.epochs).strip().lower() == "auto" else cli.parse_int(args.epochs, "epochs")
    extra = {key: _value(value) for key, value in (option.split("=", 1) for option in args.train_option)}
    if args.image_size is not None:
        extra["image_size"] = args.image_size
    if args.baseline_steps is not None and args.baseline_steps < 1:
        raise cli.UsageError(f"--baseline-steps must be >= 1, got {args.baseline_steps}")
    baseline = {} if args.baseline_steps is None else {"pgd_steps": args.baseline_steps}

    cli.import_tensorflow()  # after the options are checked; without TensorFlow's CPU start-up noise (cuInit)
    from medrobust.evaluate import evaluate
    from medrobust.train import TEACHER_FOLDER, TEACHER_SHARED, train

    # The default (ssat) trains a standard teacher on the same labels, epochs and recipe as the standard row:
    # the standard row *is* that run (OUT/ssat_rst_.../teacher), trained once and evaluated as its own row.
    share_teacher = "standard" in methods and "ssat" in methods and set(extra) <= set(TEACHER_SHARED)

    started, rows, load_before = time.time(), [], os.getloadavg()
    for fraction in fractions:
        for name in methods:
            method, variant_options = VARIANTS.get(name, (name, {}))
            if method in BASELINES:
                variant_options = {**variant_options, **baseline}
            if name in ("ssat_trades", "ssat_pgd") and fraction >= 1.0 and "ssat" in methods:
                print(f"== {name} at label fraction 1: no unlabeled scans, no teacher, the same as ssat's pool-free "
                      "form up to its attack; skipped")
                continue
            detector = name in with_detector
            for seed in seeds:
                run = Path(args.out) / run_name(name, fraction, epochs, seed)
                if name == "standard" and share_teacher and fraction < 1:
                    run = Path(args.out) / run_name("ssat", fraction, epochs, seed) / TEACHER_FOLDER
                print(f"== {name} at label fraction {fraction:g}, seed {seed}" + (" + UAD" if detector else ""),
                      flush=True)
                metrics = train(data=args.data, method=method, label_fraction=fraction, epochs=epochs, out=str(run),
                                detector=str(detector).lower(), seed=seed, progress="false",
                                **{**variant_options, **extra})  # a --train-option overrides the row's own
                adaptive = args.adaptive == "true" and detector
                eval_dir = run / (f"eval_{'+'.join(attacks)}_limit{args.limit}" + ("_adaptive" if adaptive else "")
                                  + ("" if args.split == "test" else f"_{args.split}"))
                report = _finished_report(eval_dir, budgets, attacks)
                if report is None:
                    report = evaluate(str(run), split=args.split, attacks=",".join(attacks),
                                      eps=",".join(f"{e:.8g}" for e in budgets), adaptive=str(adaptive).lower(),
                                      limit=args.limit or None, out=str(eval_dir), seed=seed, progress="false")
                else:
                    print(f"   evaluation already complete in {eval_dir}")
                config = json.loads((run / "config.json").read_text())
                rows.append({**summarise(name, fraction, detector, metrics, report, attacks, config), "seed": seed,
                             "run": str(run)})

    results = {
        "command": "python " + " ".join([sys.argv[0] if argv is None else "examples/compare_defenses.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
        "data_source": report["data_source"], "synthetic_data": report["synthetic_data"],
        "n_test_images": report["n_images"], "split": args.split, "epochs": epochs, "seed": seeds[0], "seeds": seeds,
        "attacks": attacks, "eps": list(budgets), "train_options": extra, "machine": machine(),
        "baseline_steps": args.baseline_steps,  # None: the train CLI's --pgd-steps (10)
        "load_average": {"start": [round(v, 1) for v in load_before], "end": [round(v, 1) for v in os.getloadavg()]},
        "date": datetime.date.today().isoformat(), "rows": rows, "summary": summary_rows(rows),
        # Wall time of this invocation (small when every run was reused) and the measured work behind the table.
        "minutes_this_invocation": round((time.time() - started) / 60, 1),
        "compute_minutes": round(sum((r["train_seconds"] or 0) + _unshared_teacher_seconds(r, rows) for r in rows) / 60
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


def run_name(name: str, fraction: float, epochs, seed: int) -> str:
    return f"{RUN_NAMES.get(name, name)}_frac{fraction:g}_ep{epochs}_seed{seed}"


def _unshared_teacher_seconds(row: dict, rows: list[dict]) -> float:
    """A row's teacher training time, unless that teacher run is itself a row (counted there once)."""
    teacher = row.get("teacher_path")
    if teacher and any(r.get("run") and Path(r["run"]).resolve() == Path(teacher).resolve().parent for r in rows):
        return 0.0
    return row.get("teacher_train_seconds") or 0.0


def _value(text: str):
    """A --train-option value as Python reads it (3 -> int, 0.5 -> float), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _finished_report(eval_dir: Path, budgets, attacks) -> dict | None:
    """A finished evaluation of the same budgets and attacks, so a rerun (e.g. after an interruption) skips it."""
    path = eval_dir / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    same_eps = [round(e, 8) for e in report["eps"]] == [round(e, 8) for e in budgets]
    return report if same_eps and set(attacks) <= set(report["attacks"]) and report.get("complete", True) else None


def summarise(name: str, fraction: float, detector: bool, metrics: dict, report: dict, attacks, config: dict) -> dict:
    """One table row from a run's metrics.json, config.json and its evaluation report: per attack, and the
    strongest single attack at each budget (lowest robust accuracy, highest risks)."""
    row = {"method": name + (" + UAD" if detector else ""), "label_fraction": fraction,
           "arch": config.get("arch"), "epochs": config.get("epochs_resolved") or config.get("epochs"),
           "clean_accuracy": report["clean_accuracy"], "macro_auroc": report.get("macro_auroc"),
           "clean_balanced_accuracy": report.get("clean_balanced_accuracy"),
           # the run's referral threshold (chosen on val), clean: disease-vs-NORMAL sensitivity / specificity
           "referral": _referral_point(report.get("referral")),
           "sensitivity": {c: v["sensitivity"] for c, v in report["per_class"].items()},
           "urgent_referral": report.get("urgent_referral"), "train_seconds": metrics.get("train_seconds_last_session"),
           "detector_fit_seconds": metrics.get("detector_fit_seconds"), "evaluate_seconds": report.get("seconds"),
           # --teacher standard: the teacher run's training (OUT/teacher) is part of the method's cost.
           "teacher_train_seconds": ((config.get("teacher_run") or {}).get("metrics") or {}).get(
               "train_seconds_last_session"),
           "teacher_path": (config.get("teacher_run") or {}).get("path"),
           "attacks": {}}
    keys = ["robust_accuracy", "balanced_robust_accuracy", "robust_sensitivity", "classifier_only_risk"]
    if detector:
        keys += ["system_risk", "detection_auroc", "tpr_at_fpr", "adaptive_system_risk"]
        row["clean_false_referral_rate"] = report["detector"]["clean_false_referral_rate"]
    for attack in attacks:
        by_eps = report["attacks"][attack]
        per = {}
        for key in keys:
            if key == "adaptive_system_risk":
                per[key] = {k: (e.get("adaptive") or {}).get("system_risk") for k, e in by_eps.items()}
            else:
                per[key] = {k: e.get(key) for k, e in by_eps.items()}
        row["attacks"][attack] = per
    eps_keys = list(report["attacks"][attacks[0]])

    def strongest(key, pick):
        values = {}
        for k in eps_keys:
            got = [row["attacks"][a][key][k] for a in attacks if row["attacks"][a][key].get(k) is not None]
            values[k] = pick(got) if got else None
        return values

    row["robust_accuracy"] = strongest("robust_accuracy", min)
    row["balanced_robust_accuracy"] = strongest("balanced_robust_accuracy", min)
    row["classifier_only_risk"] = strongest("classifier_only_risk", max)
    if detector:
        row["system_risk"] = strongest("system_risk", max)
        row["adaptive_system_risk"] = strongest("adaptive_system_risk", max)
        row["detection_auroc"] = strongest("detection_auroc", min)
    return row


def _referral_point(referral: dict | None) -> dict | None:
    """{sensitivity, specificity} at the run's operating point (else the arg-max decision), or None."""
    if not referral:
        return None
    point = referral.get("operating_point") or referral.get("argmax") or {}
    return {"sensitivity": point.get("sensitivity"), "specificity": point.get("specificity"),
            "at": "threshold" if referral.get("operating_point") else "argmax"}


SUMMARY_KEYS = ("robust_accuracy", "balanced_robust_accuracy", "classifier_only_risk", "system_risk", "adaptive_system_risk", "detection_auroc")


def mean_sd(values) -> dict | None:
    """{mean, sd (sample, 0 for one value), n} of the values that are not None; None if there are none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per method and label fraction, mean +- sd over its seeds' rows: clean accuracy, per-class sensitivity
    (clean, and under the strongest attack at the largest budget), the strongest attack's robust accuracy
    and risks at each budget, clean false referrals, training seconds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["label_fraction"]), []).append(r)
    out = []
    for (method, fraction), group in groups.items():
        first = group[0]
        top = list(first["robust_accuracy"])[-1]
        attacks = list(first["attacks"])

        def under_attack(r, c):
            got = [(r["attacks"][a]["robust_sensitivity"][top] or {}).get(c) for a in attacks]
            got = [v for v in got if v is not None]
            return min(got) if got else None

        summary = {"method": method, "label_fraction": fraction, "seeds": [r.get("seed") for r in group],
                   "clean_accuracy": mean_sd(r["clean_accuracy"] for r in group),
                   "clean_balanced_accuracy": mean_sd(r.get("clean_balanced_accuracy") for r in group),
                   "referral_sensitivity": mean_sd((r.get("referral") or {}).get("sensitivity") for r in group),
                   "referral_specificity": mean_sd((r.get("referral") or {}).get("specificity") for r in group),
                   "sensitivity": {c: mean_sd(r["sensitivity"][c] for r in group) for c in first["sensitivity"]},
                   "robust_sensitivity_top": {c: mean_sd(under_attack(r, c) for r in group)
                                              for c in first["sensitivity"]},
                   "train_seconds": mean_sd((r["train_seconds"] or 0) + (r.get("teacher_train_seconds") or 0)
                                            for r in group)}
        for key in SUMMARY_KEYS:
            if key in first:
                summary[key] = {k: mean_sd(r[key][k] for r in group) for k in first[key]}
        if "clean_false_referral_rate" in first:
            summary["clean_false_referral_rate"] = mean_sd(r["clean_false_referral_rate"] for r in group)
        out.append(summary)
    return out


def _pm(stat, digits: int = 3) -> str:
    return "–" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def summary_markdown(results: dict) -> list[str]:
    """The mean +- sd tables (only when there is more than one seed)."""
    summary = results["summary"]
    keys = list(summary[0]["robust_accuracy"])
    top = keys[-1]
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [f"## Mean ± sd over seeds {seeds} (strongest attack)", "",
             f"Each row: {len(results['seeds'])} runs that differ in seed (labeled subset, initialisation, shuffling, "
             "attack starts); sd is the sample standard deviation over the runs.", "",
             "| method | labels | clean | clean balanced | " + " | ".join(_eps_label(k) for k in keys) + " | "
             + " | ".join(f"balanced {_eps_label(k)}" for k in keys) + " | "
             + " | ".join(f"adaptive risk {_eps_label(k)}" for k in keys)
             + " | referral sensitivity / specificity | train s |",
             "|---|---:|---:|---:|" + "---:|" * (3 * len(keys)) + "---|---:|"]
    for s in summary:
        risk = s.get("adaptive_system_risk") or {}
        balanced = s.get("balanced_robust_accuracy") or {}
        lines.append(f"| {s['method']} | {s['label_fraction']:g} | {_pm(s['clean_accuracy'])} | "
                     f"{_pm(s.get('clean_balanced_accuracy'))} | "
                     + " | ".join(_pm(s["robust_accuracy"][k]) for k in keys) + " | "
                     + " | ".join(_pm(balanced.get(k)) for k in keys) + " | "
                     + " | ".join(_pm(risk.get(k)) for k in keys)
                     + f" | {_pm(s.get('referral_sensitivity'))} / {_pm(s.get('referral_specificity'))}"
                     + f" | {_pm(s['train_seconds'], 0)} |")
    classes = list(summary[0]["sensitivity"])
    lines += ["", f"### Per-class sensitivity, mean ± sd (clean; under the strongest attack at {_eps_label(top)})", "",
              "| method | labels | " + " | ".join(f"{c} clean" for c in classes) + " | "
              + " | ".join(f"{c} attacked" for c in classes) + " |",
              "|---|---:|" + "---:|" * (2 * len(classes))]
    for s in summary:
        lines.append(f"| {s['method']} | {s['label_fraction']:g} | "
                     + " | ".join(_pm(s["sensitivity"][c]) for c in classes) + " | "
                     + " | ".join(_pm(s["robust_sensitivity_top"][c]) for c in classes) + " |")
    return lines + ["", "## Per seed", ""]


def _label(r: dict, results: dict) -> str:
    return r["method"] + (f" (seed {r['seed']})" if len(results.get("seeds") or [0]) > 1 else "")


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


def _attack_title(name: str) -> str:
    return ATTACK_TITLES.get(name, name)


def markdown(results: dict, plots: list[str]) -> str:
    rows = results["rows"]
    keys = list(rows[0]["robust_accuracy"])
    attacks = results["attacks"]
    kind = ("SYNTHETIC OCT phantom (computer-generated images, not real scans)" if results["synthetic_data"]
            else f"real scans, `{results['data_source']}`")
    m = results["machine"]
    archs = sorted({str(r["arch"]) for r in rows})
    epochs = sorted({str(r["epochs"]) for r in rows})
    load = results.get("load_average") or {}
    lines = [
        "# Which defence keeps the screening system safe? (" + ("SYNTHETIC" if results["synthetic_data"] else "measured on real scans") + ")",
        "",
        f"- **Command:** `{results['command']}` ({results['compute_minutes']} min of training and evaluation on "
        "this machine)",
        f"- **Data:** {kind}; {results['n_test_images']} {results.get('split', 'test')} images"
        + (" (validation split: for choosing, not for reporting)" if results.get("split") == "val" else "") + ".",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores, no GPU; TensorFlow {m['tensorflow']}, Keras {m['keras']}, "
        f"Python {m['python']}; {results['date']}"
        + (f"; load average {load['start'][0]} at the start, {load['end'][0]} at the end" if load else "") + ".",
        f"- **Training:** {', '.join(epochs)} epochs for every method (`--epochs {results['epochs']}`; equal optimizer "
        f"steps), {', '.join(archs)}, the train CLI's recipe, seed{'s' if len(results.get('seeds') or [0]) > 1 else ''} "
        f"{', '.join(str(x) for x in results.get('seeds') or [results['seed']])}"
        + (f", options {results['train_options']}" if results["train_options"] else "")
        + (f"; PGD-AT / TRADES / MART train with PGD-{results['baseline_steps']} inner steps"
           if results.get("baseline_steps") else "") + ".",
        f"- **Attacks:** {', '.join(_attack_title(a) for a in attacks)}, L∞ with random start. ε is in [0, 1] pixel "
        "scale: the paper's own budgets (≤ 0.003) and then 1/255, 2/255. *Strongest* = the lowest robust accuracy "
        "(highest risk) of the single attacks at each ε.",
        "- **train s** is wall time on this machine, often with other jobs running: compare it loosely.",
        "",
        *(summary_markdown(results) if len(results.get("seeds") or [0]) > 1 else []),
        "## Robust accuracy (strongest attack)",
        "",
        "Balanced = mean of the per-class sensitivities (each class counts the same, the rare ones included).",
        "",
        "| method | labels | clean | clean balanced | " + " | ".join(_eps_label(k) for k in keys) + " | "
        + " | ".join(f"balanced {_eps_label(k)}" for k in keys) + " | train s |",
        "|---|---:|---:|---:|" + "---:|" * (2 * len(keys)) + "---:|",
    ]
    for r in rows:
        balanced = r.get("balanced_robust_accuracy") or {}
        lines.append(f"| {_label(r, results)} | {r['label_fraction']:g} | {r['clean_accuracy']:.3f} | "
                     f"{_cell(r.get('clean_balanced_accuracy'))} | "
                     + " | ".join(_cell(r["robust_accuracy"][k]) for k in keys) + " | "
                     + " | ".join(_cell(balanced.get(k)) for k in keys) + f" | {r['train_seconds'] or '–'} |")
    if len(attacks) > 1:
        for attack in attacks:
            lines += ["", f"### Robust accuracy, {_attack_title(attack)}", "",
                      "| method | labels | " + " | ".join(_eps_label(k) for k in keys) + " |",
                      "|---|---:|" + "---:|" * len(keys)]
            for r in rows:
                lines.append(f"| {_label(r, results)} | {r['label_fraction']:g} | "
                             + " | ".join(_cell(r["attacks"][attack]["robust_accuracy"][k]) for k in keys) + " |")
    classes = list(rows[0]["sensitivity"])
    top = keys[-1]
    lines += ["", "## Per-class sensitivity", "",
              f"Clean, and under attack at the largest budget ({_eps_label(top)}; per attack, the share of each "
              "class's scans still diagnosed correctly). DRUSEN and DME are the rare classes.", "",
              "| method | labels | " + " | ".join(f"{c} clean" for c in classes) + " | "
              + " | ".join(f"{c} {_attack_title(a)}" for a in attacks for c in classes) + " |",
              "|---|---:|" + "---:|" * (len(classes) * (1 + len(attacks)))]
    for r in rows:
        under = [r["attacks"][a]["robust_sensitivity"][top] or {} for a in attacks]
        lines.append(f"| {_label(r, results)} | {r['label_fraction']:g} | "
                     + " | ".join(_cell(r["sensitivity"][c]) for c in classes) + " | "
                     + " | ".join(_cell(u.get(c)) for u in under for c in classes) + " |")
    detector_rows = [r for r in rows if "system_risk" in r]
    if detector_rows:
        lines += [
            "", "## System adversarial risk",
            "",
            "Over test images the classifier gets right when clean: the share whose attacked version is misclassified "
            "and **not** flagged by the detector (a silent wrong diagnosis). *Classifier only* is the same without a "
            "detector; *adaptive* is an attacker who targets classifier and detector together (worst case per image "
            "over the trade-off weights). Lower is safer. Detection AUROC: clean test scans vs successful adversaries.",
            "",
            "| method | labels | clean false referrals | attack | risk | " + " | ".join(_eps_label(k) for k in keys) + " |",
            "|---|---:|---:|---|---|" + "---:|" * len(keys),
        ]
        for r in detector_rows:
            for attack in attacks:
                per = r["attacks"][attack]
                for name, key in (("classifier only", "classifier_only_risk"), ("with UAD", "system_risk"),
                                  ("with UAD, adaptive", "adaptive_system_risk"), ("detection AUROC", "detection_auroc")):
                    lines.append(f"| {_label(r, results)} | {r['label_fraction']:g} | {r['clean_false_referral_rate']:.3f} | "
                                 f"{_attack_title(attack)} | {name} | " + " | ".join(_cell(per[key][k]) for k in keys) + " |")
    lines += ["", *[f"![{p}]({p})" for p in plots]]
    if results["synthetic_data"]:
        lines += ["", "SYNTHETIC data: these numbers show what the code measures; they are not evidence about real "
                  "OCT scans. Run the same command with `--data octmnist` or a folder of real scans."]
    else:
        lines += ["", f"{results['n_test_images']} {results.get('split', 'test')} scans: a difference of a few points between two rows is within "
                  "the sampling error (each evaluation's report.md gives 95% Wilson intervals)."]
    return "\n".join(lines) + "\n"


def _plot_rows(results: dict) -> list[dict]:
    """The per-seed rows, or with several seeds the means (method, fraction, clean and per-budget values)."""
    if len(results.get("seeds") or [0]) <= 1:
        return results["rows"]

    def means(stats):
        return {k: None if v is None else v["mean"] for k, v in stats.items()}

    return [{"method": s["method"] + " (mean)", "label_fraction": s["label_fraction"],
             "clean_accuracy": s["clean_accuracy"]["mean"],
             **{key: means(s[key]) for key in SUMMARY_KEYS if key in s}} for s in results["summary"]]


def write_plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medrobust.evaluation.plots import _save

    tag = "SYNTHETIC OCT phantom" if results["synthetic_data"] else results["data_source"]
    rows = _plot_rows(results)
    fractions = sorted({r["label_fraction"] for r in rows})
    written = []
    fig, axes = plt.subplots(1, len(fractions), figsize=(5.5 * len(fractions), 4.2), squeeze=False, sharey=True)
    for ax, fraction in zip(axes[0], fractions):
        for r in (r for r in rows if r["label_fraction"] == fraction):
            eps = [float(k) for k in r["robust_accuracy"]]
            ax.plot([0.0005, *eps], [r["clean_accuracy"], *r["robust_accuracy"].values()], marker="o", label=r["method"])
        ax.set(xscale="log", xlabel="ε (L∞, [0,1] scale; first point = clean)", ylabel="accuracy (strongest attack)",
               ylim=(0, 1.02), title=f"Robust accuracy, {fraction:g} of labels\n({tag})")
        ax.legend(fontsize=8)
    written.append(_save(fig, out / "robust_accuracy.png"))

    detector_rows = [r for r in rows if "system_risk" in r]
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
    from medrobust.cli import run_script

    run_script(main)
