"""argparse with the answer the Fire commands give to a mistyped option: the closest valid one.

The device commands (medrobust-screen) parse their options with `ArgumentParser`; the training side's
Fire commands (medrobust.cli) share `closest` and `is_flag`. Standard library only.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys


def closest(name: str, choices) -> str | None:
    """The choice a mistyped name most likely meant (difflib similarity, or the only prefix match)."""
    choices = list(choices)
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if match:
        return match[0]
    prefixed = [c for c in choices if c.startswith(name)]
    return prefixed[0] if len(prefixed) == 1 else None


def is_flag(token: str) -> bool:
    """Fire's rule: '--name', '-x' or '-name', but not a negative number."""
    return token.startswith("--") or re.match(r"^-[a-zA-Z]", token) is not None


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts, with the Fire commands' answer to a mistyped option: the closest valid one.

    Python 3.11's argparse says only "unrecognized arguments: --limt 10". Prefixes are not expanded
    (allow_abbrev=False): `--lim 5` is refused, never silently taken as `--limit 5`.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        # Every option-like token is checked first, so a mistyped required option (`--bundel`) is named
        # as such rather than reported as a missing --bundle.
        args = list(sys.argv[1:] if args is None else args)
        known = {o for action in self._actions for o in action.option_strings}
        for token in args:
            if token == "--":
                break
            if is_flag(token) and token.split("=", 1)[0] not in known:
                self.error(self._unknown_message([token]))
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unknown_message(extras))
        return namespace

    def _unknown_message(self, extras: list[str]) -> str:
        options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        for token in extras:
            if is_flag(token):
                written = token.split("=", 1)[0]
                guess = closest(written.lstrip("-").replace("_", "-"), [o[2:] for o in options])
                return f"unknown option {written} (" + (f"did you mean --{guess}?" if guess else
                                                          "see --help for the options") + ")"
        return f"unexpected argument {extras[0]!r}"
