"""report.md: the evaluation's tables for a clinician-engineer."""

from __future__ import annotations

from medrobust.classes import CLASSES

RISK_DEFINITION = (
    "**System risk** = over test images classified correctly when clean, the fraction whose attacked version is "
    "misclassified **and** not flagged by the detector (a silent wrong diagnosis). **Classifier-only risk** ignores "
    "the detector. **Adaptive** = PGD/APGD on a joint objective that also pushes the detector score under its "
    "threshold, worst case per image over the weight sweep. Detection AUROC and TPR are over successful "
    "adversaries vs all clean test images; TPR is at the detector's calibrated threshold.")


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"# medrobust evaluation: `{report['run']}`", ""]
    if report["synthetic_data"]:
        lines += ["> **SYNTHETIC data**: these figures come from the built-in OCT phantom, not real scans.", ""]
    lines += [f"Data: {report['data_source']}, {report['n_images']} test images. "
              f"Budgets are L-inf in [0, 1] pixel scale (0.004 ≈ 1/255).", ""]
    lines += ["## Clean performance", "", "| metric | value |", "|---|---|",
              f"| accuracy | {_f(report['clean_accuracy'])} |", f"| macro AUROC | {_f(report['macro_auroc'])} |",
              f"| urgent referral (CNV+DME) sensitivity | {_f(report['urgent_referral']['sensitivity'])} |",
              f"| urgent referral (CNV+DME) specificity | {_f(report['urgent_referral']['specificity'])} |"]
    if report.get("detector"):
        d = report["detector"]
        lines += [f"| detector clean false-referral rate | {_f(d['clean_false_referral_rate'])} |",
                  f"| detector threshold | {_f(d['threshold'], 4)} |"]
    lines += ["", "| class | sensitivity | specificity | support |", "|---|---|---|---|"]
    lines += [f"| {c} | {_f(report['per_class'][c]['sensitivity'])} | {_f(report['per_class'][c]['specificity'])} "
              f"| {report['per_class'][c]['support']} |" for c in CLASSES]
    lines += ["", "## Under attack", "", RISK_DEFINITION, ""]
    for name, by_eps in report["attacks"].items():
        lines += [f"### {name}", "",
                  "| ε | robust acc. | attack success | det. AUROC | TPR at threshold | system risk | "
                  "classifier-only risk | adaptive system risk | adaptive det. AUROC |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for eps, e in by_eps.items():
            a = e.get("adaptive") or {}
            lines.append(f"| {eps} | {_f(e['robust_accuracy'])} | {_f(e['attack_success_rate'])} | "
                         f"{_f(e['detection_auroc'])} | {_f(e['tpr_at_fpr'])} | {_f(e['system_risk'])} | "
                         f"{_f(e['classifier_only_risk'])} | {_f(a.get('system_risk'))} | "
                         f"{_f(a.get('detection_auroc'))} |")
        lines.append("")
    parts = _parts_table(report)
    if parts:
        lines += ["## Which detector part catches what (detection AUROC per score part)", ""] + parts + [""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report.get("plots", [])] + [""]
    return "\n".join(lines)


def _parts_table(report: dict) -> list[str]:
    rows, names = [], None
    for attack, by_eps in report["attacks"].items():
        for eps, e in by_eps.items():
            parts = e.get("detection_auroc_parts")
            if not parts:
                continue
            names = names or list(parts)
            rows.append(f"| {attack} | {eps} | " + " | ".join(_f(parts.get(n)) for n in names) + " |")
    if not rows:
        return []
    return ["| attack | ε | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)] + rows
