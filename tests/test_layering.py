"""Which part may import which: shared code lives in dig_common (and box geometry in reward_fns), so data_prep,
the reward and eval never reach into each other or into the recipe (README, layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("dig_common", "reward_fns", "data_prep", "eval", "recipes")
# part -> the other parts it may import (at module level or inside a function)
ALLOWED = {
    "reward_fns": set(),  # verl loads it by file path in its reward workers: keep it self-contained
    "dig_common": {"reward_fns"},
    "data_prep": {"dig_common", "reward_fns"},
    "eval": {"dig_common", "reward_fns"},
    "recipes": {"dig_common", "reward_fns", "data_prep"},
}


def imported_parts(path: Path) -> list[tuple[int, str]]:
    """(line, part) of every import of one of PARTS in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PARTS]
    return found


def violations(part: str) -> list[str]:
    out = []
    for path in sorted((REPO / part).rglob("*.py")):
        for line, other in imported_parts(path):
            if other != part and other not in ALLOWED[part]:
                out.append(f"{path.relative_to(REPO)}:{line} imports {other}")
    return out


@pytest.mark.parametrize("part", PARTS)
def test_each_part_imports_only_what_it_may(part):
    assert violations(part) == []


def test_the_check_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from recipes.dig import launch\n    import eval.dig as d\n")
    assert imported_parts(module) == [(4, "recipes"), (5, "eval")]


def test_every_part_is_a_folder_of_the_repo():
    assert all((REPO / part / "__init__.py").is_file() for part in PARTS)
