"""The README's main command on a machine without a GPU stops at once, installs nothing and points to the CPU
rehearsal; with a GPU listed it goes on to the environment check (never reached on CPU before this change: the
setup downloaded 3.7 GB and built flash-attn for 12 minutes first)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path):
    """The launch scripts in a throwaway root, so a wrong turn cannot build .venv-gpu in the checkout."""
    for part in ("launch", "scripts"):
        shutil.copytree(REPO / part, tmp_path / part)
    return tmp_path


def run_main_command(root: Path, path: str, *args: str, **env) -> subprocess.CompletedProcess:
    """``SETUP_ENV=1 bash launch/curriculum.sh ARGS`` with ``env`` on top (the README's main command)."""
    clean = {
        k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "RAY_ADDRESS", "DIG_SKIP_GPU_CHECK", "DIG_PYTHON")
    }
    clean.update({"PATH": path, "SETUP_ENV": "1", **env})
    return subprocess.run(
        ["bash", str(root / "launch" / "curriculum.sh"), *args],
        cwd=root,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def fake_nvidia_smi(folder: Path, listing: str) -> str:
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\n")
    tool.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def test_no_gpu_stops_before_any_setup_with_the_rehearsal_pointer(repo_copy, tmp_path):
    for path in ("/usr/bin:/bin", fake_nvidia_smi(tmp_path / "empty", "")):  # no nvidia-smi, or one listing nothing
        result = run_main_command(repo_copy, path)
        assert result.returncode == 2, result.stderr
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert "no GPU" in lines[0] and "bash launch/cpu_rehearsal.sh" in lines[0]
        assert not (repo_copy / ".venv-gpu").exists() and not (repo_copy / ".venv-render").exists()


def test_a_listed_gpu_goes_on_to_the_environment_check(repo_copy, tmp_path):
    path = fake_nvidia_smi(tmp_path / "gpu", "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\n")
    # DIG_PYTHON without verl: the environment check (the step after the GPU check) names what is missing
    result = run_main_command(repo_copy, path, DIG_PYTHON="/usr/bin/python3", SETUP_ENV="0")
    assert result.returncode != 0
    assert "no GPU" not in result.stderr and "cannot import verl" in result.stderr


def test_dry_run_and_the_rehearsal_profile_skip_the_gpu_check(repo_copy):
    for env, args in (({"DRY_RUN": "1"}, []), ({}, ["profile=cpu"])):
        result = run_main_command(
            repo_copy, "/usr/bin:/bin", *args, DIG_PYTHON="/usr/bin/python3", SETUP_ENV="0", **env
        )
        assert "no GPU" not in result.stderr and "cannot import verl" in result.stderr, (env, args, result.stderr)
