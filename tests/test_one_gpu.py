"""One GPU with LoRA (profile=1gpu, tuning=lora) and dynamic sampling (algorithm.filter_groups): what the launcher
composes, checks and prints, and the replay buffer's bound. The CPU rehearsal (tests/test_cpu_rehearsal.py) runs
both for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_launch_preflight import dirs, launch_env, one_line_error  # noqa: F401 (fixture)

from recipes.dig import launch
from recipes.dig.compose import compose

REPO = Path(__file__).resolve().parents[1]
ONE_GPU_MODELS = ["qwen2_5_vl_3b", "qwen3_vl_4b_thinking"]


@pytest.mark.parametrize("model", ONE_GPU_MODELS)
def test_the_one_gpu_lora_dry_run_validates_and_says_what_it_chose(tmp_path, model):
    """The command users type (README, "One GPU"), as a process."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "GPUS_PER_NODE", "NNODES")}
    env["DRY_RUN"] = "1"
    argv = [f"base_model={model}", "profile=1gpu", "tuning=lora", *dirs(tmp_path)]
    done = subprocess.run(
        ["bash", "launch/grpo_stage1.sh", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "[dig] GPUs: 1 node(s) x 1; rollout TP 1, n=8, batch 16 prompts" in out
    assert "[dig] profile: 1gpu" in out
    assert "[dig] tuning: LoRA (tuning=lora) rank 64, alpha 128, on all-linear except .*visual.*; lr 1e-05" in out
    assert "reference none (LoRA: the actor)" in out and "optimizer offload on" in out
    assert "[dig] dynamic sampling: off" in out
    assert "DRY_RUN: stage 1 OK" in out and "profile=1gpu tuning=lora" in out


def test_lora_keys_reach_verl_where_it_reads_them():
    cfg = compose(["base_model=qwen3_vl_4b_thinking", "tuning=lora", "profile=1gpu"])
    model = cfg.actor_rollout_ref.model
    assert (model.lora_rank, model.lora_alpha, model.target_modules) == (64, 128, "all-linear")
    assert model.exclude_modules == ".*visual.*" and model.lora.merge is False
    assert cfg.actor_rollout_ref.rollout.load_format == "safetensors"
    assert (
        cfg.trainer.n_gpus_per_node,
        cfg.trainer.nnodes,
        cfg.actor_rollout_ref.rollout.tensor_model_parallel_size,
    ) == (
        1,
        1,
        1,
    )
    # what verl's FSDP engine hands peft (verl/workers/engine/fsdp/transformer_impl.py, _build_lora_module)
    import re

    assert re.fullmatch(model.exclude_modules, "model.visual.blocks.3.mlp.linear_fc1")
    assert not re.fullmatch(model.exclude_modules, "model.language_model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_full_tuning_is_the_default_and_changes_nothing(stage):
    overrides = ["base_model=qwen2_5_vl_7b", f"stage=stage{stage}"]
    default = OmegaConf.to_container(compose(overrides))
    assert default == OmegaConf.to_container(compose([*overrides, "tuning=full"]))
    assert default == OmegaConf.to_container(compose([*overrides, "~tuning"]))
    assert default["actor_rollout_ref"]["model"]["lora_rank"] == 0


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["tuning=lora", "actor_rollout_ref.model.lora_rank=12"], "vLLM serves LoRA ranks"),
        (["tuning=lora", "actor_rollout_ref.model.exclude_modules=null"], "leaves the vision tower under LoRA"),
        (["tuning=lora", "actor_rollout_ref.model.exclude_modules=.*vision.*"], "leaves the vision tower"),
        (["algorithm.filter_groups.enable=true", "algorithm.filter_groups.metric=acc_x"], "metric='acc_x'"),
        (["algorithm.filter_groups.enable=true", "algorithm.filter_groups.max_num_gen_batches=0"], "refill forever"),
        (
            ["algorithm.filter_groups.enable=true", "trainer.v1.trainer_mode=colocate_async"],
            "trainer.v1.trainer_mode=sync",
        ),
    ],
)
def test_lora_and_dynamic_sampling_mistakes_are_refused_in_one_line(launch_env, capsys, overrides, why):  # noqa: F811
    err = one_line_error(capsys, ["--stage", "1", "base_model=qwen2_5_vl_3b", *overrides], launch_env)
    assert why in err


