"""The one error style of every command-line tool (docs/cli.md).

Input a user can fix (a missing file, an unknown model, a bad flag value, a processor that is not on disk) ends
the tool with ``<prog>: error: <message>`` on stderr and exit status 2, the way argparse reports a bad flag, and
never with a traceback. The message names the thing and, where there is one, the fix. ``DIG_DEBUG=1`` re-raises
instead, for a traceback. Usage::

    @cli_main("python -m data_prep.gallery")
    def main(argv: list[str] | None = None) -> int: ...

    if __name__ == "__main__":
        sys.exit(main())
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

import yaml

USAGE_EXIT = 2  # bad input (argparse uses 2 for a bad flag too); 1 = the tool ran and its check failed
INTERRUPT_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
# What an interrupted tool says when it names no resume of its own: its writes are atomic (dig_common.fileio)
NOTHING_HALF_WRITTEN = "nothing half-written was left (files are renamed into place when complete)"


class CliError(Exception):
    """Bad input, with a message that names it (and the fix)."""


# What library code raises for bad input; each names the file, flag or value in its message.
USER_ERRORS = (CliError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, yaml.YAMLError)

Main = Callable[[list[str] | None], int | None]


def cli_main(
    prog: str, on_interrupt: str = NOTHING_HALF_WRITTEN
) -> Callable[[Main], Callable[[list[str] | None], int]]:
    """Wrap a tool's ``main(argv)``: bad input becomes one ``prog: error: ...`` line and status 2; Ctrl-C
    (KeyboardInterrupt) one ``prog: interrupted: <on_interrupt>`` line and status 130, where ``on_interrupt``
    says what was kept and how to resume (a tool that resumes says so)."""

    def wrap(main: Main) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                return main(argv) or 0
            except USER_ERRORS as err:
                if os.environ.get("DIG_DEBUG"):
                    raise
                print(f"{prog}: error: {err}", file=sys.stderr)
                return USAGE_EXIT
            except KeyboardInterrupt:
                if os.environ.get("DIG_DEBUG"):
                    raise
                print(f"\n{prog}: interrupted: {on_interrupt}", file=sys.stderr, flush=True)
                return INTERRUPT_EXIT

        return wrapped

    return wrap


def tool_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a tool: ``doc``'s first paragraph as its description, and no prefix matching, so
    that a flag that was renamed (``--out`` for ``--out-dir``) is refused instead of silently taken."""
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0], allow_abbrev=False)
