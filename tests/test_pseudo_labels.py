"""benchmarks/pseudo_labels.py: per-class quality of an SSAT run's pseudo-labels on its unlabeled pool."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_script

SCRIPT = REPO / "benchmarks" / "pseudo_labels.py"


def _module():
    return load_script(SCRIPT, "bench_pseudo_labels")


def test_quality_counts_recall_and_precision_per_class():
    bench = _module()
    y = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    pseudo = np.array([0, 0, 1, 1, 0, 3, 3, 3])
    q = bench.pseudo_label_quality(np.eye(4)[pseudo], y)
    assert q["accuracy"] == pytest.approx(5 / 8)
    per = q["per_class"]
    assert [p["count"] for p in per] == [3, 2, 1, 2] and [p["pseudo_count"] for p in per] == [3, 2, 0, 3]
    assert per[0]["recall"] == pytest.approx(2 / 3) and per[0]["precision"] == pytest.approx(2 / 3)
    assert per[1]["recall"] == pytest.approx(1 / 2) and per[2]["recall"] == 0.0 and per[2]["precision"] is None
    assert per[3]["recall"] == 1.0 and per[3]["precision"] == pytest.approx(2 / 3)
    assert q["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0 + 1) / 4)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        bench.pseudo_label_quality(np.ones((3, 4)), np.zeros(2))


def test_alignment_moves_the_pseudo_class_shares_towards_the_labeled_ones():
    bench = _module()
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=400) * np.array([4.0, 1.0, 0.3, 2.0])  # a teacher shy of class 2
    probs /= probs.sum(1, keepdims=True)
    shares = np.full(4, 0.25)
    out = bench.aligned(probs, shares)
    assert np.allclose(out.sum(1), 1.0)
    before, after = np.bincount(probs.argmax(1), minlength=4), np.bincount(out.argmax(1), minlength=4)
    assert after[2] > before[2] and np.abs(after / 400 - shares).sum() < np.abs(before / 400 - shares).sum()


def _run(tmp_path, **config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    return run


def _cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


@pytest.mark.parametrize("config, message", [
    ({"method": "standard", "label_fraction": 0.1}, "not an SSAT run"),
    ({"method": "ssat", "label_fraction": 1.0}, "not an SSAT run"),
    ({"method": "ssat", "label_fraction": 0.1, "teacher": "snapshot"}, "not a saved teacher model"),
    ({"method": "ssat", "label_fraction": 0.1, "teacher_run": {"path": "/nonexistent/classifier.keras"}},
     "no longer there"),
])
def test_refuses_runs_it_cannot_score_before_loading_anything(tmp_path, config, message):
    run = _run(tmp_path, image_size=28, **config)
    done = _cli(run)
    assert done.returncode == 2 and message in done.stderr and str(run) in done.stderr
    assert "Traceback" not in done.stderr


def test_scores_a_run_on_its_own_unlabeled_pool_and_writes_json(tmp_path):
    from medrobust.data import load_data
    from medrobust.data.splits import labeled_unlabeled_split
    from medrobust.models import build_classifier

    teacher = build_classifier("small_cnn", image_size=28, width=8)
    teacher.save(tmp_path / "teacher.keras")
    run = _run(tmp_path, method="ssat", label_fraction=0.5, data="phantom", data_source="phantom",
               synthetic_data=True, seed=3, image_size=28, teacher_run={"path": str(tmp_path / "teacher.keras")})
    out = tmp_path / "quality.json"
    done = _cli(run, "--json", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SYNTHETIC" in done.stdout and "| raw |" in done.stdout and "| aligned |" in done.stdout
    result = json.loads(out.read_text())["results"][0]
    x, y = load_data("phantom", image_size=28, seed=3)["train"]
    labeled, unlabeled = labeled_unlabeled_split(y, 0.5, 3)
    assert (result["n_labeled"], result["n_pool"]) == (len(labeled), len(unlabeled))
    # The raw labeling is the teacher's own arg-max on exactly the pool's scans.
    pseudo = np.asarray(teacher.predict(x[unlabeled], verbose=0)).argmax(1)
    assert result["raw"]["accuracy"] == pytest.approx(float(np.mean(pseudo == y[unlabeled])), abs=1e-6)
    assert [p["pseudo_count"] for p in result["raw"]["per_class"]] == np.bincount(pseudo, minlength=4).tolist()
    again = _cli(run, "--json", out)  # never overwrites
    assert again.returncode == 2 and "exists" in again.stderr


def test_a_corrupt_config_is_named_not_a_traceback(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    done = _cli(run)
    assert done.returncode == 2 and "config.json" in done.stderr and "not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("text, message", [("[1, 2]", "a JSON list, not an object"),
                                           ("{}", "no integer image_size")])
def test_a_config_that_is_not_a_runs_is_named_not_a_traceback(tmp_path, text, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    done = _cli(run)
    assert done.returncode == 2 and f"{run / 'config.json'}: not a medrobust run config ({message})" in done.stderr
    assert "Traceback" not in done.stderr
