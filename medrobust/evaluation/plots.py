"""PNG plots of an evaluation report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from medrobust.io import atomic_write_bytes  # noqa: E402

PLOT_NAMES = ("robust_accuracy.png", "detector_roc.png", "system_risk.png", "adaptive_vs_nonadaptive.png")


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


def _min_norm_curve(info: dict, n_images: int):
    """(eps, robust accuracy) steps of a minimum-norm attack: robust(eps) = share of norms > eps."""
    norms = sorted(v for v in info["norms"] if v is not None)
    eps = [v for v in norms if v > 0]
    if not eps:
        return [], []
    grid = [eps[0] / 2] + eps
    return grid, [sum(1 for v in info["norms"] if v is None or v > e) / n_images for e in grid]


def write_plots(report: dict, curves: dict, out: Path) -> list[str]:
    """Write the plots of a (complete) report into out; returns the file names written (a subset of
    PLOT_NAMES: no detector, no detector plots)."""
    written = []
    norms = report.get("norms", {})
    l2_attacks = [a for a in report["attacks"] if norms.get(a) == "l2"]
    panels = [("linf", "ε (L∞, [0,1] pixel scale)")] + ([("l2", "ε (L2, [0,1] pixel units)")] if l2_attacks else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (norm, label) in zip(axes[0], panels):
        for i, attack in enumerate(a for a in report["attacks"] if norms.get(a, "linf") == norm):
            pts = _series(report, attack, "robust_accuracy")
            info = (report.get("min_norm") or {}).get(attack)
            if info:
                grid, acc = _min_norm_curve(info, report["n_images"])
                ax.step(grid, acc, where="post", lw=1, color=f"C{i}", alpha=0.7)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="" if info else "-", color=f"C{i}",
                    label=attack + (" (minimum-norm curve)" if info else ""))
        ax.axhline(report["clean_accuracy"], color="grey", ls=":", label="clean")
        ax.set(xscale="log", xlabel=label, ylabel="accuracy", ylim=(0, 1.02),
               title=_title(report, f"Robust accuracy vs ε ({'L2' if norm == 'l2' else 'L∞'})"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
        ax.legend(fontsize=7)
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
    for i, attack in enumerate(a for a in report["attacks"] if norms.get(a, "linf") == "linf"):
        color = f"C{i}"
        kinds = [("classifier_only_risk", ":", "classifier only")]
        if report.get("detector"):
            kinds.append(("system_risk", "-", "with detector"))
        for key, style, label in kinds:
            pts = _series(report, attack, key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=style, marker="o", color=color, label=f"{attack}, {label}")
    ax.set(xscale="log", xlabel="ε (L∞)", ylabel="risk", ylim=(0, 1.02),
           title=_title(report, "System risk vs ε (L∞ attacks)"))
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
        ax.set(xscale="log", xlabel="ε (L∞)", ylabel="system risk", ylim=(0, 1.02),
               title=_title(report, "Adaptive vs non-adaptive attacker"))
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "adaptive_vs_nonadaptive.png"))
    return written
