"""A short training run on the real Kermany scans (../shared/data/kermany), as a user would start it.

The figure is reported in the test summary; the assertion bound sits well below what the run reaches
(measured: see BOUND) and far above chance (always answering NORMAL scores 187/396 = 0.47 on
kermany/test, with sensitivity 0 for the three diseases).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EPOCHS, IMAGE_SIZE = 40, 48
BOUND = 0.70  # clean accuracy on the 396 test scans; measured 0.828 (seed 0, 2 shared cores)
SENSITIVITY_BOUND = 0.5  # every class, rare ones included (measured >= 0.79); a majority-class model scores 0


def _kermany() -> Path:
    root = os.environ.get("MEDROBUST_DATA")
    path = Path(root) / "kermany" if root else None
    if path is None or not path.is_dir():
        pytest.skip("real Kermany scans not found (set MEDROBUST_DATA to the folder holding kermany/)")
    return path


@pytest.mark.realdata
@pytest.mark.slow
def test_short_real_training_run_learns_every_class(tmp_path, report):
    from medrobust.data.pipeline import AUGMENTATION

    out = tmp_path / "run"
    args = [sys.executable, "-m", "medrobust.train", "--data", str(_kermany()), "--method", "standard",
            "--label-fraction", "1.0", "--image-size", str(IMAGE_SIZE), "--arch", "strided_cnn",
            "--epochs", str(EPOCHS), "--detector", "false", "--progress", "false", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    # The real-data recipe is on by default and recorded.
    assert config["augmentation"] == AUGMENTATION
    assert config["class_weights"] == pytest.approx([1043 / (4 * n) for n in (395, 110, 76, 462)], rel=1e-5)
    assert "675 patients" in done.stdout and "227 patients" in done.stdout
    accuracy, sensitivity = metrics["clean_accuracy"], metrics["test_sensitivity"]
    report(f"strided_cnn {IMAGE_SIZE} px, {EPOCHS} epochs on kermany/train: clean accuracy {accuracy:.3f} on "
           f"{metrics['n_test']} test scans; sensitivity "
           + ", ".join(f"{c} {v:.2f}" for c, v in sensitivity.items())
           + f"; training {metrics['train_seconds_last_session']:.0f} s")
    assert metrics["n_test"] == 396 and not metrics["synthetic_data"]
    assert accuracy >= BOUND
    assert min(sensitivity.values()) >= SENSITIVITY_BOUND, sensitivity
