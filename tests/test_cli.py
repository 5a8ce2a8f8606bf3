"""Every command line as a new user meets it: mistyped options, non-numbers, --help, the test command.

The subprocess tests give each command a second mistake that main's code would report first (a missing
run or data folder), so "refused before any work" is what is checked, and quickly.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medrobust import cli

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, module):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("module, args, expected", [
    ("medrobust.train", ["--label-fration", "0.2", "--data", "/no/such/data"],
     "unknown option --label-fration (did you mean --label-fraction?)"),
    ("medrobust.train", ["--data", "/no/such/data", "--label_fration=0.2"], "did you mean --label-fraction?"),
    ("medrobust.train", ["--epoch", "3", "--data", "/no/such/data"], "did you mean --epochs?"),
    ("medrobust.evaluate", ["--run", "/no/such/run", "--limt", "10"], "unknown option --limt (did you mean --limit?)"),
    ("export", ["bundle", "--run", "/no/such/run", "--out", "/tmp/b", "--quantise", "int8"],
     "did you mean --quantize?"),
    ("export", ["verify", "--bundle", "/no/such/bundle", "--limt", "5"], "did you mean --limit?"),
    ("export", ["bundel", "--run", "/no/such/run", "--out", "/tmp/b"], "unknown command 'bundel' (did you mean bundle?)"),
    ("export.runtime", ["--bundle", "/no/such/bundle", "scan.png", "--outt", "r.csv"], "did you mean --out?"),
])
def test_a_mistyped_option_is_refused_first_naming_the_closest_valid_one(module, args, expected):
    assert expected in _one_error_line(run_cli(*args, module=module))


@pytest.mark.parametrize("module, args, expected", [
    ("medrobust.train", ["--label-fraction", "10%"], "--label-fraction must be a number, got '10%'"),
    ("medrobust.train", ["--lam", "three"], "--lam must be a number, got 'three'"),
    ("medrobust.train", ["--epochs", "ten"], "--epochs must be an integer, got 'ten'"),
    ("medrobust.train", ["--batch-size", "1.5"], "--batch-size must be an integer, got '1.5'"),
    ("medrobust.train", ["--epochs"], "--epochs needs a value"),
    ("medrobust.train", ["--image-size", "0"], "--image-size must be a positive integer (pixels), got 0"),
    ("medrobust.train", ["--image-size", "6", "--arch", "strided_cnn"], "--arch strided_cnn needs --image-size >= 8"),
    ("medrobust.train", ["--eps", "0.001,", "0.003"], "unexpected argument '0.003'"),
    ("medrobust.evaluate", ["--run", "/no/such/run", "--limit", "ten"], "--limit must be an integer, got 'ten'"),
    ("export", ["verify", "--bundle", "/no/such/bundle", "--eps", "big"], "--eps must be a number, got 'big'"),
])
def test_a_bad_value_names_its_option(tmp_path, module, args, expected):
    extra = ["--out", str(tmp_path / "r"), "--data", "/no/such/data"] if module == "medrobust.train" else []
    assert expected in _one_error_line(run_cli(*args, *extra, module=module))
    assert not (tmp_path / "r").exists()


def _train_like(data: str = "auto", label_fraction: float = 0.1, epochs: int = 10, width: int | None = None,
                out: str = "runs/x", detector="true", lr: float = 1e-3):
    return locals()


@pytest.mark.parametrize("argv, expected", [
    (["--label-fraction", "0.2"], {"label_fraction": "0.2"}),
    (["--label_fraction=0.2", "--epochs=3"], {"label_fraction": "0.2", "epochs": "3"}),
    (["--detector"], {"detector": "true"}),
    (["--nodetector", "--out", "r"], {"detector": "false", "out": "r"}),
    (["-e", "4"], {"epochs": "4"}),
    (["--width", "none", "--", "--help"], {"width": "none"}),
])
def test_fire_option_forms_are_accepted(argv, expected):
    assert cli.check_arguments(_train_like, cli._fire_args(argv)) == expected


def test_typed_options_keep_the_text_as_written():
    given = cli.check_arguments(_train_like, ["--out", "007", "--width", "none", "--lr", "2/255", "--epochs", "1e1"])
    values = cli.typed(_train_like, given)(out=7, width="none", lr="2/255", epochs=10.0)
    assert values["out"] == "007" and values["width"] is None and values["lr"] == 2 / 255 and values["epochs"] == 10


def _cli_functions():
    import export.__main__ as export_main
    import export.bundle
    import export.verify
    from medrobust.evaluate import evaluate
    from medrobust.train import train

    return [train, evaluate, export_main.bundle, export_main.verify, export.bundle.bundle, export.verify.verify]


def test_help_describes_every_option():
    from medrobust.cli import option_descriptions

    for function in _cli_functions():
        described = option_descriptions(function)
        missing = [p for p in inspect.signature(function).parameters if not (described.get(p) or "").strip()]
        assert not missing, f"{function.__module__}.{function.__name__}: no help for {', '.join(missing)}"


@pytest.mark.parametrize("module, args, program", [
    ("medrobust.train", ["--help"], "python -m medrobust.train"),
    ("medrobust.evaluate", ["--help"], "python -m medrobust.evaluate"),
    ("export", ["bundle", "--help"], "python -m export bundle"),
])
def test_help_shows_the_command_as_typed(module, args, program):
    result = run_cli(*args, module=module)
    text = result.stdout + result.stderr
    assert result.returncode == 0 and f"    {program} " in text, text[:2000]
    assert "train.py" not in text and "__main__.py" not in text and "evaluate.py" not in text


def test_help_names_options_as_they_are_typed(tmp_path):
    """Fire's help listed --label_fraction (and short flags like -m) and opened with "INFO: Showing help";
    ours lists the options as the README and the errors spell them, on stdout, and runs nothing."""
    result = run_cli("--help", "--out", str(tmp_path / "run"), module="medrobust.train")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--label-fraction VALUE  (default: 0.1)" in result.stdout and "share of training labels" in result.stdout
    assert "_" not in " ".join(re.findall(r"^  (--\S+)", result.stdout, re.M))
    assert "INFO" not in result.stdout + result.stderr and not (tmp_path / "run").exists()


def test_a_command_group_lists_its_commands_and_needs_one():
    listed = run_cli("--help", module="export")
    assert listed.returncode == 0 and all(c in listed.stdout for c in ("bundle", "verify", "keygen", "sign"))
    bare = run_cli(module="export")
    assert bare.returncode == 2 and "give a command" in _one_error_line(bare)


def test_library_modules_do_not_import_the_commands():
    """Imports flow one way: no library module reaches up into a command-line module."""
    commands = {"medrobust.train", "medrobust.evaluate", "export.__main__"}
    offenders = []
    for path in [*(REPO / "medrobust").rglob("*.py"), *(REPO / "export").rglob("*.py")]:
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module in commands:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{module} imports {n}" for n in names if n in commands]
    assert not offenders, offenders
    io_imports = [n for n in ast.walk(ast.parse((REPO / "medrobust" / "io.py").read_text()))
                  if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in ("medrobust", "export")]
    assert not io_imports, "medrobust/io.py sits below every other module"


def test_readme_test_command_is_what_ci_runs_and_ci_deletes_nothing_of_yours():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"Run the tests.*?```bash\n(.+?)\n```", readme, re.S)
    assert block, "README: no test command"
    readme_steps = [s.strip() for s in block.group(1).split("&&")]
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = [ln for ln in script.splitlines() if "pytest" in ln][-1]
    ci_steps = [re.sub(r'"\$venv(/[^"]*)?"', r".venv\1", s.strip()) for s in command.split("&&")]
    assert ci_steps == readme_steps
    removals = [ln for ln in script.splitlines() if re.search(r"\brm\b", ln)]
    assert all("mktemp" in script and "$tmp" in ln for ln in removals), removals


def test_help_keeps_continuation_lines_with_colons():
    """A continuation line holding "word:" or starting with "--" once ended an option's help mid-sentence."""
    from medrobust.cli import help_text
    from medrobust.train import train

    text = " ".join(help_text(train, []).split())
    assert "operating point: the threshold on P(disease) = 1 - P(NORMAL) is chosen on the validation split" in text
    assert "free for trades: one signed step of --train-eps (auto: 0.008) along the clean loss's input gradient" in text
    assert "then the UAD detector." in text


def test_a_data_folder_without_test_is_refused_by_train_and_evaluate_alike(tmp_path):
    """Both commands name --data and the missing split, before any work (new-user findings of stop 34/35)."""
    from PIL import Image

    data = tmp_path / "scans"
    for split in ("train", "val"):
        (data / split / "CNV").mkdir(parents=True)
        Image.new("L", (32, 32), 90).save(data / split / "CNV" / "CNV-1-1.jpeg")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"method": "standard", "data": "phantom", "image_size": 28}')
    (run / "classifier.keras").write_bytes(b"checked after --data")  # never loaded: the refusal comes first
    for module, args in (("medrobust.train", ["--data", str(data), "--out", str(tmp_path / "new")]),
                         ("medrobust.evaluate", ["--run", str(run), "--data", str(data), "--out",
                                                 str(tmp_path / "eval")])):
        line = _one_error_line(run_cli(*args, module=module))
        assert line.startswith(f"error: --data {data}: has train/, val/ but no test/"), line
    assert not (tmp_path / "new").exists() and not (tmp_path / "eval").exists()
