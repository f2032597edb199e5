"""Environment knobs: one truth table for booleans in Python and bash, one knob table in docs/launch.md."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from recipes.dig import settings as launch_settings
from recipes.dig.settings import KNOBS, REMOVED_KNOBS, LaunchError, Settings, knob_table, parse_bool

REPO = Path(__file__).resolve().parents[1]
COMMON_SH = REPO / "launch" / "common.sh"
BOOL_INPUTS = ["1", "0", "true", "false", "yes", "no", "TRUE", "False", "Yes", " 1 ", "", "2", "on", "off", "maybe"]


def bash_bool(value: str | None, *extra: str, func: str = "dig_bool DRY_RUN") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN" and not k.startswith("SLURM")}
    if value is not None:
        env["DRY_RUN"] = value
    for item in extra:
        key, val = item.split("=", 1)
        env[key] = val
    return subprocess.run(
        ["bash", "-c", f"source {COMMON_SH} && {func}"], env=env, capture_output=True, text=True, timeout=30
    )


def python_bool(value: str | None) -> int | str:
    try:
        return int(parse_bool("DRY_RUN", value))
    except LaunchError as err:
        return str(err)


@pytest.mark.parametrize("value", BOOL_INPUTS + [None])
def test_bash_and_python_share_the_boolean_truth_table(value):
    py = python_bool(value)
    sh = bash_bool(value)
    if isinstance(py, int):
        assert (sh.returncode, sh.stdout.strip()) == (0, str(py)), sh.stderr
    else:
        assert sh.returncode != 0
        assert "DRY_RUN=" in py and "DRY_RUN=" in sh.stderr
        assert "expected one of 1/true/yes/0/false/no" in py and "expected one of 1/true/yes/0/false/no" in sh.stderr


def test_launcher_refuses_an_unknown_boolean_by_name():
    with pytest.raises(LaunchError, match=r"DRY_RUN='maybe'"):
        Settings.from_env(1, [], env={"DRY_RUN": "maybe"})
    with pytest.raises(LaunchError, match=r"DIG_ASSUME_PREVIOUS='on'"):
        Settings.from_env(1, [], env={"DIG_ASSUME_PREVIOUS": "on"})
    assert Settings.from_env(1, [], env={"DRY_RUN": "false"}).dry_run is False
    assert Settings.from_env(1, [], env={"DRY_RUN": "yes"}).dry_run is True


def test_sbatch_ray_gpus_follow_the_launchers_dry_run_meaning():
    """DRY_RUN=false is a real run everywhere: the sbatch script's Ray declares the GPUs (was: 0, a dry run)."""
    assert bash_bool("false", func="dig_ray_gpus 8").stdout.strip() == "8"
    assert bash_bool("0", func="dig_ray_gpus 8").stdout.strip() == "8"
    assert bash_bool("true", func="dig_ray_gpus 8").stdout.strip() == "0"
    assert bash_bool("1", "SLURM_GPUS_PER_NODE=h100:8", func="dig_ray_gpus 8").stdout.strip() == "8"
    refused = bash_bool("nope", func="dig_ray_gpus 8")
    assert refused.returncode != 0 and "DRY_RUN='nope'" in refused.stderr


def test_docs_knob_table_is_the_parsers():
    docs = (REPO / "docs" / "launch.md").read_text()
    assert knob_table() in docs, "docs/launch.md's knob table differs: paste `python -m recipes.dig.settings`"
    documented = re.findall(r"^\| `([A-Z_]+)` \|", docs, flags=re.M)
    assert documented == [k.name for k in KNOBS] + list(REMOVED_KNOBS)


@pytest.mark.parametrize("name", sorted(REMOVED_KNOBS))
def test_a_removed_knob_stops_the_launch_naming_its_override(name):
    """One channel per setting: a variable that used to carry a setting is refused, naming the Hydra key."""
    with pytest.raises(LaunchError) as err:
        Settings.from_env(1, [], env={name: "2"})
    message = str(err.value)
    assert message.startswith(f"{name}='2': ") and REMOVED_KNOBS[name] in message and "\n" not in message
    assert Settings.from_env(1, [], env={name: " "}).stage == 1  # empty is unset


def test_settings_come_from_overrides_with_the_yaml_defaults(tmp_path, monkeypatch):
    from recipes.dig.settings import REPO_ROOT, config_defaults, default_model

    defaults = Settings.from_env(1, ["trainer.save_freq=5"], env={})
    assert defaults.model == default_model() == "qwen3_vl_8b_thinking"
    assert defaults.data_dir == REPO_ROOT / config_defaults()["curriculum"]["data_dir"]
    assert defaults.ckpt_dir == REPO_ROOT / config_defaults()["curriculum"]["ckpt_dir"]
    monkeypatch.chdir(tmp_path)  # a given relative path is the user's: against the cwd
    given = Settings.from_env(
        1, ["base_model=qwen2_5_vl_3b", "curriculum.data_dir=d", "++curriculum.ckpt_dir=c", "x.y=1"], env={}
    )
    assert (given.model, given.data_dir, given.ckpt_dir) == ("qwen2_5_vl_3b", tmp_path / "d", tmp_path / "c")
    assert given.extra_overrides == ["x.y=1"]


def test_the_default_model_has_one_home():
    """dig_grpo.yaml's defaults list names the default model; the data and eval tools' default must agree."""
    from dig_common.models import DEFAULT_MODEL
    from recipes.dig.settings import default_model

    assert default_model() == DEFAULT_MODEL


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.name)
def test_every_knob_is_read_where_the_table_says(knob):
    """The table is not a wish list: each variable appears in the file that reads it."""
    reader = Path(launch_settings.__file__) if knob.reader == "launcher" else REPO / knob.reader
    assert re.search(rf"\b{knob.name}\b", reader.read_text()), f"{knob.name} not read in {reader}"


def test_shell_scripts_read_no_undocumented_knob():
    names = {k.name for k in KNOBS}
    # variables the scripts set for themselves or get from SLURM / Ray
    internal = {"DIG_REPO", "PYTHONPATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "SECONDS", "PWD"}
    for script in [*sorted((REPO / "launch").glob("*.sh")), REPO / "launch" / "slurm" / "dig_grpo.sbatch"]:
        for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*)[:}-]", script.read_text()):
            if name.startswith("SLURM_") or name in internal:
                continue
            assert name in names, f"{script.name} reads ${name}, which the knob table does not list"
