"""report.md: the evaluation's tables for a clinician-engineer, saying what was run on what."""

from __future__ import annotations

from medrobust.classes import CLASSES
from medrobust.evaluation.metrics import SMALL_SAMPLE

RISK_DEFINITION = (
    "**System risk** = over test images classified correctly when clean, the fraction whose attacked version is "
    "misclassified **and** not flagged by the detector (a silent wrong diagnosis). **Classifier-only risk** ignores "
    "the detector. **Adaptive** = PGD/APGD on a joint objective that also pushes the detector score under its "
    "threshold, run on the images the plain attack fooled but the detector caught, for each weight in the sweep; "
    "an image counts if any weight hides it. Detection AUROC and TPR are over successful "
    "adversaries vs all clean test images; TPR is at the detector's calibrated threshold.")
NORM_TITLES = {"linf": "L-inf budgets (ε: largest change of any pixel, [0, 1] pixel scale; 0.004 ≈ 1/255)",
               "l2": "L2 budgets (ε: Euclidean length of the whole perturbation, [0, 1] pixel units)"}


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(value, ci, digits=3) -> str:
    """0.812 (0.771–0.848): a proportion and its 95% Wilson interval."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + (f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


def markdown(report: dict) -> str:
    lines = [f"# medrobust evaluation: `{report['run']}`", ""]
    if not report.get("complete", True):
        lines += ["> **INCOMPLETE**: the evaluation was interrupted or is still running; rerun the same command "
                  "to finish it. The tables hold the (attack, ε) pairs finished so far.", ""]
    if report["synthetic_data"]:
        lines += ["> **SYNTHETIC data**: these figures come from the built-in OCT phantom, not real scans.", ""]
    for warning in report.get("warnings", []):
        lines += [f"> **Warning**: {warning}", ""]
    lines += _what_was_run(report)
    lines += ["Every proportion is given with its 95% Wilson confidence interval (in parentheses).", ""]
    lines += ["## Clean performance", "", "| metric | value |", "|---|---|",
              f"| accuracy | {_ci(report['clean_accuracy'], report.get('clean_accuracy_ci95'))} |",
              f"| macro AUROC | {_f(report['macro_auroc'])} |"]
    urgent = report["urgent_referral"]
    for metric in ("sensitivity", "specificity"):
        lines.append(f"| urgent referral (CNV+DME) {metric} | "
                     f"{_ci(urgent[metric], (urgent.get('ci95') or {}).get(metric))} |")
    if report.get("detector"):
        d = report["detector"]
        lines += [f"| detector clean false-referral rate | "
                  f"{_ci(d['clean_false_referral_rate'], d.get('clean_false_referral_rate_ci95'))} |",
                  f"| detector threshold | {_f(d['threshold'], 4)} |"]
    if report.get("clean_balanced_accuracy") is not None:
        lines.append(f"| balanced accuracy (mean per-class sensitivity) | {_f(report['clean_balanced_accuracy'])} |")
    lines += ["", "| class | sensitivity | specificity | support |", "|---|---|---|---|"]
    for c in CLASSES:
        pc = report["per_class"][c]
        ci = pc.get("ci95") or {}
        lines.append(f"| {c} | {_ci(pc['sensitivity'], ci.get('sensitivity'))} | "
                     f"{_ci(pc['specificity'], ci.get('specificity'))} | {pc['support']} |")
    lines += _referral_section(report)
    lines += ["", "## Under attack", "", RISK_DEFINITION, ""]
    norms = report.get("norms", {})
    for norm in ("linf", "l2"):
        names = [a for a in report["attacks"] if norms.get(a, "linf") == norm]
        if not names:
            continue
        lines += [f"### {NORM_TITLES[norm]}", ""]
        for name in names:
            lines += _attack_table(report, name, norm)
            lines += _class_table(report, name)
    lines += _min_norm_section(report)
    parts = _parts_table(report)
    if parts:
        lines += ["## Which detector part catches what (detection AUROC per score part)", ""] + parts + [""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report.get("plots", [])] + [""]
    return "\n".join(lines)


def _what_was_run(report: dict) -> list[str]:
    rc = report.get("run_config") or {}
    data = report.get("data") or {}
    model = (f"{rc.get('arch', '?')}" + (f" (width {rc['width']})" if rc.get("width") else "")
             + f", {rc.get('image_size', '?')}×{rc.get('image_size', '?')} px")
    training = (f"method `{rc.get('method', '?')}`, {rc.get('epochs_resolved') or rc.get('epochs', '?')} epochs, label fraction "
                f"{rc.get('label_fraction', '?')}, seed {rc.get('seed', '?')}, on `{rc.get('data_source', '?')}`")
    split = ("the **whole folder** (every image in its class folders)" if data.get("whole_folder")
             else f"the {data.get('split', 'test')} split")
    evaluated = f"`{report['data_source']}`, {split}: **{report['n_images']} images**"
    if data.get("limit"):
        evaluated += f" (the first {data['limit']} of a fixed shuffle, --limit)"
    overlap = data.get("training_overlap") or {}
    if overlap.get("images"):
        evaluated += (f"; **{overlap['images']} of them come from the run's training split** ({overlap['identical_images']} "
                      f"identical images, {overlap['training_patients']} training patients): optimistic")
    skipped = data.get("skipped") or []
    if skipped:
        evaluated += f"; {len(skipped)} unreadable files skipped (listed in report.json)"
    lines = ["## What was run", "", "| | |", "|---|---|", f"| model | {model} |", f"| training | {training} |",
             f"| evaluated on | {evaluated} |"]
    if report.get("detector"):
        lines.append(f"| detector | UAD, threshold {report['detector']['threshold']:.4f} "
                     f"(calibrated on clean validation scans) |")
    for name, info in (report.get("attack_settings") or {}).items():
        budgets = ", ".join(f"{e:g}" for e in info.get("budgets", []))
        lines.append(f"| {name} | {info['description']}; {'L2' if info['norm'] == 'l2' else 'L-inf'} budgets {budgets} |")
    if report.get("adaptive") and report.get("detector"):
        weights = ", ".join(f"{w:g}" for w in (report.get("settings") or {}).get("weights", []))
        lines.append(f"| adaptive | PGD/APGD on classifier + detector, detector weights {weights} |")
    if report.get("seconds") is not None:
        lines.append(f"| compute time | {report['seconds']:.0f} s |")
    lines.append(f"| command | `{report.get('command', '')}` |")
    return lines + [""]


def _attack_table(report: dict, name: str, norm: str) -> list[str]:
    by_eps = report["attacks"][name]
    size = "max L2" if norm == "l2" else "max L-inf"
    lines = [f"#### {name}", "",
             "| ε | robust acc. | attack success | det. AUROC | TPR at threshold | system risk | "
             f"classifier-only risk | adaptive system risk | adaptive det. AUROC | {size} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for eps, e in by_eps.items():
        a = e.get("adaptive") or {}
        ci = e.get("ci95") or {}
        lines.append(f"| {eps} | {_ci(e['robust_accuracy'], ci.get('robust_accuracy'))} | "
                     f"{_ci(e['attack_success_rate'], ci.get('attack_success_rate'))} | {_f(e['detection_auroc'])} | "
                     f"{_ci(e['tpr_at_fpr'], ci.get('tpr_at_fpr'))} | {_ci(e['system_risk'], ci.get('system_risk'))} | "
                     f"{_ci(e['classifier_only_risk'], ci.get('classifier_only_risk'))} | "
                     f"{_ci(a.get('system_risk'), a.get('system_risk_ci95'))} | {_f(a.get('detection_auroc'))} | "
                     f"{_f(e.get('max_l2' if norm == 'l2' else 'max_linf'), 4)} |")
    return lines + [""]


def _referral_section(report: dict) -> list[str]:
    """Disease (CNV, DME, DRUSEN) vs NORMAL referral, clean: at the arg-max decision and at the run's
    operating point (threshold on 1 - P(NORMAL) chosen on val for a target sensitivity)."""
    referral = report.get("referral")
    if not referral:
        return []
    point = report.get("referral_point")
    lines = ["", "## Referral (disease vs NORMAL)", "",
             "A scan is referred when it is judged diseased (CNV, DME or DRUSEN). "
             + (f"The run's operating point refers when 1 - P(NORMAL) >= {point['threshold']:.4f}, the threshold "
                f"chosen on the validation split for sensitivity >= {point['target_sensitivity']:g}; "
                "the arg-max row refers when the predicted class is not NORMAL." if point else
                "This run carries no operating point (trained before it existed): arg-max decision only."),
             "", "| decision | sensitivity | specificity | referred | diseased / normal scans |", "|---|---|---|---|---|"]
    for key, label in (("argmax", "arg-max class"), ("operating_point", "operating point")):
        r = referral.get(key)
        if r:
            ci = r.get("ci95") or {}
            lines.append(f"| {label} | {_ci(r['sensitivity'], ci.get('sensitivity'))} | "
                         f"{_ci(r['specificity'], ci.get('specificity'))} | {r['referred']} | "
                         f"{r['n_disease']} / {r['n_normal']} |")
    return lines


def _class_table(report: dict, name: str) -> list[str]:
    """Per-class robust sensitivity and the balanced robust accuracy beside the average, and the referral
    sensitivity of attacked diseased scans (still referred at the operating point, else at arg-max)."""
    by_eps = report["attacks"][name]
    if not any(e.get("robust_sensitivity") for e in by_eps.values()):
        return []
    lines = [f"Per class under {name} (share of each class's scans still diagnosed correctly; balanced = their mean):", "",
             "| ε | robust acc. | balanced robust acc. | " + " | ".join(CLASSES) + " | referral sensitivity |",
             "|---|---|---|" + "---|" * len(CLASSES) + "---|"]
    for eps, e in by_eps.items():
        rs = e.get("robust_sensitivity") or {}
        ref = e.get("referral") or {}
        point = ref.get("operating_point") or ref.get("argmax") or {}
        lines.append(f"| {eps} | {_f(e['robust_accuracy'])} | {_f(e.get('balanced_robust_accuracy'))} | "
                     + " | ".join(_f(rs.get(c)) for c in CLASSES) + f" | {_f(point.get('sensitivity'))} |")
    return lines + [""]


def _min_norm_section(report: dict) -> list[str]:
    lines = []
    for name, info in (report.get("min_norm") or {}).items():
        unit = "L2" if info["norm"] == "l2" else "L-inf"
        lines += [f"## Minimum-norm curve: {name} ({unit})", "",
                  f"{name} searches each image's smallest adversarial perturbation, so one run gives robust accuracy "
                  f"at every budget: the fraction of images whose smallest adversary found is larger than ε (or "
                  f"none was found). Median smallest {unit} perturbation over clean-correct images: "
                  f"{_f(info.get('median_clean_correct'), 4)}; none found for {info.get('not_found', 0)} of them. "
                  "The robust-accuracy plot draws the whole curve.", ""]
        check = (report.get("min_norm_crosscheck") or {}).get(name)
        if check:
            others = sorted({k for row in check.values() for k in row if k != name})
            lines += [f"Cross-check at the grid points (a minimum-norm attack is usually a little weaker than a "
                      f"bounded attack at a fixed budget):", "",
                      f"| ε | {name} | " + " | ".join(others) + " |", "|---|---|" + "---|" * len(others)]
            for eps, row in check.items():
                lines.append(f"| {eps} | {_f(row.get(name))} | " + " | ".join(_f(row.get(o)) for o in others) + " |")
            lines.append("")
    return lines


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


def small_sample_warning(n: int) -> str | None:
    if n >= SMALL_SAMPLE:
        return None
    return (f"only {n} images were evaluated (fewer than {SMALL_SAMPLE}): every proportion below is uncertain by "
            "several points (see the confidence intervals); evaluate on more images before comparing models.")
