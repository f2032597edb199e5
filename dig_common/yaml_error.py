"""A YAML parse error in one line, for the ``<prog>: error: ...`` line of docs/cli.md (PyYAML's own text spans
several lines and quotes the source)."""

from __future__ import annotations

import yaml


def yaml_error_line(err: yaml.YAMLError) -> str:
    """'line 2, column 1: expected ',' or ']', but got '<stream end>'' (or PyYAML's text, joined, when it has no
    position)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(err).split())
