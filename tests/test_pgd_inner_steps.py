"""benchmarks/pgd_inner_steps.py: the loss PGD-K reaches on a run's training scans, per K."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "pgd_inner_steps.py"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_more_steps_reach_at_least_the_loss_of_one_and_json_is_written(tmp_path):
    from medrobust.models import build_classifier

    run = tmp_path / "run"
    run.mkdir()
    build_classifier("small_cnn", image_size=28, width=8).save(run / "classifier.keras")
    (run / "config.json").write_text(json.dumps({"method": "pgd_at", "data": "phantom", "data_source": "phantom",
                                                 "seed": 1, "image_size": 28, "train_eps": 0.03}))
    out = tmp_path / "k.json"
    done = _cli(run, "--steps", "10,1", "--images", "64", "--repeats", "2", "--json", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SYNTHETIC" in done.stdout and "eps 0.03" in done.stdout
    (result,) = json.loads(out.read_text())["results"]
    one, ten = result["steps"]  # sorted by K
    assert (one["steps"], ten["steps"]) == (1, 10) and result["images"] == 64 and result["eps"] == 0.03
    assert ten["share_of_most_steps"] == pytest.approx(1.0)
    # Ten steps of 0.25 eps climb at least as high as one step of 2.5 eps, clipped to the ball.
    assert ten["cross_entropy"] >= one["cross_entropy"] - 1e-3
    again = _cli(run, "--json", out)
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "must be >= 1"), (["--steps", "x"], "--steps must be"),
                                           (["--eps", "2"], "--eps must be in (0, 1]")])
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _cli(empty)
    assert done.returncode == 2 and "not a finished medrobust run" in done.stderr
    done = _cli(empty, *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
