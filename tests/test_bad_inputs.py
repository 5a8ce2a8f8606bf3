"""Every command against the bad-input corpus (tests/corpus.py): handled as documented, or a one-line error
naming the file and the problem; never a traceback as the only message, never a silent drop."""

from __future__ import annotations

import warnings

import pytest

import corpus
from medrobust.data import load_data
from medrobust.data.folders import load_class_folder
from test_train_cli import run_cli

FILE_KINDS = list(corpus.FILE_KINDS)
DATASET_KINDS = list(corpus.DATASET_KINDS)


def _class_root(tmp_path):
    root = tmp_path / "scans"
    for c in ("CNV", "DME", "DRUSEN", "NORMAL"):
        (root / c).mkdir(parents=True)
        corpus.mixed_case_extension(root / c)  # one good image per class
    return root


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_loader_handles_each_bad_file(tmp_path, kind):
    build, handling, words = corpus.FILE_KINDS[kind]
    root = _class_root(tmp_path)
    bad = build(root / "DRUSEN")
    loaded = load_class_folder(root, 28)
    if handling == "skip":
        assert [s[0] for s in loaded.skipped] == [str(bad)] and words in loaded.skipped[0][1]
        assert len(loaded.y) == 4
    else:
        assert str(bad) in loaded.files and not loaded.skipped
        x = loaded.x[loaded.files.index(str(bad))]
        assert x.shape == (28, 28, 1) and 0 <= x.min() <= x.max() <= 1


@pytest.mark.parametrize("kind", DATASET_KINDS)
def test_load_data_refuses_each_bad_dataset_naming_it(tmp_path, kind):
    build, words = corpus.DATASET_KINDS[kind]
    path = build(tmp_path)
    with pytest.raises(ValueError, match=words) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_data(str(path))
    assert path.name in str(err.value)


@pytest.fixture(scope="module")
def bad_folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    root, made = corpus.folder_with_every_bad_file(tmp / "ds")
    out = tmp / "run"
    result = run_cli("--data", str(root), "--method", "standard", "--label-fraction", "1.0", "--epochs", "1",
                     "--image-size", "16", "--batch-size", "8", "--width", "8", "--detector", "true",
                     "--detector-epochs", "1", "--out", str(out))
    return root, made, out, result


def _assert_bad_files_reported(stderr: str, made) -> None:
    for kind, path in made.items():
        _, handling, words = corpus.FILE_KINDS[kind]
        if handling == "skip":
            lines = [ln for ln in stderr.splitlines() if path.name in ln]
            assert lines and words in lines[0], f"{kind}: not reported ({path.name})"
    assert "Traceback" not in stderr


def test_train_on_a_folder_with_every_bad_file_reports_each_and_finishes(bad_folder_run):
    root, made, out, result = bad_folder_run
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_bad_files_reported(result.stderr, made)
    assert "OTHER" in result.stderr  # unknown class folder is named, not loaded
    assert (out / "classifier.keras").is_file() and (out / "metrics.json").is_file()


def test_evaluate_on_a_folder_with_every_bad_file_reports_each_and_finishes(bad_folder_run, tmp_path):
    root, made, out, _ = bad_folder_run
    result = run_cli("--run", str(out), "--data", str(root), "--attacks", "fgsm", "--eps", "0.004",
                     "--adaptive", "false", "--out", str(tmp_path / "eval"), module="medrobust.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_bad_files_reported(result.stderr, made)
    assert (tmp_path / "eval" / "report.json").is_file()


@pytest.mark.parametrize("module", ["medrobust.train", "medrobust.evaluate"])
@pytest.mark.parametrize("kind", DATASET_KINDS)
def test_commands_stop_on_bad_datasets_with_one_line(bad_folder_run, tmp_path, module, kind):
    build, words = corpus.DATASET_KINDS[kind]
    path = build(tmp_path)
    args = ["--data", str(path), "--out", str(tmp_path / "o")]
    if module == "medrobust.evaluate":
        args += ["--run", str(bad_folder_run[2])]
    result = run_cli(*args, module=module)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and path.name in errors[0] and words in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_screen_runtime_on_a_folder_with_every_bad_file(bad_folder_run, tmp_path):
    """medrobust-screen gives every corpus file a row: an error row for unreadable ones, a verdict otherwise."""
    import csv
    import io

    root, made, run, _ = bad_folder_run
    bundle = tmp_path / "bundle"
    built = run_cli("bundle", "--run", str(run), "--out", str(bundle), "--onnx", "false", "--calibration", "32",
                    module="export")
    assert built.returncode == 0, built.stderr[-3000:]
    result = run_cli("--bundle", str(bundle), "--allow-unsigned", str(root / "train" / "CNV"), module="export.runtime")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rows = {row["file"].rsplit("/", 1)[-1]: row for row in csv.DictReader(io.StringIO(result.stdout))}
    for kind, path in made.items():
        _, handling, words = corpus.FILE_KINDS[kind]
        row = rows[path.name]
        if handling == "skip":
            assert row["verdict"] == "error" and words in row["error"], (kind, row)
        else:
            assert row["verdict"] in ("classify", "refer") and row["class"] in ("CNV", "DME", "DRUSEN", "NORMAL"), (kind, row)
