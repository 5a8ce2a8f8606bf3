"""python -m medrobust.evaluate on a trained classifier + detector: the contract keys, files, the adaptive
attacker's relation to the plain one, what the report says was run, norms, resuming after Ctrl-C, and
evaluating a whole external folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train_cli import run_cli

PER_EPS_KEYS = ("robust_accuracy", "detection_auroc", "tpr_at_fpr", "system_risk", "classifier_only_risk")
QUICK = ("--limit", "160", "--pgd-steps", "10", "--apgd-steps", "10", "--cw-steps", "10", "--square-queries", "100",
         "--fmn-steps", "30")


@pytest.fixture(scope="module")
def evaluation(phantom_system_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = run_cli("--run", str(phantom_system_run), "--attacks", "fgsm,pgd,cw,square,fmn", "--eps", "0.002,0.008",
                     *QUICK, "--out", str(out), module="medrobust.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    out.with_name(out.name + ".stderr").write_text(result.stderr)  # beside the report folder, for the log test
    return json.loads((out / "report.json").read_text()), out


def test_progress_bars_stay_out_of_a_log(evaluation):
    """stderr was a pipe (a log file, CI): attack progress bars would fill it with carriage returns."""
    _, out = evaluation
    stderr = out.with_name(out.name + ".stderr").read_text()
    assert "img/s" not in stderr and "\r" not in stderr, stderr[-2000:]


def test_report_has_the_contract_keys(evaluation):
    report, out = evaluation
    assert 0 <= report["clean_accuracy"] <= 1 and report["synthetic_data"] is True and report["complete"] is True
    assert set(report["per_class"]) == {"CNV", "DME", "DRUSEN", "NORMAL"}
    assert {"sensitivity", "specificity"} <= set(report["urgent_referral"])
    for attack in ("fgsm", "pgd", "square", "fmn"):
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
    assert not list((out / "progress").glob("*.npz")), "warm-start arrays are deleted once the report is complete"


def test_risk_with_detector_never_exceeds_classifier_only_risk(evaluation):
    report, _ = evaluation
    for by_eps in report["attacks"].values():
        for entry in by_eps.values():
            assert entry["system_risk"] <= entry["classifier_only_risk"]


def test_per_class_robust_sensitivity_adds_up_to_robust_accuracy(evaluation):
    """robust_sensitivity[c] is the share of class c's images still right under attack, so weighting it
    by the class counts (the confusion matrix's row sums) gives back robust_accuracy."""
    report, _ = evaluation
    counts = np.asarray(report["confusion_matrix"]).sum(axis=1)
    for by_eps in report["attacks"].values():
        for entry in by_eps.values():
            sens = entry["robust_sensitivity"]
            assert list(sens) == ["CNV", "DME", "DRUSEN", "NORMAL"]
            total = sum(n * sens[c] for n, c in zip(counts, sens) if n)
            assert total / counts.sum() == pytest.approx(entry["robust_accuracy"])


def test_robust_accuracy_never_rises_with_the_budget(evaluation):
    """An image fooled at a smaller budget stays fooled at a larger one (the sweep keeps its adversary)."""
    report, _ = evaluation
    for name, by_eps in report["attacks"].items():
        if name == "fgsm":
            continue  # one step of size eps: not monotone in eps, run on its own at every budget
        values = [by_eps[k]["robust_accuracy"] for k in sorted(by_eps, key=float)]
        assert values == sorted(values, reverse=True), (name, values)


def test_adaptive_attack_is_at_least_as_strong_as_the_plain_one(evaluation, report):
    figures, _ = evaluation
    for eps, entry in figures["attacks"]["pgd"].items():
        adaptive = entry["adaptive"]
        assert adaptive["system_risk"] >= entry["system_risk"]
        assert adaptive["system_risk"] <= entry["classifier_only_risk"] + 1e-9  # hidden images are fooled ones
        assert [w["weight"] for w in adaptive["per_weight"]] == [0.1, 1.0, 10.0]
        report(f"PGD-10 eps={eps} (SYNTHETIC phantom, 160 images): plain system risk {entry['system_risk']:.3f}, "
               f"det. AUROC {entry['detection_auroc']}; adaptive worst case {adaptive['system_risk']:.3f} "
               f"({adaptive['images_swept']} caught images swept; newly hidden per weight "
               f"{[w['newly_hidden'] for w in adaptive['per_weight']]}), adaptive det. AUROC {adaptive['detection_auroc']}")


def test_report_says_what_was_run_with_intervals_and_a_small_sample_warning(evaluation):
    """Issue 15 item 7: method, epochs, label fraction, attack settings, image count, Wilson intervals."""
    report, out = evaluation
    md = (out / "report.md").read_text()
    for text in ("method `standard`", "4 epochs", "label fraction 1.0", "160 images", "PGD-10", "100 queries",
                 "FMN-L-inf-30", "--limit", "compute time"):
        assert text in md, text
    assert re.search(r"\| accuracy \| 0\.\d{3} \(0\.\d{3}–[01]\.\d{3}\) \|", md), "clean accuracy without its interval"
    assert "fewer than 200" in md and report["warnings"]
    entry = report["attacks"]["pgd"]["0.002"]
    lo, hi = entry["ci95"]["robust_accuracy"]
    assert lo <= entry["robust_accuracy"] <= hi and 0 < hi - lo < 0.2
    from scipy.stats import binomtest

    k = round(entry["robust_accuracy"] * report["n_images"])
    ci = binomtest(k, report["n_images"]).proportion_ci(method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


def test_carlini_wagner_is_reported_under_l2(evaluation):
    """Issue 15 item 8: C&W is an L2 attack; its budgets are L2 radii and it sits in its own table."""
    report, out = evaluation
    assert report["norms"]["cw"] == "l2" and report["norms"]["pgd"] == "linf"
    side = 28
    expected = [f"{e * side:g}" for e in (0.002, 0.008)]  # auto: eps * sqrt(pixels)
    assert list(report["attacks"]["cw"]) == expected
    for key, entry in report["attacks"]["cw"].items():
        assert entry["max_l2"] <= float(key) + 1e-4
    md = (out / "report.md").read_text()
    linf_part, l2_part = md.split("### L2 budgets")
    assert "#### cw" in l2_part and "#### cw" not in linf_part


def test_fmn_gives_the_curve_and_a_crosscheck_against_pgd(evaluation):
    report, out = evaluation
    info = report["min_norm"]["fmn"]
    assert info["norm"] == "linf" and len(info["norms"]) == report["n_images"]
    for eps, entry in report["attacks"]["fmn"].items():
        norms = np.array([np.inf if v is None else v for v in info["norms"]])
        assert entry["robust_accuracy"] == pytest.approx(np.mean(norms > float(eps)))
    check = report["min_norm_crosscheck"]["fmn"]
    assert set(check["0.002"]) >= {"fmn", "pgd", "square"}
    assert "Minimum-norm curve: fmn" in (out / "report.md").read_text()


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = run_cli("--run", str(tmp_path), module="medrobust.evaluate")
    assert result.returncode == 2 and "not a trained run" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("text, words", [("[1, 2]", "a JSON list, not an object"), ("{}", "no integer image_size"),
                                         ("{oops", "not valid JSON")])
def test_evaluate_names_a_config_that_is_not_a_runs(tmp_path, text, words):
    (tmp_path / "classifier.keras").write_bytes(b"")
    (tmp_path / "config.json").write_text(text)
    result = run_cli("--run", str(tmp_path), module="medrobust.evaluate")
    assert result.returncode == 2 and str(tmp_path / "config.json") in result.stderr and words in result.stderr
    assert "Traceback" not in result.stderr, result.stderr

@pytest.mark.parametrize("args, words", [(("--eps", "0"), "--eps"), (("--eps", "2"), "--eps"),
                                         (("--eps-l2", "-1"), "--eps-l2"), (("--split", "train"), "--split"),
                                         (("--pgd-steps", "0"), "--pgd-steps"), (("--split", "all"), "--data PATH"),
                                         (("--split", "all", "--data", "phantom"), "not a folder")])
def test_evaluate_refuses_bad_options_in_one_line(phantom_system_run, tmp_path, args, words):
    result = run_cli("--run", str(phantom_system_run), *args, "--out", str(tmp_path / "e"), module="medrobust.evaluate")
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    # Refused before TensorFlow loads: none of its C++ start-up lines (they look like failures).
    assert not re.search(r"^[IWEF]\d{4} |absl::InitializeLog", result.stderr, re.M), result.stderr


def test_a_new_evaluation_into_the_same_folder_leaves_no_stale_plot(phantom_system_run, tmp_path):
    """Issue 15 item 7: re-evaluating with other options into one folder replaced the report but left the
    earlier run's plots (e.g. the adaptive one) beside it."""
    out = tmp_path / "eval"
    common = ("--run", str(phantom_system_run), "--attacks", "pgd", "--eps", "0.004", "--limit", "60",
              "--pgd-steps", "3", "--out", str(out), "--progress", "false")
    first = run_cli(*common, "--adaptive", "true", module="medrobust.evaluate")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / "adaptive_vs_nonadaptive.png").is_file()
    (out / "notes.txt").write_text("mine")
    second = run_cli(*common, "--adaptive", "false", module="medrobust.evaluate")
    assert second.returncode == 0, second.stderr[-2000:]
    assert not (out / "adaptive_vs_nonadaptive.png").exists()
    assert "replacing" in second.stdout and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "report.json").read_text())["adaptive"] is False


def test_ctrl_c_stops_within_seconds_and_the_same_command_resumes(phantom_system_run, tmp_path):
    """Issue 15 item 6: every (attack, eps) is saved as it finishes; SIGINT stops in seconds with exit 130;
    rerunning the same command skips what was finished."""
    out = tmp_path / "eval"
    args = [sys.executable, "-m", "medrobust.evaluate", "--run", str(phantom_system_run), "--attacks", "fgsm,pgd",
            "--eps", "0.001,0.002", "--adaptive", "false", "--limit", "160", "--pgd-steps", "400", "--out", str(out),
            "--progress", "false"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # SIGINT's default action restored in the child: a test run started in the background by a shell
    # inherits SIGINT ignored, and the evaluation would then (rightly) never see the signal.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = out / "progress" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and len(json.loads(state.read_text())["entries"].get("fgsm", {})) == 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the evaluation ended before it could be interrupted: " + proc.stderr.read()[-2000:]
    time.sleep(2.0)  # into the PGD sweep
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    stopped_after = time.time() - sent
    assert proc.returncode == 130, stderr[-2000:]
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert stopped_after < 10, f"took {stopped_after:.1f} s to stop"
    saved = json.loads(state.read_text())["entries"]["fgsm"]
    assert not (out / "report.json").exists() and "INCOMPLETE" in (out / "report.md").read_text()

    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming: 2" in again.stdout and "fgsm eps=" not in again.stdout and "pgd eps=0.002" in again.stdout
    final = json.loads((out / "report.json").read_text())
    assert final["complete"] is True and final["attacks"]["fgsm"] == saved
    assert set(final["attacks"]["pgd"]) == {"0.001", "0.002"}


def test_split_all_evaluates_every_image_of_an_external_folder(phantom_system_run, real_scans, tmp_path):
    """Issue 11: --split all evaluates a whole folder of class folders (here real scans the phantom run never
    saw); unreadable files are skipped and named, and the report says it is the whole folder."""
    folder = tmp_path / "site_b"
    kept = 0
    for class_dir in sorted((real_scans / "unsplit").iterdir()):
        if class_dir.is_dir():
            (folder / class_dir.name).mkdir(parents=True)
            for f in sorted(class_dir.glob("*.jpeg"))[:3]:
                shutil.copy(f, folder / class_dir.name / f.name)
                kept += 1
    (folder / "CNV" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "eval"
    result = run_cli("--run", str(phantom_system_run), "--data", str(folder), "--split", "all", "--attacks", "fgsm",
                     "--eps", "0.004", "--adaptive", "false", "--out", str(out), module="medrobust.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broken.jpeg" in result.stderr
    assert "img/s" not in result.stderr, "image-loading progress bars in a pipe"
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == kept and report["data"]["whole_folder"] is True
    assert report["synthetic_data"] is False and str(folder) in report["data_source"]
    assert [os.path.basename(s[0]) for s in report["data"]["skipped"]] == ["broken.jpeg"]
    md = (out / "report.md").read_text()
    assert "whole folder" in md and f"{kept} images" in md and "1 unreadable files skipped" in md

    # The run's own training folder is refused: that would evaluate it on the images it was trained on.
    run_copy = tmp_path / "run_on_site_b"
    shutil.copytree(phantom_system_run, run_copy)
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "data": str(folder), "data_resolved": str(folder)}))
    refused = run_cli("--run", str(run_copy), "--data", str(folder), "--split", "all", "--out", str(tmp_path / "e2"), module="medrobust.evaluate")
    assert refused.returncode == 2 and "trained on this data" in refused.stderr, refused.stderr[-2000:]


