"""Shared command-line plumbing: option parsing and one-line errors for bad input."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of user output


def import_tensorflow():
    """Import TensorFlow with its C++ start-up lines (CUDA probing, oneDNN notice) kept off stderr.

    TF 2.21 prints them through absl before logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot
    stop them; they would bury a one-line error. Python exceptions still surface as usual.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


def parse_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise UsageError(f"--{name} must be true or false, got {value!r}")


def parse_floats(value, name: str) -> tuple[float, ...]:
    """'0.001,0.003', (0.001, 0.003) (Fire parses commas into tuples), 0.002 or '2/255' -> a tuple of floats."""
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    try:
        out = tuple(_number(v) for v in items if str(v).strip() != "")
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--{name} must be numbers separated by commas, got {value!r}") from None
    if not out:
        raise UsageError(f"--{name} is empty")
    return out


def _number(text) -> float:
    """A float, or a fraction such as 2/255 (how budgets are often quoted for 8-bit images)."""
    if isinstance(text, str) and "/" in text:
        numerator, denominator = text.split("/")
        return float(numerator) / float(denominator)
    return float(text)


def parse_names(value, name: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    out = tuple(str(v).strip().lower() for v in items if str(v).strip())
    bad = [v for v in out if v not in allowed]
    if bad or not out:
        raise UsageError(f"--{name}: unknown {', '.join(bad) or 'empty value'}; choose from {', '.join(allowed)}")
    return out


def run(component) -> None:
    """Run a Fire component; user errors become one line on stderr and exit status 2."""
    import fire

    import warnings

    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once when piped or logged
    # Warnings (e.g. "skipped scan.jpeg: truncated ...") as one readable line each, without source context.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        fire.Fire(component, serialize=lambda result: None)  # results go to files, not stdout
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
