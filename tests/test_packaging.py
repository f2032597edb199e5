"""What this distribution installs: the top-level import names and the data files the code reads at runtime.

The import names are the top-level folders (``python -m data_prep.render`` etc.), so generic names such as
``eval`` and ``recipes`` land in site-packages. The guard: the wheel's package list and package data come from
pyproject.toml exactly as setuptools computes them (``build_py``'s own lists, nothing built or written), no other
installed distribution may provide one of these names, and each must import from this checkout.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import warnings
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = "dig-recipe"
TOP_LEVEL = {"dig_common", "reward_fns", "data_prep", "eval", "recipes"}
# Folders with an __init__.py that are never installed.
NOT_INSTALLED = {"tests"}
# Data files the code opens at runtime (base-model files and stages via dig_common.paths / data_prep.stages,
# prompt templates, the generator vocabulary and photo settings, eval's benchmark list).
RUNTIME_DATA = (
    "recipes/dig/config/**/*.yaml",
    "dig_common/base_model/*.yaml",
    "dig_common/prompt_templates/**/*.txt",
    "data_prep/**/*.yaml",
    "eval/*.yaml",
)


def wheel_contents(root: Path) -> tuple[set[str], set[str]]:
    """(packages, data files relative to ``root``) that a wheel built from ``root/pyproject.toml`` would hold."""
    cwd = os.getcwd()
    os.chdir(root)  # setuptools resolves the package search and the data globs against the cwd
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # setuptools' notes on the license field and the like
            dist = apply_configuration(Distribution(), root / "pyproject.toml")
            dist.include_package_data = False  # no MANIFEST.in: package_data alone decides
            build_py = dist.get_command_obj("build_py")
            build_py.ensure_finalized()
            data = {Path(src, name).as_posix() for _pkg, src, _build, names in build_py.data_files for name in names}
    finally:
        os.chdir(cwd)
    return set(dist.packages), data


def packaging_problems(root: Path) -> list[str]:
    """Everything wrong with what ``root``'s pyproject.toml would install; empty when all is well."""
    packages, data = wheel_contents(root)
    problems = []
    top_level = {p.split(".")[0] for p in packages}
    if top_level != TOP_LEVEL:
        problems.append(f"top-level packages {sorted(top_level)}, expected {sorted(TOP_LEVEL)}")
    for folder in sorted(p.parent for p in root.glob("*/__init__.py") if p.parent.name not in NOT_INSTALLED):
        for init in sorted(folder.rglob("__init__.py")):
            package = ".".join(init.parent.relative_to(root).parts)
            if package not in packages:
                problems.append(f"{init.parent.relative_to(root)}/ has an __init__.py but is not installed")
    for pattern in RUNTIME_DATA:
        found = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern))
        if not found:
            problems.append(f"no file matches {pattern} (update RUNTIME_DATA)")
        problems += [f"{name} is read at runtime but is not package data" for name in found if name not in data]
    return problems


def test_wheel_installs_exactly_the_top_level_folders_and_their_data():
    problems = packaging_problems(REPO)
    assert not problems, "pyproject.toml, [tool.setuptools]:\n" + "\n".join(problems)


def test_the_guard_fails_when_an_include_entry_or_a_data_pattern_is_dropped(tmp_path):
    """The same check on a copy of the tree whose pyproject.toml leaves out eval/ and the prompt templates."""
    for folder in TOP_LEVEL | NOT_INSTALLED:
        (tmp_path / folder).symlink_to(REPO / folder, target_is_directory=True)
    text = (REPO / "pyproject.toml").read_text()
    broken = (
        text.replace('"eval*", ', "")
        .replace('"*.txt", ', "")
        .replace('"prompt_templates/*.txt", "prompt_templates/*/*.txt"', "")
    )
    assert broken != text
    (tmp_path / "pyproject.toml").write_text(broken)
    shutil.copyfile(REPO / "README.md", tmp_path / "README.md")  # [project] readme
    problems = packaging_problems(tmp_path)
    assert any(p.startswith("top-level packages") and "'eval'" in p for p in problems), problems
    assert "eval/ has an __init__.py but is not installed" in problems
    assert "dig_common/prompt_templates/thinking.txt is read at runtime but is not package data" in problems


@pytest.mark.parametrize("name", sorted(TOP_LEVEL))
def test_no_other_distribution_provides_our_top_level_names(name):
    providers = importlib.metadata.packages_distributions().get(name, [])
    others = sorted({p for p in providers if p.lower().replace("_", "-") != DISTRIBUTION})
    assert others == [], f"{name!r} is also installed by {others}: one would shadow the other"


@pytest.mark.parametrize("name", sorted(TOP_LEVEL))
def test_each_top_level_name_imports_from_this_checkout(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(REPO), (name, module.__file__)
