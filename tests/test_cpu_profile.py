"""profile=cpu lives in one config group file and one workaround module; a GPU run composes without either."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dig_common.models import model_names
from recipes.dig import rehearsal
from recipes.dig.launch import compose

GPU_MODELS = [m for m in model_names() if not m.startswith("tiny_")]
PROFILE_FILE = Path(rehearsal.__file__).parents[1] / "config" / "profile" / "cpu.yaml"


def leaves(cfg, prefix=""):
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from leaves(value, path + ".")
        else:
            yield path, value


@pytest.mark.parametrize("model", GPU_MODELS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_gpu_run_composes_without_the_profile(model, stage):
    overrides = [f"base_model={model}", f"stage=stage{stage}"]
    gpu = compose(overrides)
    # the defaults list's `profile: null` contributes nothing: same config as with the entry removed
    assert OmegaConf.to_container(gpu) == OmegaConf.to_container(compose([*overrides, "~profile"]))
    text = OmegaConf.to_yaml(gpu, resolve=False)
    assert "rehearsal" not in text and "VERL_PLATFORM" not in text and "VERL_USE_EXTERNAL_MODULES" not in text
    assert not rehearsal.runs_on_cpu(gpu)
    cpu = compose([*overrides, "profile=cpu"])
    assert rehearsal.runs_on_cpu(cpu)
    # every key the profile sets differs in the GPU config or is absent there (else the profile would not need it)
    profile = OmegaConf.to_container(OmegaConf.load(PROFILE_FILE))
    gpu_values = dict(leaves(OmegaConf.to_container(gpu)))
    cpu_values = dict(leaves(OmegaConf.to_container(cpu)))
    for key, _ in leaves(profile):
        assert key in cpu_values, key
        if key in gpu_values and not key.startswith("ray_kwargs.ray_init.runtime_env.env_vars."):
            assert gpu_values[key] != cpu_values[key], f"profile=cpu sets {key} to the GPU run's own value"


def test_the_workarounds_load_only_through_the_profile():
    """Importing the recipe (launcher, main, reward, verl) never imports cpu_verl; the CPU profile names it for Ray."""
    probe = (
        "import sys, verl, recipes.dig.launch, recipes.dig.main, reward_fns.dig_reward; "
        f"sys.exit({rehearsal.PLATFORM_MODULE!r} in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_PLATFORM")}
    assert subprocess.run([sys.executable, "-c", probe], env=env, timeout=120).returncode == 0
    env = compose(["profile=cpu"]).ray_kwargs.ray_init.runtime_env.env_vars
    assert env.VERL_USE_EXTERNAL_MODULES.split(",") == [rehearsal.PLATFORM_MODULE]
    assert env.VERL_PLATFORM == "cpu"
