"""The errors a user's mistake raises, and how every command line reports them: one line, exit status 2.

`UserError` is a mistake the user can fix (a mistyped key, a path that is not a dataset, an out-of-range option); the
message names the thing to fix. Kino's own bugs stay ordinary exceptions, so they keep their tracebacks.
`ConfigError` is the one a configuration check raises: every section's `check()` (beside its code:
models/config.py, data/config.py, train/config.py, launch/config.py) raises it with the offending key in the
message.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable, Iterable, List, Optional

USER_ERROR_STATUS = 2


class UserError(Exception):
    """A mistake of the user's: reported as one line with exit status 2, never as a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key."""


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """' (did you mean X?)' for the nearest of `choices`, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    if not close:
        return ""
    return f" (did you mean {close[0]!r}?)" if any(c.isspace() for c in close[0]) else f" (did you mean {close[0]}?)"


def report(prog: str, error: BaseException) -> int:
    print(f"{prog}: {error}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def run_command(prog: str, main: Callable[[Optional[List[str]]], Optional[int]],
                argv: Optional[List[str]] = None) -> int:
    """`main(argv)`'s exit status, with a UserError reported as `prog: message` and status 2."""
    try:
        return main(argv) or 0
    except UserError as error:
        return report(prog, error)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line error form: `prog: message (--help for usage)`, exit 2."""

    def error(self, message: str):
        self.exit(USER_ERROR_STATUS, f"{self.prog}: {message} (--help for usage)\n")


def at_least(minimum: int, what: str = "a number") -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: {what} must be at least {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse
