"""benchmarks/logit_adjustment.py: post-hoc logit adjustment (Menon et al. 2021) scored on val only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_script

SCRIPT = REPO / "benchmarks" / "logit_adjustment.py"


def _module():
    return load_script(SCRIPT, "bench_logit_adjustment")


def test_adjustment_subtracts_tau_log_prior_and_favours_rare_classes():
    bench = _module()
    logits = np.array([[2.0, 1.5, 0.0, 0.0], [0.0, 0.0, 1.0, 1.2]])
    prior = np.array([0.4, 0.1, 0.1, 0.4])
    assert bench.adjusted_predictions(logits, prior, 0.0).tolist() == [0, 3]
    # log(0.4 / 0.1) = 1.386: beyond tau = 0.5 / 1.386 the rare class wins the first row, 0.2 / 1.386 the second.
    assert bench.adjusted_predictions(logits, prior, 0.3).tolist() == [0, 2]
    assert bench.adjusted_predictions(logits, prior, 0.4).tolist() == [1, 2]
    assert bench.adjusted_predictions(logits, np.array([0.5, 0.5, 0.0, 0.0]), 1.0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="tau >= 0"):
        bench.adjusted_predictions(logits, prior, -1.0)
    s = bench.scores(np.array([0, 0, 1, 3]), np.array([0, 1, 1, 3]))
    assert s["accuracy"] == 0.75 and s["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert s["worst_class"] == 0.5 and s["sensitivity"]["DRUSEN"] is None


def _cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_scores_a_run_on_val_with_its_labeled_prior_and_writes_json(tmp_path):
    from medrobust.data import load_data
    from medrobust.data.splits import labeled_unlabeled_split
    from medrobust.models import build_classifier

    run = tmp_path / "run"
    run.mkdir()
    model = build_classifier("small_cnn", image_size=28, width=8)
    model.save(run / "classifier.keras")
    (run / "config.json").write_text(json.dumps({"method": "standard", "label_fraction": 0.5, "data": "phantom",
                                                 "data_source": "phantom", "seed": 3, "image_size": 28}))
    shutil.copytree(run, tmp_path / "run2")
    out = tmp_path / "adjust.json"
    done = _cli(run, tmp_path / "run2", "--taus", "0,1", "--json", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SYNTHETIC" in done.stdout and "mean over the 2 runs" in done.stdout
    result = json.loads(out.read_text())["results"][0]
    data = load_data("phantom", image_size=28, seed=3)
    _, y = data["train"]
    labeled, _ = labeled_unlabeled_split(y, 0.5, 3)
    prior = np.bincount(y[labeled], minlength=4) / len(labeled)
    assert result["prior"] == pytest.approx(prior, abs=1e-4) and result["n_val"] == len(data["val"][1])
    logits = np.asarray(model.predict(data["val"][0], verbose=0))
    for row in result["taus"]:
        expected = np.argmax(logits - row["tau"] * np.log(prior), 1)
        assert row["accuracy"] == pytest.approx(float(np.mean(expected == data["val"][1])), abs=1e-6)
    again = _cli(run, "--json", out)  # never overwrites
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.parametrize("args, message", [(["--taus", "-1"], "--taus must be >= 0"),
                                           (["--taus", "x"], "--taus must be numbers")])
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _cli(empty)
    assert done.returncode == 2 and "not a finished medrobust run" in done.stderr and str(empty) in done.stderr
    done = _cli(empty, *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("text, message", [("[1, 2]", "a JSON list, not an object"),
                                           ('{"image_size": "64"}', "no integer image_size")])
def test_a_config_that_is_not_a_runs_is_named_not_a_traceback(tmp_path, text, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    (run / "classifier.keras").write_bytes(b"")
    done = _cli(run)
    assert done.returncode == 2 and f"{run / 'config.json'}: not a medrobust run config ({message})" in done.stderr
    assert "Traceback" not in done.stderr


def test_runs_on_different_data_are_refused_before_any_model_loads(tmp_path):
    runs = []
    for name, source in (("phantom_run", "phantom"), ("real_run", "folder:/scans/kermany")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"method": "ssat", "data_source": source, "image_size": 64}))
        (run / "classifier.keras").write_bytes(b"not loaded")  # a load would fail: the refusal comes first
        runs.append(run)
    done = _cli(*runs)
    assert done.returncode == 2 and "trained on different data" in done.stderr, done.stderr[-2000:]
    assert "phantom_run: phantom" in done.stderr and "real_run: folder:/scans/kermany" in done.stderr
