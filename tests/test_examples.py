"""examples/compare_defenses.py at toy scale: it trains, evaluates, writes its table and plots, and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compare_defenses.py"


def _run(runs: Path, results: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, str(EXAMPLE), "--epochs", "1", "--fractions", "0.1", "--methods", "standard,ssat",
            "--eps", "0.002,2/255", "--limit", "60", "--train-option", "width=8",
            "--out", str(runs), "--results", str(results)]
    return subprocess.run(args, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


@pytest.mark.slow
def test_compare_defenses_writes_one_table_and_resumes(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    first = _run(runs, results)
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads((results / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["standard", "ssat + UAD"]
    assert data["attacks"] == ["pgd", "apgd"]  # the default: PGD-20 and APGD-CE-100
    # The standard row is the default's own standard teacher: trained once, counted once.
    standard, ssat_row = data["rows"]
    assert Path(standard["run"]) == runs / "ssat_rst_frac0.1_ep1_seed0" / "teacher"
    assert Path(ssat_row["teacher_path"]).parent == Path(standard["run"])
    assert ssat_row["teacher_train_seconds"] == standard["train_seconds"]
    assert not (runs / "standard_frac0.1_ep1_seed0").exists()
    counted = sum(r["train_seconds"] for r in data["rows"]) + sum(
        (r["detector_fit_seconds"] or 0) + r["evaluate_seconds"] for r in data["rows"])
    assert data["compute_minutes"] == pytest.approx(counted / 60, abs=0.06)
    for attack in ("pgd", "apgd"):
        per = data["rows"][1]["attacks"][attack]
        assert set(per["robust_sensitivity"]["0.00784314"]) == {"CNV", "DME", "DRUSEN", "NORMAL"}
    # The strongest attack at each budget: never a higher robust accuracy than either attack alone.
    for k, acc in data["rows"][1]["robust_accuracy"].items():
        assert acc == min(data["rows"][1]["attacks"][a]["robust_accuracy"][k] for a in ("pgd", "apgd"))
    assert data["synthetic_data"] is True and data["n_test_images"] == 60
    assert data["eps"] == pytest.approx([0.002, 2 / 255])
    ssat = data["rows"][1]
    for key in ("robust_accuracy", "balanced_robust_accuracy", "classifier_only_risk", "system_risk",
                "adaptive_system_risk"):
        assert set(ssat[key]) == {"0.002", "0.00784314"}, key
    assert 0 <= ssat["clean_balanced_accuracy"] <= 1 and ssat["referral"]["sensitivity"] is not None
    # The adaptive attacker's sweep includes the plain attack, so it is never less risky.
    for k, risk in ssat["system_risk"].items():
        assert ssat["adaptive_system_risk"][k] >= risk
    readme = (results / "README.md").read_text()
    assert "SYNTHETIC" in readme and "2/255" in readme and "| ssat + UAD | 0.1 |" in readme
    assert (results / "robust_accuracy.png").stat().st_size > 0 and (results / "system_risk.png").is_file()

    again = _run(runs, results)  # everything finished: reused, nothing trained or attacked again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "evaluating " in first.stdout  # what medrobust.evaluate prints when it starts
    assert "already complete" in again.stdout and "evaluating " not in again.stdout


def _row(method, seed, clean, robust, risk, sens):
    attack = {"robust_accuracy": {"0.002": robust}, "robust_sensitivity": {"0.002": {"CNV": sens, "DME": sens - 0.1}},
              "classifier_only_risk": {"0.002": risk}, "system_risk": {"0.002": risk},
              "adaptive_system_risk": {"0.002": risk}, "detection_auroc": {"0.002": 0.9}}
    weaker = {**attack, "robust_accuracy": {"0.002": robust + 0.1},
              "robust_sensitivity": {"0.002": {"CNV": sens + 0.1, "DME": sens}}}
    return {"method": method, "label_fraction": 0.1, "seed": seed, "clean_accuracy": clean,
            "sensitivity": {"CNV": 0.9, "DME": 0.5}, "attacks": {"pgd": attack, "apgd": weaker},
            "robust_accuracy": {"0.002": robust}, "classifier_only_risk": {"0.002": risk},
            "system_risk": {"0.002": risk}, "adaptive_system_risk": {"0.002": risk},
            "detection_auroc": {"0.002": 0.9}, "clean_false_referral_rate": 0.05, "train_seconds": 10.0,
            "clean_balanced_accuracy": clean - 0.1, "balanced_robust_accuracy": {"0.002": robust - 0.2},
            "referral": {"sensitivity": 0.95, "specificity": clean, "at": "threshold"},
            "teacher_train_seconds": 2.0 if method != "standard" else None}


def test_seeds_give_mean_and_sample_sd_per_method_and_fraction():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import compare_defenses as cd
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    rows = [_row("ssat + UAD", 0, 0.8, 0.6, 0.1, 0.5), _row("ssat + UAD", 1, 0.6, 0.4, 0.3, 0.7),
            _row("ssat + UAD", 2, 0.7, 0.5, 0.2, 0.6), _row("standard", 0, 0.9, 0.1, 0.8, 0.2)]
    summary = cd.summary_rows(rows)
    assert [(s["method"], s["seeds"]) for s in summary] == [("ssat + UAD", [0, 1, 2]), ("standard", [0])]
    ssat = summary[0]
    assert ssat["clean_accuracy"] == {"mean": 0.7, "sd": 0.1, "n": 3}
    assert ssat["robust_accuracy"]["0.002"] == {"mean": 0.5, "sd": 0.1, "n": 3}
    assert ssat["adaptive_system_risk"]["0.002"] == {"mean": 0.2, "sd": 0.1, "n": 3}
    # Per class under the strongest attack: the lower of the two attacks per class, then the mean.
    assert ssat["robust_sensitivity_top"] == {"CNV": {"mean": 0.6, "sd": 0.1, "n": 3},
                                              "DME": {"mean": 0.5, "sd": 0.1, "n": 3}}
    assert ssat["train_seconds"]["mean"] == 12.0  # the teacher's training counts
    assert summary[1]["clean_accuracy"] == {"mean": 0.9, "sd": 0.0, "n": 1}
    text = "\n".join(cd.summary_markdown({"summary": summary, "seeds": [0, 1, 2]}))
    assert ssat["balanced_robust_accuracy"]["0.002"] == {"mean": 0.3, "sd": 0.1, "n": 3}
    assert "| ssat + UAD | 0.1 | 0.700 ± 0.100 | 0.600 ± 0.100 | 0.500 ± 0.100 | 0.300 ± 0.100 | 0.200 ± 0.100 | " \
           "0.950 ± 0.000 / 0.700 ± 0.100 | 12 ± 0 |" in text


@pytest.mark.parametrize("args, expected", [(["--baseline-steps", "0"], "--baseline-steps must be >= 1, got 0")])
def test_compare_defenses_refuses_a_bad_value_before_any_work(tmp_path, args, expected):
    result = subprocess.run([sys.executable, str(EXAMPLE), *args, "--out", str(tmp_path / "r"),
                             "--results", str(tmp_path / "t")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()
