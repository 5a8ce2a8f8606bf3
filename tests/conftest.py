"""Shared test set-up: real-data location, quiet TensorFlow, and a 'figures' section in the summary.

Tests that measure something users should see (e.g. phantom-trained accuracy on real scans) call
the `report` fixture; the lines are printed at the end of the run, so CI logs carry the figures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if SHARED_DATA.is_dir():
    os.environ.setdefault("MEDROBUST_DATA", str(SHARED_DATA))

_FIGURES: list[str] = []


def real_scans_dir() -> Path | None:
    """$MEDROBUST_DATA/oct2017_subset (the 90 real Kermany B-scans), or None if absent."""
    root = os.environ.get("MEDROBUST_DATA")
    path = Path(root) / "oct2017_subset" if root else SHARED_DATA / "oct2017_subset"
    return path if path.is_dir() else None


@pytest.fixture
def real_scans() -> Path:
    path = real_scans_dir()
    if path is None:
        pytest.skip("real OCT2017 scans not found (set MEDROBUST_DATA to the folder holding oct2017_subset/)")
    return path


@pytest.fixture
def report(request):
    # Kept on the test's user_properties, which pytest-xdist sends from its workers to the main process.
    def add(line: str) -> None:
        request.node.user_properties.append(("measured_figure", line))
    return add


def pytest_runtest_logreport(report):
    if report.when == "teardown":  # the last report of a test: every figure it added is on it
        _FIGURES.extend(f"{report.nodeid}: {value}" for name, value in report.user_properties
                        if name == "measured_figure")


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("measured figures (reported, not asserted)")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def phantom_system_run(tmp_path_factory):
    """One trained system for the whole session: standard small CNN + UAD detector on the phantom."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("system") / "run"
    args = [sys.executable, "-m", "medrobust.train", "--data", "phantom", "--method", "standard",
            "--label-fraction", "1.0", "--epochs", "4", "--width", "16", "--detector-epochs", "4", "--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def load_script(path, name: str):
    """Import a script (benchmarks/*.py) as a module, to test its functions without running main()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
