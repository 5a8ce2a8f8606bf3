"""python -m medrobust.evaluate on a trained classifier + detector: the contract keys, files and the
adaptive attacker's relation to the plain one."""

from __future__ import annotations

import json

import pytest

from test_train_cli import run_cli

PER_EPS_KEYS = ("robust_accuracy", "detection_auroc", "tpr_at_fpr", "system_risk", "classifier_only_risk")


@pytest.fixture(scope="module")
def evaluation(phantom_system_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = run_cli("--run", str(phantom_system_run), "--attacks", "fgsm,pgd,square", "--eps", "0.002,0.008",
                     "--limit", "160", "--pgd-steps", "10", "--square-queries", "100", "--out", str(out),
                     module="medrobust.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), out


def test_report_has_the_contract_keys(evaluation):
    report, out = evaluation
    assert 0 <= report["clean_accuracy"] <= 1 and report["synthetic_data"] is True
    assert set(report["per_class"]) == {"CNV", "DME", "DRUSEN", "NORMAL"}
    assert set(report["urgent_referral"]) == {"sensitivity", "specificity"}
    for attack in ("fgsm", "pgd", "square"):
        for eps in ("0.002", "0.008"):
            entry = report["attacks"][attack][eps]
            assert all(k in entry for k in PER_EPS_KEYS), (attack, eps)
            assert entry["max_linf"] <= float(eps) + 1e-6
    assert "adaptive" in report["attacks"]["pgd"]["0.008"] and "adaptive" not in report["attacks"]["fgsm"]["0.008"]
    md = (out / "report.md").read_text()
    assert "SYNTHETIC" in md and "System risk" in md
    for png in report["plots"]:
        assert (out / png).stat().st_size > 1000
    assert {"robust_accuracy.png", "detector_roc.png", "system_risk.png", "adaptive_vs_nonadaptive.png"} <= set(report["plots"])


def test_risk_with_detector_never_exceeds_classifier_only_risk(evaluation):
    report, _ = evaluation
    for by_eps in report["attacks"].values():
        for entry in by_eps.values():
            assert entry["system_risk"] <= entry["classifier_only_risk"]


def test_adaptive_attack_is_at_least_as_strong_as_the_plain_one(evaluation, report):
    figures, _ = evaluation
    for eps, entry in figures["attacks"]["pgd"].items():
        adaptive = entry["adaptive"]
        assert adaptive["system_risk"] >= entry["system_risk"]
        best_weight = max(w["system_risk"] for w in adaptive["per_weight"])
        report(f"PGD-10 eps={eps} (SYNTHETIC phantom, 160 images): plain system risk {entry['system_risk']:.3f}, "
               f"det. AUROC {entry['detection_auroc']}; adaptive worst case {adaptive['system_risk']:.3f} "
               f"(best single weight {best_weight:.3f}), adaptive det. AUROC {adaptive['detection_auroc']}")


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = run_cli("--run", str(tmp_path), module="medrobust.evaluate")
    assert result.returncode == 2 and "not a trained run" in result.stderr and "Traceback" not in result.stderr
