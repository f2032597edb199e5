"""The GPU setup path on CPU: scripts/setup_gpu.sh's arguments, its refusal of a non-venv Python, a real run
into a throwaway venv (``--cpu-rehearsal``: a small stand-in for requirements.txt, everything else as on a GPU
node) and its idempotence, the flash-attn fallback, SETUP_ENV=1 in the launcher, and requirements.txt resolving
against PyPI in a fresh venv.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "setup_gpu.sh"
# the interpreter .venv was made from: a base (non-venv) Python, as a system one would be
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}")
NETWORK_ERRORS = re.compile(
    r"ConnectionError|ConnectTimeout|ReadTimeout|Read timed out|Max retries exceeded|Temporary failure in name "
    r"resolution|Name or service not known|Connection (reset|refused|aborted)|HTTP error 5\d\d|Network is unreachable",
    re.IGNORECASE,
)


def setup_gpu(*args, env=None, timeout=600):
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def with_network_retries(run, what, attempts=3):
    """``run()`` again after a transient network error; then fail saying it was the network."""
    for attempt in range(attempts):
        result = run()
        output = result.stdout + result.stderr
        if result.returncode == 0 or not NETWORK_ERRORS.search(output):
            return result
        time.sleep(5 * (attempt + 1))
    pytest.fail(
        f"network: {what} could not reach the package registry (PyPI) after {attempts} tries:\n{output[-3000:]}"
    )


def test_help_and_argument_errors(tmp_path):
    help_ = setup_gpu("--help")
    assert help_.returncode == 0
    for option in (
        "--venv",
        "--into",
        "--flash-attn",
        "--flash-attn-wheel",
        "--render",
        "--cpu-rehearsal",
        "--dry-run",
    ):
        assert option in help_.stdout
    for args, message in [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--venv"], "--venv needs a value"),
        (["--flash-attn", "maybe"], "--flash-attn must be auto, require or skip, got 'maybe'"),
        (["--flash-attn", "skip", "--flash-attn-wheel", "fa.whl"], "contradict"),
        (["--requirements", tmp_path / "missing.txt"], "requirements file not found"),
    ]:
        result = setup_gpu(*args, "--dry-run")
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "--help" in result.stderr


def test_refuses_a_python_that_is_not_a_venvs(tmp_path):
    assert subprocess.run([BASE_PYTHON, "-c", "import sys; assert sys.prefix == sys.base_prefix"]).returncode == 0
    result = setup_gpu("--into", BASE_PYTHON)
    assert result.returncode == 2
    assert f"refusing to install into {BASE_PYTHON}: it is not a virtual environment's Python" in result.stderr
    assert "fix: run 'bash scripts/setup_gpu.sh'" in result.stderr and "DIG_PYTHON" in result.stderr
    assert "+ " not in result.stdout  # no command was run
    not_a_venv = tmp_path / "plain"
    (not_a_venv / "bin").mkdir(parents=True)
    result = setup_gpu("--venv", not_a_venv, "--dry-run")
    assert result.returncode == 2 and "exists but is not a venv (no pyvenv.cfg)" in result.stderr


def test_launcher_setup_env_never_installs_into_a_system_python():
    """SETUP_ENV=1 with a base interpreter: the setup refuses (naming the fix) instead of pip-installing into it."""
    result = subprocess.run(
        ["bash", "-c", f'source "{REPO}/launch/common.sh"; dig_check_env "$1"', "_", BASE_PYTHON],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SETUP_ENV": "1", "DIG_RENDER_PYTHON": BASE_PYTHON},
    )
    assert result.returncode == 1
    assert "setup_gpu.sh" in result.stderr and "refusing to install into" in result.stderr


def check_env(py, **env):
    return subprocess.run(
        ["bash", "-c", f'source "{REPO}/launch/common.sh"; dig_check_env "$1"', "_", str(py)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DIG_RENDER_PYTHON": BASE_PYTHON, **env},
    )


@pytest.mark.parametrize("step", ["stack", "flash-attn"])
def test_a_setup_killed_at_a_step_is_named_by_the_launcher_and_finished_by_setup_env(tmp_path, step):
    """A setup that stopped half way (here SIGKILLed at a chosen step) leaves its marker and no stamp; the
    launcher, DRY_RUN included, refuses that venv naming the step, and SETUP_ENV=1 reruns the setup."""
    venv = tmp_path / "venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    (venv / ".dig-gpu-stamp").write_text("a stamp from an earlier, finished setup\n")
    empty = tmp_path / "requirements.txt"
    empty.write_text("")
    # the steps before flash-attn need the package index; only "stack" is reached offline
    kill_at = "stack" if step == "flash-attn" else step
    result = setup_gpu("--into", py, "--cpu-rehearsal", "--requirements", empty, env={"DIG_SETUP_STOP_AT": kill_at})
    assert result.returncode == -9, result.stderr  # SIGKILL
    assert (venv / ".dig-gpu-setup-unfinished").read_text() == f"{kill_at}\n"
    assert not (venv / ".dig-gpu-stamp").exists()  # the old stamp no longer vouches for this venv
    if step == "flash-attn":  # what a setup killed while compiling flash-attn leaves behind
        (venv / ".dig-gpu-setup-unfinished").write_text("flash-attn\n")

    refused = check_env(py, DRY_RUN="1")
    assert refused.returncode == 1
    assert f"the GPU setup of {venv} stopped at step '{step}' and never finished" in refused.stderr
    assert "SETUP_ENV=1" in refused.stderr and "cannot import" not in refused.stderr

    # SETUP_ENV=1 finishes it: the setup runs again (killed again here, before it would reach the index)
    finishing = check_env(py, SETUP_ENV="1", DIG_SETUP_STOP_AT="stack")
    assert finishing.returncode == 1
    assert f"the GPU setup of {venv} stopped at step '{step}': finishing it" in finishing.stderr
    assert "setup_gpu: killed at step 'stack'" in finishing.stderr


def test_dry_run_plans_every_step_and_changes_nothing(tmp_path):
    venv = tmp_path / "venv"
    result = setup_gpu("--venv", venv, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = [re.search(rf"step {k}/5 (\w[\w-]*)", out) for k in range(1, 6)]
    assert [m.group(1) for m in steps if m] == ["venv", "stack", "recipe", "flash-attn", "imports"]
    assert f"-m pip install -r {REPO / 'requirements.txt'}" in out
    assert f"-m pip install -e {REPO} --no-deps" in out
    jobs = int(re.search(r"env MAX_JOBS=(\d+) \S+ -m pip install --no-build-isolation flash-attn==", out).group(1))
    assert 1 <= jobs <= os.cpu_count()
    assert "torch vllm verl hydra recipes.dig.launch" in out
    assert not venv.exists()
    # MAX_JOBS from the environment wins; a wheel replaces the build
    assert "env MAX_JOBS=3 " in setup_gpu("--venv", venv, "--dry-run", env={"MAX_JOBS": "3"}).stdout
    wheel = "https://example.invalid/flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl"
    planned = setup_gpu("--venv", venv, "--dry-run", env={"FLASH_ATTN_WHEEL": wheel}).stdout
    assert f"-m pip install --no-deps {wheel}" in planned and "--no-build-isolation" not in planned


@pytest.mark.registry
@pytest.mark.slow
def test_setup_into_a_throwaway_venv_is_idempotent_and_falls_back_without_flash_attn(tmp_path):
    venv = tmp_path / "gpu-venv"
    standin = tmp_path / "requirements.txt"
    standin.write_text("pyyaml\n")  # what the recipe's own packages import; the GPU stack has no CPU wheels here
    common = ["--venv", venv, "--requirements", standin, "--cpu-rehearsal"]

    first = with_network_retries(lambda: setup_gpu(*common), "setup_gpu.sh's first run")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "step 4/5 flash-attn: skipped" in first.stdout and (venv / ".dig-gpu-stamp").is_file()
    assert re.search(r"(?im)^pyyaml==", (venv / "requirements-frozen.txt").read_text())
    python = venv / "bin" / "python"
    # the editable install, imported from outside the checkout
    probe = "import recipes.dig.attention as a, sys; sys.exit(a.__file__.startswith(sys.argv[1]) is False)"
    assert subprocess.run([python, "-c", probe, str(REPO)], cwd=tmp_path).returncode == 0

    start = time.monotonic()
    again = setup_gpu(*common)
    assert again.returncode == 0 and "is up to date" in again.stdout
    assert "+ " not in again.stdout and time.monotonic() - start < 5

    # flash-attn asked for but impossible (a wheel that is not there): goes on without it and says so; the
    # changed input reruns the steps instead of trusting the stamp
    bad_wheel = tmp_path / "flash_attn-0-cp311-cp311-linux_x86_64.whl"
    fallback = with_network_retries(
        lambda: setup_gpu(*common, "--flash-attn", "auto", "--flash-attn-wheel", bad_wheel), "the fallback run"
    )
    assert fallback.returncode == 0, fallback.stdout + fallback.stderr
    assert "step 2/5 stack" in fallback.stdout and "going on WITHOUT it" in fallback.stdout
    assert "training uses sdpa" in (venv / ".dig-flash-attn").read_text()
    from recipes.dig.attention import flash_attn_available

    assert flash_attn_available(str(python)) is False

    required = with_network_retries(
        lambda: setup_gpu(*common, "--flash-attn", "require", "--flash-attn-wheel", bad_wheel), "the require run"
    )
    assert required.returncode == 1
    assert "FAILED at step 'flash-attn'" in required.stderr and "fix: point --flash-attn-wheel" in required.stderr


@pytest.mark.registry
@pytest.mark.slow
def test_requirements_resolve_in_a_fresh_venv_against_pypi(tmp_path):
    """What a fresh GPU node gets from `pip install -r requirements.txt`: resolved against PyPI alone.

    This machine's pip configuration (extra local indexes, a torch cap) is switched off so that only PyPI
    answers; a recent pip (this venv's) installs into the fresh interpreter with ``--python``.
    """
    requirements = (REPO / "requirements.txt").read_text()
    assert not re.search(r"^\s*flash[-_]attn", requirements, re.MULTILINE | re.IGNORECASE)
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", fresh], check=True)
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    command = [sys.executable, "-m", "pip", "--python", fresh / "bin" / "python", "install", "--dry-run"]
    command += ["--ignore-installed", "--index-url", "https://pypi.org/simple", "--report", report]
    command += ["-r", REPO / "requirements.txt"]

    def resolve():
        return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)

    result = with_network_retries(resolve, "pip install --dry-run -r requirements.txt")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resolved = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    pins = {"verl": "0.9.1", "vllm": "0.24.0", "torch": "2.11.0", "transformers": "5.5.3"}
    assert {name: resolved.get(name) for name in pins} == pins
    assert "flash-attn" not in resolved and "flash_attn" not in resolved
