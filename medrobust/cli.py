"""Shared command-line plumbing: option checking and parsing, one-line errors for bad input, quiet TensorFlow.

Imports no TensorFlow (and Fire only inside `run`). The argparse side (`ArgumentParser`, `closest`) lives in the
device package, medrobust_screen.arguments, and is re-exported here.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import shlex
import sys
import typing
from pathlib import Path

from medrobust_screen.arguments import ArgumentParser, closest, is_flag  # noqa: F401 (ArgumentParser: re-exported)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of user output

# TensorFlow's C++ start-up lines on a machine without a usable GPU. They are printed through absl
# before logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot stop them, and "failed call to cuInit:
# CUDA error" reads like a failure although TensorFlow just runs on the CPU.
_STARTUP_NOISE = (
    "absl::InitializeLog()", "oneDNN custom operations", "cudart_stub.cc", "Could not find cuda drivers",
    "cpu_feature_guard.cc", "This TensorFlow binary is optimized", "To enable the following instructions",
    "failed call to cuInit", "Unable to register cuDNN", "Unable to register cuFFT", "Unable to register cuBLAS",
    "computation placer already registered", "TF-TRT Warning",
)


def import_tensorflow():
    """Import TensorFlow and let it probe for GPUs with its C++ start-up lines kept off stderr.

    The lines TensorFlow prints on a CPU machine (CUDA probing, oneDNN and CPU-instruction notices, the
    `failed call to cuInit` that appears when the first device is listed) are dropped; any other line
    it writes to stderr meanwhile is passed on, and Python exceptions surface as usual.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            import tensorflow

            tensorflow.config.list_physical_devices()  # CUDA probing (cuInit) happens here, not at import
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines()
            kept = [ln for ln in lines if ln.strip() and not any(noise in ln for noise in _STARTUP_NOISE)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
    return tensorflow


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


def flag(name: str) -> str:
    """'label_fraction' -> '--label-fraction', how options are written on the command line."""
    return "--" + name.replace("_", "-")


def parse_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise UsageError(f"{flag(name)} must be true or false, got {value!r}")


def parse_int(value, name: str) -> int:
    """An integer option: 10, '10' or '1e1' -> 10; anything else is a UsageError naming the option."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        text = str(value).strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number.is_integer():
                return int(number)
    raise UsageError(f"{flag(name)} must be an integer, got {value!r}")


def parse_float(value, name: str) -> float:
    """A number option: 0.1, '0.1' or a fraction such as '2/255'; a UsageError naming the option otherwise."""
    if isinstance(value, bool):
        raise UsageError(f"{flag(name)} must be a number, got {value!r}")
    try:
        number = _number(value.strip() if isinstance(value, str) else value)
    except (ValueError, TypeError, ZeroDivisionError):
        raise UsageError(f"{flag(name)} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UsageError(f"{flag(name)} must be a finite number, got {value!r}")
    return number


def parse_floats(value, name: str) -> tuple[float, ...]:
    """'0.001,0.003', (0.001, 0.003) (Fire parses commas into tuples), 0.002 or '2/255' -> a tuple of floats."""
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    try:
        out = tuple(_number(v) for v in items if str(v).strip() != "")
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{flag(name)} must be numbers separated by commas, got {value!r}") from None
    if not out:
        raise UsageError(f"{flag(name)} is empty")
    if not all(math.isfinite(v) for v in out):
        raise UsageError(f"{flag(name)} must be finite numbers, got {value!r}")
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
        raise UsageError(f"{flag(name)}: unknown {', '.join(bad) or 'empty value'}; choose from {', '.join(allowed)}")
    return out


# --------------------------------------------------------------------------------- the command line

def program_name() -> str:
    """How the running command was invoked: 'python -m medrobust.train', 'python examples/x.py' or the
    console script's name ('medrobust-train')."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return f"python -m {module}"
    if sys.argv[0].endswith(".py"):
        return f"python {sys.argv[0]}"
    return Path(sys.argv[0]).name or "python"


def command_line() -> str:
    """The command as the user typed it (program name and arguments, shell-quoted), for the records."""
    return " ".join([program_name(), *map(shlex.quote, sys.argv[1:])])


def run_script(main) -> None:
    """Run a script's main(): a UsageError ends it with one line `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def check_new_json(path: str | None) -> None:
    """Refuse (UsageError) a --json output that already exists: scripts write results to new files only."""
    if path and Path(path).exists():
        raise UsageError(f"--json {path} exists; choose a new file (this script never overwrites)")


def write_json_results(path: str | None, results: list, script: str, argv: list[str] | None) -> None:
    """Write {"command", "results"} to --json PATH (when given) and say so; script: e.g. benchmarks/x.py."""
    if not path:
        return
    from medrobust.io import atomic_write_json

    args = argv if argv is not None else sys.argv[1:]
    atomic_write_json(path, {"command": " ".join(["python", script, *map(shlex.quote, args)]), "results": results})
    print(f"wrote {path}")


def _fire_args(argv: list[str]) -> list[str]:
    """The arguments for the command (Fire takes everything after a last '--' as its own flags)."""
    if "--" in argv:
        return argv[:len(argv) - 1 - argv[::-1].index("--")]
    return argv


def check_arguments(function, argv: list[str]) -> dict[str, str]:
    """Refuse, before any work, what Fire would only reject after the command ran (or never).

    Fire calls the function with the options it recognises and only then complains about the rest
    ("Cannot find key"), and it fills any parameter from a stray positional word. Raises UsageError
    for an unknown or ambiguous option (naming the closest valid one), an option that needs a value
    but has none, and a positional word beyond the function's required parameters. Tokens are read
    as Fire reads them (--name VALUE, --name=VALUE, -n VALUE, --name / --noname for on/off options).
    Returns {parameter: the text given for it}.
    """
    parameters = {name: p for name, p in inspect.signature(function).parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [name for name, p in parameters.items() if p.default is p.empty]
    given, positional, i = {}, [], 0
    while i < len(argv):
        token = argv[i]
        if not is_flag(token):
            positional.append(token)
            i += 1
            continue
        written, has_value = token.split("=", 1)[0], "=" in token
        key = written.lstrip("-").replace("-", "_")
        bare = not has_value and (i + 1 == len(argv) or is_flag(argv[i + 1]))
        negated = False
        if key in parameters:
            name = key
        elif bare and key.startswith("no") and key[2:] in parameters:
            name, negated = key[2:], True
        elif len(key) == 1 and sum(n.startswith(key) for n in parameters) == 1:
            name = next(n for n in parameters if n.startswith(key))
        elif len(key) == 1 and any(n.startswith(key) for n in parameters):
            options = ", ".join(flag(n) for n in parameters if n.startswith(key))
            raise UsageError(f"{written} is ambiguous: it could be {options}")
        else:
            guess = closest(key, parameters)
            hint = f"did you mean {flag(guess)}?" if guess else "see --help for the options"
            raise UsageError(f"unknown option {written} ({hint})")
        if bare and not _takes_bare_flag(parameters[name]):
            raise UsageError(f"{flag(name)} needs a value ({flag(name)} VALUE)")
        if has_value:
            given[name] = token.split("=", 1)[1]
        elif bare:
            given[name] = "false" if negated else "true"
        else:
            given[name] = argv[i + 1]
        i += 1 if has_value or bare else 2
    free = [name for name in required if name not in given]
    if len(positional) > len(free):
        extra = positional[len(free)]
        raise UsageError(f"unexpected argument {extra!r}: options are written --name VALUE "
                         "(a list such as --eps 0.001,0.003 has no spaces)")
    given.update(zip(free, positional))
    return given


def _takes_bare_flag(parameter: inspect.Parameter) -> bool:
    """`--overwrite` alone means true only for on/off options (default a bool or 'true'/'false')."""
    default = parameter.default
    return isinstance(default, bool) or (isinstance(default, str) and default.lower() in ("true", "false"))


def _value_parser(annotation, name: str):
    """A parse function for a parameter annotated int, float or str (optionally `| None`), or None.

    Fire would pass 'ten' to an int option as a string (a TypeError deep inside) and turn '--out 007'
    into the folder 7; these parse the text as typed and name the option when it is wrong.
    """
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else None
    parse = {int: parse_int, float: parse_float, str: lambda value, _: value}.get(annotation)
    if parse is None:
        return None

    def parser(text):
        if optional and str(text).strip().lower() in ("none", ""):
            return None
        return parse(text, name)
    return parser


def typed(function, given: dict[str, str]):
    """`function` for Fire, called with every int/float/str option parsed from its text as typed.

    `given` is check_arguments' {parameter: text}; options without an int/float/str annotation keep
    Fire's parsing (e.g. '0.001,0.003' as a tuple). Parse errors are UsageErrors naming the option.
    """
    hints = typing.get_type_hints(function)
    parsed = {}
    for name, text in given.items():
        parser = _value_parser(hints.get(name), name)
        if parser is not None:
            parsed[name] = parser(text)
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments.update(parsed)
        return function(*bound.args, **bound.kwargs)
    return wrapper


def check_command_line(component, argv: list[str]):
    """check_arguments for a function, or for the chosen command of a {name: function} dict; returns
    the component for Fire with its options typed (see `typed`)."""
    argv = _fire_args(list(argv))
    if "--help" in argv or "-h" in argv:
        raise ShowHelp(help_text(component, argv))
    if isinstance(component, dict):
        if not argv:
            raise UsageError(f"give a command: {program_name()} {'|'.join(component)} [options] "
                             "(--help describes them)")
        command = argv[0]
        if is_flag(command):
            raise UsageError(f"give the command first: {program_name()} {'|'.join(component)} [options]")
        if command not in component:
            guess = closest(command, component)
            raise UsageError(f"unknown command {command!r} (" + (f"did you mean {guess}?" if guess else
                             f"choose from {', '.join(component)}") + ")")
        return {**component, command: typed(component[command], check_arguments(component[command], argv[1:]))}
    return typed(component, check_arguments(component, argv))


class ShowHelp(Exception):
    """Raised with the help text when --help (or -h) is among the arguments."""


def help_text(component, argv: list[str]) -> str:
    """--help for a function (its summary and every option, with the names as they are typed: --label-fraction,
    not Fire's --label_fraction) or for a {command: function} dict (its commands, or the chosen one's help)."""
    if isinstance(component, dict):
        command = next((a for a in argv if not is_flag(a)), None)
        if command in component:
            return help_text(component[command], []).replace(program_name(), f"{program_name()} {command}", 1)
        width = max(map(len, component))
        lines = [f"usage:\n    {program_name()} {{{'|'.join(component)}}} [options]", "", "commands:"]
        lines += [f"  {name:<{width}}  {_summary(function)}" for name, function in component.items()]
        lines += ["", f"{program_name()} COMMAND --help shows a command's options."]
        return "\n".join(lines) + "\n"
    from fire import docstrings

    doc = docstrings.parse(inspect.getdoc(component) or "")
    described = option_descriptions(component)
    parameters = [(name, p) for name, p in inspect.signature(component).parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [name for name, p in parameters if p.default is p.empty]
    usage = " ".join([program_name(), *(name.upper() for name in required), "[options]"])
    lines = [f"usage:\n    {usage}", ""]
    text = " ".join(filter(None, [doc.summary, doc.description]))
    lines += [*_wrap(text, 0), ""] if text else []
    lines.append("options:")
    for name, parameter in parameters:
        # A required value may be given in place or by name (the README writes --bundle B --key K): show both.
        head = (f"{name.upper()}  (or {flag(name)} {name.upper()})" if parameter.default is parameter.empty
                else f"{flag(name)} VALUE")
        default = "" if parameter.default in (parameter.empty, None) else f"  (default: {parameter.default})"
        lines.append(f"  {head}{default}")
        lines += _wrap(described.get(name, ""), 6)
    lines.append("  -h, --help")
    lines += _wrap("show this help and exit", 6)
    return "\n".join(lines) + "\n"


def option_descriptions(function) -> dict[str, str]:
    """{parameter: its description} from the Google-style "Args:" section of the function's docstring.

    An entry starts with "name:" at the section's indentation; every more-indented line continues it, so a
    continuation line may itself hold a colon ("point: the threshold ...") or start with "--" (Fire's
    parser reads such a line as the end of the entry and drops the rest of the description)."""
    names = set(inspect.signature(function).parameters)
    described: dict[str, list[str]] = {}
    base = current = None
    inside = False
    for line in (inspect.getdoc(function) or "").splitlines():
        text = line.strip()
        if not inside:
            inside = text in ("Args:", "Arguments:")
            continue
        if not text:
            continue
        indent = len(line) - len(line.lstrip())
        base = indent if base is None else base
        if indent < base:  # the next section (Returns:, Raises:, ...)
            break
        name, colon, rest = text.partition(":")
        if indent == base and colon and name.strip() in names:
            current = name.strip()
            described[current] = [rest.strip()]
        elif current is not None:
            described[current].append(text)
    return {name: " ".join(" ".join(parts).split()) for name, parts in described.items()}


def _summary(function) -> str:
    import textwrap

    paragraph = (inspect.getdoc(function) or "").strip().split("\n\n")[0]
    return textwrap.shorten(" ".join(paragraph.split()), 88, placeholder=" ...")


def _wrap(text: str, indent: int, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent=" " * indent, subsequent_indent=" " * indent)


def _unquoted_program_name() -> None:
    """Fire shell-quotes the program name in --help ('python -m medrobust.train' in quotes); keep it as typed."""
    from fire import trace

    quote = getattr(trace.FireTrace, "_Quote", None)
    if quote is None or getattr(quote, "keeps_name", False):
        return

    def _quote(self, arg):
        return arg if arg == self.name else quote(self, arg)
    _quote.keeps_name = True
    trace.FireTrace._Quote = _quote


def run(component) -> None:
    """Run a Fire component (a function or a {command: function} dict) as a command-line tool.

    Every option is checked against the function's signature before anything runs, typed options are
    parsed with their name in the error, and user errors become one line on stderr with exit status 2.
    """
    import warnings

    import fire

    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once when piped or logged
    # Warnings (e.g. "skipped scan.jpeg: truncated ...") as one readable line each, without source context.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    _unquoted_program_name()
    try:
        checked = check_command_line(component, sys.argv[1:])
        # serialize: results go to files, not stdout; name: `--help` shows the command as it is typed.
        fire.Fire(checked, name=program_name(), serialize=lambda result: None)
    except ShowHelp as shown:
        print(shown, end="")
        sys.exit(0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
