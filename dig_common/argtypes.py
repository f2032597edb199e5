"""argparse ``type=`` converters shared by the command-line tools: a bad value is a flag error, reported by
argparse itself (``prog: error: argument --limit: ...``, exit 2) before any work starts."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (a count: --limit, --columns, --row-group-size)."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value
