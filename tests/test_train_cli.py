"""python -m medrobust.train as a user runs it: outputs, reruns, one-line errors, real-scan report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest


def run_cli(*args, module="medrobust.train", cwd=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "standard"
    args = ["--data", "phantom", "--method", "standard", "--label-fraction", "1.0", "--epochs", "4",
            "--width", "16", "--detector", "false", "--out", str(out)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, args, result


def test_standard_run_writes_the_contract_files(standard_run):
    out, _, result = standard_run
    for name in ("classifier.keras", "config.json", "metrics.json", "training_log.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert 0.0 <= metrics["clean_accuracy"] <= 1.0 and metrics["synthetic_data"] is True
    assert config["method"] == "standard" and config["seed"] == 0 and config["versions"]["tensorflow"]
    assert config["data_source"] == "phantom" and config["n_labeled"] == 4000
    assert "SYNTHETIC" in result.stdout
    assert len((out / "training_log.csv").read_text().strip().splitlines()) == 1 + 4
    assert not (out / "backup").exists()  # BackupAndRestore cleans up after a finished run


def test_standard_training_beats_chance_and_leaves_room_for_attacks(standard_run, report):
    import keras

    from medrobust.attacks import PGD, robust_accuracy
    from medrobust.data import load_data

    out, _, _ = standard_run
    clf = keras.models.load_model(out / "classifier.keras", safe_mode=True)
    x, y = load_data("phantom")["test"]
    clean = json.loads((out / "metrics.json").read_text())["clean_accuracy"]
    robust = robust_accuracy(clf, PGD(clf, steps=10), x[:400], y[:400], 0.004, progress=False)
    report(f"standard small CNN (width 16, 4 epochs, phantom): clean {clean:.3f}, PGD-10 eps=0.004 {robust:.3f}")
    assert clean > 0.5  # chance is 0.25
    assert robust < clean - 0.1


def test_rerun_of_a_finished_run_does_not_retrain(standard_run):
    out, args, _ = standard_run
    before = (out / "classifier.keras").stat().st_mtime_ns
    result = run_cli(*args)
    assert result.returncode == 0 and "already complete" in result.stdout
    assert (out / "classifier.keras").stat().st_mtime_ns == before


def test_rerun_with_other_options_is_refused_in_one_line(standard_run):
    out, args, _ = standard_run
    changed = [a if a != "4" else "5" for a in args]
    result = run_cli(*changed)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "epochs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, words", [
    (["--method", "magic"], "--method must be one of"),
    (["--label-fraction", "0"], "--label-fraction"),
    (["--eps", "0.1,abc"], "--eps"),
    (["--data", "/no/such/folder"], "no such file or folder"),
    (["--detector", "maybe"], "--detector must be true or false"),
    (["--lr-schedule", "step"], "--lr-schedule must be one of"),
    (["--eps", "1/0"], "--eps"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--epochs", "automatic"], "--epochs must be an integer"),
    (["--ema", "1"], "--ema must be 0 (off) or a momentum in (0, 1)"),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, words):
    result = run_cli(*args, "--out", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and result.stderr.strip().count("\n") == 0


def test_budgets_may_be_written_as_fractions_of_255():
    from medrobust import cli

    assert cli.parse_floats("0.001,2/255", "eps") == (0.001, 2 / 255)


def test_auto_epochs_give_at_least_ten_epochs_and_a_thousand_steps():
    from medrobust.data.pipeline import steps_per_epoch
    from medrobust.train import resolve_epochs

    assert resolve_epochs("auto", steps_per_epoch(1043, 64)) == 59  # kermany/train: 17 steps an epoch
    assert resolve_epochs("auto", steps_per_epoch(4000, 64)) == 16  # the phantom: 63 steps
    assert resolve_epochs("auto", steps_per_epoch(97477, 64)) == 10  # full OCTMNIST: 1524 steps
    assert resolve_epochs(4, 17) == 4


def test_config_keeps_the_epochs_as_given_and_the_resolved_number(standard_run, tmp_path):
    out, _, _ = standard_run
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 4 and config["epochs_resolved"] == 4
    auto = tmp_path / "auto"
    args = ["--data", "phantom", "--method", "standard", "--label-fraction", "0.1", "--width", "8",
            "--detector", "false", "--batch-size", "40", "--out", str(auto)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((auto / "config.json").read_text())
    assert config["epochs"] == "auto" and config["epochs_resolved"] == 10  # 100 steps an epoch
    assert "epochs: auto -> 10 (100 steps per epoch)" in result.stdout
    assert "already complete" in run_cli(*args).stdout  # "auto" pins the rerun like any value


def test_cosine_schedule_decays_to_zero_over_the_whole_run():
    from medrobust.train import learning_rate

    options = {"lr": 1e-3, "epochs": 4, "lr_schedule": "cosine"}
    schedule = learning_rate(options, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(20)) == pytest.approx(5e-4, rel=1e-3)  # half-way down the cosine
    assert float(schedule(40)) == pytest.approx(0.0, abs=1e-9)
    assert learning_rate({**options, "lr_schedule": "constant"}, 10) == 1e-3


def test_help_lists_the_contract_options():
    result = run_cli("--help")
    assert result.returncode == 0
    text = (result.stdout + result.stderr).replace("-", "_")  # Fire writes help to stderr when not on a tty
    for option in ("--data", "--method", "--label-fraction", "--epochs", "--image-size", "--out", "--eps", "--lam",
                   "--attack", "--detector", "--seed"):
        assert option.lstrip("-").replace("-", "_") in text, option


@pytest.mark.realdata
def test_phantom_trained_model_on_real_scans_is_reported(standard_run, real_scans, report):
    """The domain gap between the synthetic phantom and real Kermany scans, as a figure (not asserted)."""
    import keras

    from medrobust.attacks import predict_labels
    from medrobust.classes import CLASSES
    from medrobust.data.folders import load_image_tree

    out, _, _ = standard_run
    clf = keras.models.load_model(out / "classifier.keras", safe_mode=True)
    scans = load_image_tree(real_scans, 28)
    assert len(scans.y) == 90 and not scans.skipped
    pred = predict_labels(clf, scans.x)
    per_class = ", ".join(f"{c} {np.mean(pred[scans.y == i] == i):.2f}" for i, c in enumerate(CLASSES))
    report(f"phantom-trained standard CNN on 90 REAL Kermany scans: accuracy {np.mean(pred == scans.y):.3f} "
           f"(chance 0.25; per class {per_class}; predicted counts {np.bincount(pred, minlength=4).tolist()})")
    assert pred.shape == (90,)


def test_a_teacher_that_saw_more_labels_is_named(tmp_path):
    """--teacher PATH from a run with a larger label fraction (or another seed's labeled subset) carries
    those labels into the new run: warned before any work; a missing file is a usage error."""
    import json
    import warnings

    from medrobust import cli
    from medrobust.train import _check_teacher

    teacher = tmp_path / "std" / "classifier.keras"
    teacher.parent.mkdir()
    teacher.write_bytes(b"weights")
    options = {"method": "ssat", "teacher": str(teacher), "label_fraction": 0.1, "seed": 0, "data": "phantom"}
    for seen, leaks in (({"label_fraction": 0.1, "seed": 0}, False), ({"label_fraction": 1.0, "seed": 0}, True),
                        ({"label_fraction": 0.1, "seed": 3}, True)):
        (teacher.parent / "config.json").write_text(json.dumps({**seen, "data_resolved": "phantom"}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _check_teacher(options)
        assert any("TEACHER SAW OTHER LABELS" in str(w.message) for w in caught) == leaks, seen
    # The default --data auto, resolved to the phantom for the teacher: the same data, no warning.
    (teacher.parent / "config.json").write_text(json.dumps({"label_fraction": 0.1, "seed": 0, "data": "auto",
                                                            "data_resolved": "phantom"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_teacher({**options, "data": "auto"})
    assert not caught, [str(w.message) for w in caught]
    with pytest.raises(cli.UsageError, match="no such file"):
        _check_teacher({**options, "teacher": str(tmp_path / "missing.keras")})


# -- --method ssat's default recipe: a standard teacher (OUT/teacher), then robust self-training ------
SSAT_ARGS = ["--data", "phantom", "--method", "ssat", "--label-fraction", "0.1", "--epochs", "1", "--width", "8",
             "--batch-size", "200",
             "--detector", "false", "--pretrain-epochs", "0.2"]


@pytest.fixture(scope="module")
def ssat_default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ssat"
    result = run_cli(*SSAT_ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_ssat_trains_its_standard_teacher_on_the_same_labels_and_records_it(ssat_default_run):
    out, result = ssat_default_run
    teacher = json.loads((out / "teacher" / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert (teacher["method"], teacher["detector"], teacher["out"]) == ("standard", False, str(out / "teacher"))
    for key in ("label_fraction", "seed", "image_size", "arch", "width", "n_labeled", "augmentation",
                "class_weights", "epochs_resolved", "data_source"):
        assert teacher[key] == config[key], key
    assert (config["ssat_loss"], config["teacher"], config["attack"]) == ("trades", "standard", "free")
    assert (config["train_eps"], config["free_noise"]) == (0.008, 0.0)  # --train-eps auto for the free form
    run = config["teacher_run"]
    assert run["path"] == str(out / "teacher" / "classifier.keras") and (out / "teacher" / "classifier.keras").is_file()
    assert run["config"]["method"] == "standard" and run["config"]["n_labeled"] == config["n_labeled"] == 400
    assert run["metrics"]["clean_accuracy"] == json.loads((out / "teacher" / "metrics.json").read_text())[
        "clean_accuracy"]
    assert "pseudo-labels from the standard teacher" in result.stdout
    assert "robust_kl" in (out / "training_log.csv").read_text().splitlines()[0]  # the trades form's loss parts


def test_ssat_reuses_its_finished_teacher_and_a_finished_run(ssat_default_run):
    out, _ = ssat_default_run
    teacher_model = out / "teacher" / "classifier.keras"
    before = teacher_model.stat().st_mtime_ns
    # The SSAT run lost (as if it never started after its teacher finished): the teacher is reused.
    for name in ("classifier.keras", "config.json", "metrics.json", "training_log.csv"):
        (out / name).unlink()
    again = run_cli(*SSAT_ARGS, "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{out / 'teacher'}: this run is already complete" in again.stdout
    assert teacher_model.stat().st_mtime_ns == before and (out / "metrics.json").is_file()
    done = run_cli(*SSAT_ARGS, "--out", str(out))
    assert done.returncode == 0 and "teacher:" not in done.stdout and f"{out}: this run is already complete" in done.stdout


def test_overwrite_removes_the_teacher_run_as_the_runs_own_and_keeps_foreign_files(tmp_path):
    from medrobust.train import _remove_run_files

    out = tmp_path / "run"
    (out / "teacher" / "backup").mkdir(parents=True)
    marker = {"method": "standard", "data_source": "phantom", "versions": {}}
    for folder in (out, out / "teacher"):
        (folder / "config.json").write_text(json.dumps(marker))
        (folder / "classifier.keras").write_bytes(b"model")
    (out / "teacher" / "backup" / "latest.weights.h5").write_bytes(b"w")
    (out / "teacher" / "notes.txt").write_text("mine")
    _remove_run_files(out, "--overwrite true: ")
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "teacher"]  # the user's file stays
    (out / "teacher" / "notes.txt").unlink()
    (out / "teacher" / "config.json").write_text(json.dumps(marker))
    _remove_run_files(out, "")
    assert not (out / "teacher").exists()
    # A folder named teacher that is not a run is not ours: kept.
    (out / "teacher").mkdir()
    (out / "teacher" / "x.png").write_bytes(b"png")
    _remove_run_files(out, "")
    assert (out / "teacher" / "x.png").is_file()


@pytest.mark.parametrize("args, words", [
    (["--method", "ssat", "--ssat-loss", "ce", "--attack", "free"], "--attack free needs --ssat-loss trades"),
    (["--method", "ssat", "--teacher", "/no/such/teacher.keras"], "--teacher /no/such/teacher.keras: no such file"),
    (["--method", "ssat", "--ssat-loss", "kl"], "--ssat-loss must be one of"),
    (["--method", "ssat", "--attack", "pgd", "--free-noise", "2"], "--free-noise applies to --method ssat --attack free"),
    (["--method", "standard", "--free-noise", "2"], "--free-noise applies to --method ssat --attack free"),
    (["--method", "ssat", "--free-noise", "-1"], "--free-noise must be >= 0"),
    (["--method", "ssat", "--train-eps", "0"], "--train-eps must be in (0, 1]"),
    (["--method", "pgd_at", "--train-eps", "big"], "--train-eps must be a number"),
])
def test_bad_ssat_options_are_one_line_errors_before_any_teacher_is_trained(tmp_path, args, words):
    result = run_cli("--data", "phantom", *args, "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error:") and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, note", [
    (["--method", "standard", "--train-eps", "0.01"], "note: --train-eps 0.01 is not used by --method standard"),
    (["--method", "ssat", "--ssat-loss", "ce", "--train-eps", "0.01"],
     "note: --train-eps 0.01 is not used by --method ssat --ssat-loss ce (its budget is --eps)"),
    (["--method", "pgd_at", "--train-eps", "0.01"], None),
    (["--method", "ssat", "--train-eps", "0.01"], None),
])
def test_a_train_eps_the_method_ignores_is_said(tmp_path, args, note):
    # A missing --data path stops the run before TensorFlow loads; the note comes first.
    result = run_cli("--data", str(tmp_path / "no_such_data"), *args, "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    if note is None:
        assert "note: --train-eps" not in result.stdout
    else:
        assert note in result.stdout, result.stdout
