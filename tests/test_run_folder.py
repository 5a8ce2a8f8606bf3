"""What python -m medrobust.train leaves in --out, and what a rerun may do with it: file modes, the
recorded command and data, a failed start that must not pin its options, --overwrite that removes only
the run's own files; and evaluate/export defaulting to the data the run was trained on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from medrobust import cli

UMASK = 0o027  # neither the usual 0022 nor mkstemp's 0600, so the test sees which one files follow
TINY = ["--data", "phantom", "--method", "standard", "--label-fraction", "0.1", "--epochs", "1", "--width", "8",
        "--detector-epochs", "1", "--detector-parts", "reconstruction,feature,mahalanobis,boundary"]


def _train(*args, env=None):
    return subprocess.run([sys.executable, "-m", "medrobust.train", *args], capture_output=True, text=True,
                          env=env, timeout=600, preexec_fn=lambda: os.umask(UMASK))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A start that fails (400 labeled images, batch 512), then the corrected rerun into the same folder, run
    as a user would: TensorFlow's default log level, umask 027."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    failed = _train(*TINY, "--batch-size", "512", "--out", str(out), env=env)
    rerun = _train(*TINY, "--batch-size", "32", "--out", str(out), env=env)
    return out, failed, rerun


def test_a_start_that_failed_before_its_first_epoch_does_not_block_the_corrected_rerun(tiny_run):
    out, failed, rerun = tiny_run
    assert failed.returncode == 2 and "fewer than one batch" in failed.stderr, failed.stderr[-2000:]
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["batch_size"] == 32


def test_every_output_file_follows_the_umask(tiny_run):
    out, _, rerun = tiny_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.json", "metrics.json", "detector.json", "stats.npz", "classifier.keras",
            "autoencoder.keras"} <= {p.name for p in files}
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~UMASK)}, modes


def test_atomic_writes_and_the_screening_output_follow_the_umask(tmp_path):
    from export.runtime import COLUMNS, _Sink
    from medrobust.io import atomic_write_bytes, atomic_write_json

    old = os.umask(UMASK)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "report.json", {"a": 1})
        sink = _Sink(str(tmp_path / "results.csv"), {})
        sink.write(dict.fromkeys(COLUMNS, ""))  # the file is created with the first row
        sink.close({})
    finally:
        os.umask(old)
    for name in ("a.bin", "report.json", "results.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_config_records_the_command_as_typed_and_the_data_used(tiny_run):
    out, _, _ = tiny_run
    config = json.loads((out / "config.json").read_text())
    assert config["command"].startswith("python -m medrobust.train --data phantom --method standard")
    assert config["command"].endswith(f"--batch-size 32 --out {out}")
    assert config["data_source"] == "phantom" and config["data_resolved"] == "phantom"


def test_no_tensorflow_startup_lines_on_a_cpu_machine(tiny_run):
    """TensorFlow's C++ log lines (I/W/E + date, e.g. 'failed call to cuInit: ... CUDA error') look like a failure."""
    _, failed, rerun = tiny_run
    for result in (failed, rerun):
        noise = [ln for ln in result.stderr.splitlines() if re.match(r"^[IWEF]\d{4} ", ln) or "cuInit" in ln]
        assert not noise, noise


def test_detector_fitting_shows_progress(tiny_run):
    _, _, rerun = tiny_run
    after = rerun.stdout.split("training the autoencoder", 1)[1].split("autoencoder MSE", 1)[0]
    assert re.search(r"\d+/\d+ .*loss", after), rerun.stdout[-2000:]


# -- reruns into an existing folder (in-process: _already_done is what train() calls before any work) --

def _options(run: Path, **changes) -> dict:
    """train()'s options as the run in `run` was given them (from its config.json), with `changes`."""
    import inspect

    from medrobust.train import NOT_PART_OF_RUN, train

    config = json.loads((run / "config.json").read_text())
    names = [n for n in inspect.signature(train).parameters if n not in NOT_PART_OF_RUN]
    return {**{n: config[n] for n in names}, "overwrite": False, "progress": True, "tensorboard": False, **changes}


