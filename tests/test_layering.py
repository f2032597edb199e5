"""Which part may import which: shared code and shared data live in dig_common (and box geometry in reward_fns),
so data_prep, the reward and eval never reach into each other or into the recipe (README, layout). A package
read as data counts like an import: ``importlib.resources.files("pkg")``, ``import_module("pkg")`` and Hydra's
``pkg://pkg`` search paths are seen too. Inside data_prep, the shared machinery at the top and the two pair sources
(``render/``, ``photo/``) have their own rule."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("dig_common", "reward_fns", "data_prep", "eval", "recipes")
# part -> the other parts it may import (at module level or inside a function) or read package data of
ALLOWED = {
    "reward_fns": set(),  # verl loads it by file path in its reward workers: keep it self-contained
    "dig_common": set(),  # the bottom layer: base-model files, prompt templates, CLI and file helpers
    "data_prep": {"dig_common", "reward_fns"},
    "eval": {"dig_common", "reward_fns"},
    # eval: recipes.dig.live draws the validation pictures with eval.visualize (the one gallery code)
    "recipes": {"dig_common", "reward_fns", "data_prep", "eval"},
}
# calls that take a package name as their first argument and read it
PACKAGE_READERS = {"files", "import_module", "read_text", "read_binary", "open_text", "open_binary", "contents"}
PKG_URL = re.compile(r"pkg://([A-Za-z_][\w.]*)")
# data_prep: the shared modules (top level) use no pair source, except build (it runs both sources) and audit (the
# rendered pairs' ground truth, data_prep.render.ground_truth); photo applies the renderer's gates (render.scene).
SOURCES = ("data_prep.render", "data_prep.photo")
SOURCE_USERS = {
    "data_prep/build.py": set(SOURCES),
    "data_prep/audit.py": {"data_prep.render.ground_truth"},
    "data_prep/photo": {"data_prep.render.scene"},
}
BLENDER_SCRIPT = "data_prep.render.worker"  # runs in the render venv only: nothing imports it


def _names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in PACKAGE_READERS and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return PKG_URL.findall(node.value)
    return []


def used_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every module of PARTS a Python file imports or reads as a package; for a YAML file,
    its ``pkg://`` search paths."""
    if path.suffix in (".yaml", ".yml"):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [(n, m) for n, line in enumerate(lines, 1) for m in PKG_URL.findall(line) if m.split(".")[0] in PARTS]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = {
        (node.lineno, name)
        for node in ast.walk(tree)
        for name in _names(node)
        if name.split(".")[0] in PARTS and hasattr(node, "lineno")
    }
    return sorted(found)


def imported_parts(path: Path) -> list[tuple[int, str]]:
    """(line, part) of every import or package read of one of PARTS in a file."""
    return sorted({(line, name.split(".")[0]) for line, name in used_modules(path)})


def part_files(part: str) -> list[Path]:
    folder = REPO / part
    return sorted([*folder.rglob("*.py"), *folder.rglob("*.yaml")])


def violations(part: str) -> list[str]:
    out = []
    for path in part_files(part):
        for line, other in imported_parts(path):
            if other != part and other not in ALLOWED[part]:
                out.append(f"{path.relative_to(REPO)}:{line} uses {other}")
    return out


@pytest.mark.parametrize("part", PARTS)
def test_each_part_imports_only_what_it_may(part):
    assert violations(part) == []


def source_violations(repo: Path = REPO) -> list[str]:
    out = []
    paths = [p for folder in (*PARTS, "tests", "benchmarks") for p in (repo / folder).rglob("*.py")]
    for path in sorted(paths):
        rel = path.relative_to(repo).as_posix()
        for line, name in used_modules(path):
            if name == BLENDER_SCRIPT or name.startswith(BLENDER_SCRIPT + "."):
                out.append(f"{rel}:{line} imports the Blender script {name}")
            if not rel.startswith("data_prep/") or not name.startswith(SOURCES) or name in SOURCES:
                continue  # `from data_prep.render import scene`: the names imported are checked
            own = next((s for s in SOURCES if rel.startswith(s.replace(".", "/") + "/")), None)
            if own and name.startswith(own):
                continue
            allowed = next((v for k, v in SOURCE_USERS.items() if rel == k or rel.startswith(k + "/")), set())
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                out.append(f"{rel}:{line} uses {name}")
    return out


def test_data_prep_is_two_sources_over_shared_machinery():
    assert (REPO / "data_prep/render/worker.py").is_file() and (REPO / "data_prep/render/ground_truth.py").is_file()
    assert source_violations() == []


def test_the_check_sees_function_level_imports_and_package_reads(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import os\nfrom importlib.resources import files\n\ndef f():\n    from recipes.dig import launch\n"
        "    import eval.dig as d\n    return files('recipes.dig'), importlib.import_module('reward_fns.x')\n"
        "URL = 'pkg://data_prep.render'\n"
    )
    assert imported_parts(module) == [(5, "recipes"), (6, "eval"), (7, "recipes"), (7, "reward_fns"), (8, "data_prep")]
    config = tmp_path / "c.yaml"
    config.write_text("hydra:\n  searchpath:\n    - pkg://verl.trainer.config\n    - pkg://eval\n")
    assert imported_parts(config) == [(4, "eval")]


def test_the_source_check_sees_a_shared_module_using_a_source(tmp_path):
    (tmp_path / "data_prep").mkdir()
    (tmp_path / "data_prep/stages.py").write_text("from data_prep.photo.pairs import PhotoConfig\n")
    (tmp_path / "data_prep/audit.py").write_text("from data_prep.render.worker import handle\n")
    assert sorted(source_violations(tmp_path)) == [
        "data_prep/audit.py:1 imports the Blender script data_prep.render.worker",
        "data_prep/audit.py:1 imports the Blender script data_prep.render.worker.handle",
        "data_prep/audit.py:1 uses data_prep.render.worker",
        "data_prep/audit.py:1 uses data_prep.render.worker.handle",
        "data_prep/stages.py:1 uses data_prep.photo.pairs",
        "data_prep/stages.py:1 uses data_prep.photo.pairs.PhotoConfig",
    ]


def test_every_part_is_a_folder_of_the_repo():
    assert all((REPO / part / "__init__.py").is_file() for part in PARTS)