def test_the_adaptive_objective_shares_one_pass_and_keeps_the_scores(phantom_system_run):
    """score_tensor(x, with_logits=True) gives the same scores as before plus the classifier's logits from
    the same pass; the joint objective built on it matches the two-call version (classifier, then
    detector) on loss and success."""
    import tensorflow as tf

    from medrobust.attacks.losses import misclassified
    from medrobust.data.phantom import make_phantom
    from medrobust.detection import Detector
    from medrobust.evaluation.adaptive import joint_objective, margin_term
    from medrobust.models import load_classifier

    clf = load_classifier(phantom_system_run / "classifier.keras")
    det = Detector.load(phantom_system_run / "detector", clf)
    x, y = make_phantom(64, 28, seed=7)
    x, y = tf.constant(x), tf.constant(y, tf.int32)
    plain = det.score_tensor(x)
    shared = det.score_tensor(x, with_logits=True)
    assert set(plain) == {"combined", *det.parts}
    for name in plain:
        np.testing.assert_array_equal(plain[name].numpy(), shared[name].numpy())
    np.testing.assert_allclose(shared["logits"].numpy(), clf(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    threshold = det.threshold
    objective, success = joint_objective(clf, det, 1.0)
    loss, hit = objective(x, y)
    logits, score = clf(x, training=False), det.score_tensor(x)["combined"]
    np.testing.assert_allclose(loss.numpy(), (margin_term(logits, y) - tf.nn.relu(score - threshold)).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(hit.numpy(), (misclassified(logits, y) & (score <= threshold)).numpy())
    np.testing.assert_array_equal(success(x, y).numpy(), hit.numpy())


@pytest.mark.realdata
def test_split_all_names_images_the_run_was_trained_on(tmp_path):
    """A whole folder made of the run's training scans is refused; a folder that mixes some in is
    evaluated with a TRAINING DATA warning and the overlap in the report (found by identical pixels and
    by Kermany patient ids), so a figure on one's own training images is never passed off as external."""
    from medrobust import cli
    from medrobust.data.folders import load_image_tree
    from medrobust.evaluate import _training_overlap

    kermany = Path(os.environ.get("MEDROBUST_DATA", "")) / "kermany"
    if not kermany.is_dir():
        pytest.skip("real Kermany scans not found")
    data = tmp_path / "trained_on"
    picked = {}
    for split in ("train", "val", "test"):
        for c in ("CNV", "DME", "DRUSEN", "NORMAL"):
            (data / split / c).mkdir(parents=True)
            for f in sorted((kermany / split / c).glob("*.jpeg"))[:3]:
                shutil.copy(f, data / split / c / f.name)
                picked.setdefault(split, []).append(f)
    config = {"data_resolved": str(data), "image_size": 16, "seed": 0}
    with pytest.raises(cli.UsageError, match="every image of this folder"):
        _training_overlap(config, load_image_tree(data / "train", 16), 16)

    mixed = tmp_path / "site_b"
    for f in picked["train"][:2] + picked["test"]:
        (mixed / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, mixed / f.parent.name / ("renamed-" + f.name if f in picked["train"][:1] else f.name))
    with pytest.warns(UserWarning, match="TRAINING DATA: 2 of 14"):
        overlap = _training_overlap(config, load_image_tree(mixed, 16), 16)
    # The renamed copy has no Kermany patient id any more: found by its pixels.
    assert overlap == {"checked": True, "images": 2, "identical_images": 2, "training_patients": 1}
