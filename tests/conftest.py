"""Shared pytest behaviour. Fixtures that build models live in tiny_qwen.py (imported by bare name)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `render` need the Blender venv. Without it they are skipped with the fix to apply, except
    in CI, where a missing render venv must fail loudly rather than hide behind skips."""
    from data_prep.render.generate import RenderEnvError, render_python

    try:
        render_python()
        return
    except RenderEnvError as err:
        reason = str(err)
    if os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "render" in item.keywords:
            item.add_marker(skip)