def test_dynamic_sampling_on_is_described(launch_env):  # noqa: F811
    settings = launch.Settings.from_env(1, [*dirs(launch_env), "algorithm.filter_groups.enable=true"])
    text = launch.describe(launch.plan_stage(settings))
    assert "[dig] dynamic sampling: on: groups whose 'reward' is equal across the 8 samples are replaced; " in text
    assert "at most 4 x 64 prompts per step" in text


# ---------------------------------------------------------------------------------------------- the bound


def replay_buffer(enable: bool, refills: list[int], max_batches: int = 3, batch: int = 4):
    from recipes.dig.replay_buffer import BoundedReplayBuffer

    kwargs = {
        "filter_groups": {"enable": enable, "metric": "reward", "max_num_gen_batches": max_batches},
        "train_batch_size": batch,
        "gen_batch_size": None,
        "sync_refill_failed_groups": False,
    }
    return BoundedReplayBuffer("sync", {}, None, "drop", kwargs, refill_fn=lambda n: refills.append(n) or n)


def test_the_bound_stops_a_step_that_keeps_refilling():
    from recipes.dig.replay_buffer import DynamicSamplingExhausted

    refills: list[int] = []
    buffer = replay_buffer(True, refills)
    # what verl's trainer would have passed its own buffer with dynamic sampling on (trainer_base.py 165-184)
    assert (buffer.filter_groups_metric, buffer.gen_batch_size, buffer.train_batch_size) == ("reward", 1, 4)
    assert buffer.max_inflight_gen_batches == 1
    buffer._step, buffer._generated = 7, 4  # what sample() sets: the step's first batch is out
    buffer._bounded_refill(4)
    buffer._bounded_refill(2)
    buffer._bounded_refill(2)  # 12 prompts = 3 batches of 4: the bound, reached, not passed
    with pytest.raises(DynamicSamplingExhausted) as err:
        buffer._bounded_refill(1)
    assert refills == [4, 2, 2]
    message = str(err.value)
    assert "training step 7 generated 12 prompts" in message and "max_num_gen_batches=3" in message
    assert "rerun the same command to resume" in message


def test_without_dynamic_sampling_the_buffer_is_verls():
    refills: list[int] = []
    buffer = replay_buffer(False, refills)
    assert buffer.filter_groups_metric is None and buffer.gen_batch_size == 4
    buffer._step, buffer._generated = 1, 4
    for _ in range(10):  # failed-group refills are verl's business, never bounded here
        buffer._bounded_refill(4)
    assert refills == [4] * 10


def test_the_recipe_plugs_the_bounded_buffer_into_verl():
    from verl.utils.import_utils import load_extern_object

    from recipes.dig.replay_buffer import BoundedReplayBuffer

    cfg = compose(["base_model=qwen2_5_vl_3b", "algorithm.filter_groups.enable=true"])
    sampler = cfg.trainer.v1.sampler
    assert load_extern_object(sampler.custom_sampler.path, sampler.custom_sampler.name) is BoundedReplayBuffer
    kwargs = OmegaConf.to_container(sampler.sampler_kwargs, resolve=True)
    assert kwargs["filter_groups"]["enable"] is True and kwargs["train_batch_size"] == cfg.data.train_batch_size
    assert sys.modules.get("recipes.dig.rehearsal.cpu_verl") is None


def test_every_key_of_the_one_gpu_profile_changes_something():
    """profile=1gpu sets nothing that every GPU cluster run already has (else the profile would not need it)."""
    from test_cpu_profile import GPU_MODELS, leaves

    profile_file = REPO / "recipes" / "dig" / "config" / "profile" / "1gpu.yaml"
    profile = dict(leaves(OmegaConf.to_container(OmegaConf.load(profile_file))))
    changes = dict.fromkeys(profile, False)
    for model in GPU_MODELS:
        cluster = dict(leaves(OmegaConf.to_container(compose([f"base_model={model}"]))))
        one_gpu = dict(leaves(OmegaConf.to_container(compose([f"base_model={model}", "profile=1gpu"]))))
        for key, value in profile.items():
            assert one_gpu[key] == value, (model, key)
            changes[key] |= cluster.get(key) != value
    assert all(changes.values()), [key for key, changed in changes.items() if not changed]
