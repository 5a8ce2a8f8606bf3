"""PNG plots of an evaluation report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medrobust.io import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> str:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path.name


def _title(report: dict, text: str) -> str:
    return text + ("\n(SYNTHETIC OCT phantom)" if report["synthetic_data"] else f"\n({report['data_source']})")


def _series(report, attack, key, adaptive=False):
    by_eps = report["attacks"][attack]
    eps = [float(k) for k in by_eps]
    values = [((e.get("adaptive") or {}) if adaptive else e).get(key) for e in by_eps.values()]
    return [(x, v) for x, v in zip(eps, values) if v is not None]


def write_plots(report: dict, curves: dict, out: Path) -> list[str]:
    written = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for attack in report["attacks"]:
        pts = _series(report, attack, "robust_accuracy")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=attack)
    ax.axhline(report["clean_accuracy"], color="grey", ls=":", label="clean")
    ax.set(xscale="log", xlabel="ε (L∞, [0,1] scale)", ylabel="accuracy", ylim=(0, 1.02),
           title=_title(report, "Robust accuracy vs ε"))
    ax.legend()
    written.append(_save(fig, out / "robust_accuracy.png"))

    if curves:
        attacks = sorted({k[0] for k in curves})
        fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 4), squeeze=False)
        for ax, attack in zip(axes[0], attacks):
            for (name, eps, adaptive), (fpr, tpr) in sorted(curves.items()):
                if name == attack:
                    ax.plot(fpr, tpr, ls="--" if adaptive else "-", label=f"ε={eps}" + (" adaptive" if adaptive else ""))
            ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
            ax.set(xlabel="clean false-alarm rate", ylabel="adversaries flagged", title=_title(report, f"Detector ROC, {attack}"))
            ax.legend(fontsize=7)
        written.append(_save(fig, out / "detector_roc.png"))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, attack in enumerate(report["attacks"]):
        color = f"C{i}"
        kinds = [("classifier_only_risk", ":", "classifier only")]
        if report.get("detector"):
            kinds.append(("system_risk", "-", "with detector"))
        for key, style, label in kinds:
            pts = _series(report, attack, key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=style, marker="o", color=color, label=f"{attack}, {label}")
    ax.set(xscale="log", xlabel="ε", ylabel="risk", ylim=(0, 1.02), title=_title(report, "System risk vs ε"))
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "system_risk.png"))

    adaptive = [a for a in report["attacks"] if _series(report, a, "system_risk", adaptive=True)]
    if adaptive:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for i, attack in enumerate(adaptive):
            for key, adapt, style in (("system_risk", False, "-"), ("system_risk", True, "--")):
                pts = _series(report, attack, key, adaptive=adapt)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=style, marker="o", color=f"C{i}",
                        label=f"{attack}, {'adaptive' if adapt else 'non-adaptive'}")
        ax.set(xscale="log", xlabel="ε", ylabel="system risk", ylim=(0, 1.02),
               title=_title(report, "Adaptive vs non-adaptive attacker"))
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "adaptive_vs_nonadaptive.png"))
    return written