def _copy_run(tiny_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    return out


def test_overwrite_removes_only_the_runs_own_files(tiny_run, tmp_path):
    from medrobust.train import _already_done

    out = _copy_run(tiny_run, tmp_path)
    (out / "backup").mkdir()
    (out / "backup" / "latest.weights.h5").write_bytes(b"keras")
    (out / "tensorboard" / "train").mkdir(parents=True)
    (out / "tensorboard" / "train" / "events.out.tfevents.1.host").write_bytes(b"tb")
    mine = [out / "notes.txt", out / "scans" / "a.png", out / "detector" / "README", out / "eval" / "report.json"]
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    assert _already_done(out, _options(out, overwrite=True)) is False
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == sorted(str(p.relative_to(out)) for p in mine)


def test_overwrite_of_a_whole_run_leaves_no_file_of_it(tiny_run, tmp_path):
    from medrobust.train import _already_done

    out = _copy_run(tiny_run, tmp_path)
    _already_done(out, _options(out, overwrite=True))
    assert not list(out.iterdir()), list(out.rglob("*"))


def test_training_into_a_folder_that_is_not_a_run_is_refused_and_touches_nothing(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    result = _train("--data", "phantom", "--epochs", "1", "--width", "8", "--detector", "false",
                    "--label-fraction", "1.0", "--out", str(folder), "--overwrite", "true")
    assert result.returncode == 2 and "holds no medrobust run" in result.stderr, result.stderr[-2000:]
    assert [p.name for p in folder.iterdir()] == ["chapter1.tex"]


def test_a_run_that_never_finished_an_epoch_does_not_pin_its_options(tiny_run, tmp_path):
    from medrobust.train import _already_done

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run[0] / "config.json", out / "config.json")  # as a start killed in its first epoch leaves it
    (out / "training_log.csv").write_text("epoch,accuracy,loss\n")
    (out / "notes.txt").write_text("mine")
    assert _already_done(out, _options(out, batch_size=4)) is False
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_run_that_finished_an_epoch_still_pins_its_options(tiny_run, tmp_path):
    from medrobust.train import _already_done

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run[0] / "config.json", out / "config.json")
    (out / "backup").mkdir()  # Keras BackupAndRestore: an epoch finished, the rerun resumes it
    old = json.loads((out / "config.json").read_text())["batch_size"]
    with pytest.raises(cli.UsageError, match=rf"other options \(batch_size: {old} there, 4 now;"):
        _already_done(out, _options(out, batch_size=4))
    # The same folder written another way is the same run: only the changed option is named.
    with pytest.raises(cli.UsageError, match=r"other options \(batch_size: [^;]*; a default may have changed"):
        _already_done(out, _options(out, batch_size=4, out=str(out) + "/"))
    assert _already_done(out, _options(out, out=str(out) + "/")) is False  # unfinished (no metrics.json), not refused



def test_a_budget_the_method_does_not_use_does_not_make_another_run(tiny_run, tmp_path):
    from medrobust.train import _already_done

    out = _copy_run(tiny_run, tmp_path)  # --method standard: --train-eps changes nothing it does
    old = json.loads((out / "config.json").read_text())["train_eps"]
    assert _already_done(out, _options(out, train_eps=old * 2)) is True
    with pytest.raises(cli.UsageError, match=rf"other options \(method: 'standard' there, 'pgd_at' now; "
                                             rf"train_eps: {old} there, {old * 2} now;"):
        _already_done(out, _options(out, method="pgd_at", train_eps=old * 2))

# -- evaluate and export default to the data the run was trained on --

def _stand_in_octmnist(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 8), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 4).reshape(-1, 1).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "octmnist.npz", **arrays)
    return folder / "octmnist.npz"


def _auto_phantom_config(tiny_run) -> dict:
    """The config of a run given --data auto that fell back to the phantom (offline, nothing on disk)."""
    config = json.loads((tiny_run[0] / "config.json").read_text())
    config["data"] = "auto"
    return config


@pytest.fixture
def stand_in_on_disk(tmp_path, monkeypatch):
    """A stand-in octmnist.npz where `--data auto` looks, accepted as the release (MD5 patched to match)."""
    import hashlib

    from medrobust.data import octmnist

    path = _stand_in_octmnist(tmp_path / "data")
    monkeypatch.setenv("MEDROBUST_DATA", str(path.parent))
    monkeypatch.setitem(octmnist.FILES, 28, ("octmnist.npz", hashlib.md5(path.read_bytes()).hexdigest()))
    return path


def test_evaluate_uses_the_data_the_run_was_trained_on(tiny_run, tmp_path):
    """A phantom-trained --data auto run, with a stand-in octmnist.npz appearing later: still the phantom."""
    run = _copy_run(tiny_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["data"] = "auto"
    del config["data_resolved"]  # as runs trained before it was recorded
    (run / "config.json").write_text(json.dumps(config))
    stand_in = _stand_in_octmnist(tmp_path / "data")
    env = {**os.environ, "MEDROBUST_DATA": str(stand_in.parent), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = ["--run", str(run), "--attacks", "fgsm", "--eps", "0.004", "--adaptive", "false", "--limit", "8",
            "--out", str(tmp_path / "eval")]
    result = subprocess.run([sys.executable, "-m", "medrobust.evaluate", *args], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["data_source"] == "phantom"


def test_export_uses_the_data_the_run_was_trained_on(tiny_run, stand_in_on_disk):
    from export.bundle import _dataset
    from export.verify import _test_data

    config = _auto_phantom_config(tiny_run)
    assert _dataset(None, config, 28, log=lambda msg: None).source == "phantom"
    assert _test_data(None, config, 28, 8, 0, log=lambda msg: None)[2].startswith("test split of phantom")


def test_other_data_than_the_run_was_trained_on_is_named_in_a_warning(tiny_run, stand_in_on_disk):
    from medrobust.data import load_run_data

    config = _auto_phantom_config(tiny_run)
    with pytest.warns(UserWarning, match=r"DIFFERENT DATA: --data auto gives octmnist:.*trained on phantom"):
        data = load_run_data(config, "auto")
    assert data.source == f"octmnist:{stand_in_on_disk}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_run_data(config, "phantom").source == "phantom"  # the same data: no warning


def test_recorded_data_that_is_gone_is_named(tiny_run, tmp_path):
    from medrobust.data import load_run_data

    gone = tmp_path / "moved" / "scans.npz"
    config = {**_auto_phantom_config(tiny_run), "data": str(gone), "data_resolved": str(gone),
              "data_source": f"octmnist:{gone}"}
    with pytest.raises(ValueError, match=re.escape(str(gone)) + ".*no longer there"):
        load_run_data(config)
