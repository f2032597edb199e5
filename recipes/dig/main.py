"""Training entry point: verl's main_ppo on the DiG recipe config.

    python -m recipes.dig.main [HYDRA_OVERRIDE ...]     (launch/grpo_stage*.sh builds this command for you)

Same steps as ``verl.trainer.main_ppo.main`` (device auto-detection, ``validate_config``, ``run_ppo`` with the
V1 task runner), on ``config/dig_grpo.yaml``. Additions: relative data/checkpoint paths are made absolute
before Ray starts (workers do not share our cwd), a clear error when no GPU is visible, and a done-marker
in the experiment directory once the training loop returns, which the stage handoff reads, and the live picture
of training (``recipes/dig/live.py``: a thread that draws verl's validation dumps into TensorBoard/W&B).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf, open_dict

from dig_common.cli import USAGE_EXIT
from dig_common.fileio import atomic_write_text
from recipes.dig import live, rehearsal
from recipes.dig.handoff import DONE_MARKER, latest_step
from recipes.dig.preflight import check_gpu_environment
from recipes.dig.settings import LaunchError, env_flag, env_text


def absolutize_paths(config) -> None:
    """Resolve every path-valued setting against the launch cwd, in the driver, before Ray ships the config."""
    with open_dict(config):
        config.curriculum.data_dir = str(Path(config.curriculum.data_dir).expanduser().resolve())
        config.curriculum.ckpt_dir = str(Path(config.curriculum.ckpt_dir).expanduser().resolve())
        for key in ("train_files", "val_files"):
            value = config.data[key]
            paths = [value] if isinstance(value, str) else list(value)
            resolved = [str(Path(p).expanduser().resolve()) for p in paths]
            config.data[key] = resolved[0] if isinstance(value, str) else resolved
        config.trainer.default_local_dir = str(Path(config.trainer.default_local_dir).expanduser().resolve())
        model_path = Path(config.actor_rollout_ref.model.path).expanduser()
        if model_path.exists():  # a local HF dir (stage k > 1); a hub id stays as is
            config.actor_rollout_ref.model.path = str(model_path.resolve())


def write_done_marker(config) -> None:
    exp_dir = Path(config.trainer.default_local_dir)
    step = latest_step(exp_dir)
    if step is None:
        print(f"[dig] no checkpoint in {exp_dir} (trainer.save_freq <= 0?): the next stage cannot start from this one")
        return
    marker = exp_dir / DONE_MARKER
    record = {
        "global_step": step,
        "stage": int(config.curriculum.stage),
        "model": config.dig.model_name,
        "init_model": config.actor_rollout_ref.model.path,
    }
    atomic_write_text(marker, json.dumps(record, indent=2))
    print(f"[dig] stage {config.curriculum.stage} finished at global_step_{step}: {marker}")


PROG = "python -m recipes.dig.main"


def fail(message: object, status: int) -> None:
    """docs/cli.md's error style: one line, no traceback; 2 for bad input, 1 when training ran and stopped."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


# What a worker raises when CUDA or vLLM is missing (a CPU rehearsal against a Ray cluster that declares GPUs).
GPU_BOUNDARY_MARKERS = ("CUDA", "cuda", "NVIDIA", "NCCL", "nccl", "vllm", "vLLM")


def gpu_boundary(err: BaseException) -> str | None:
    """One line naming the stop when training failed for want of CUDA/vLLM on this machine; None otherwise."""
    import torch

    if torch.cuda.is_available():
        return None
    causes, seen = [], err
    while seen is not None and len(causes) < 10:
        causes.append(seen)
        seen = seen.__cause__ or seen.__context__
    lines = [line.strip() for c in causes for line in str(c).splitlines() if line.strip()]
    hit = next((line for line in reversed(lines) if any(m in line for m in GPU_BOUNDARY_MARKERS)), None)
    if hit is None:
        return None
    reason = "verl's workers need CUDA/vLLM, which this machine lacks"
    return f"training stopped at the GPU boundary: {reason} ({hit[:300]})"


def dynamic_sampling_stop(err: BaseException) -> str | None:
    """The bound's own message (recipes/dig/replay_buffer.py) when a step ran out of refills; Ray wraps the
    exception of the trainer actor, so it is found by its name in the text."""
    from recipes.dig.dynamic_sampling import DynamicSamplingExhausted

    name = DynamicSamplingExhausted.__name__
    for line in str(err).splitlines():
        if name in line and "dynamic sampling:" in line:
            return line.split(f"{name}: ", 1)[-1].strip()
    return None


@hydra.main(config_path="config", config_name="dig_grpo", version_base=None)
def main(config) -> None:
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    try:
        skip_gpu_check = env_flag("DIG_SKIP_GPU_CHECK")
        if config.trainer.device == "cuda" and not skip_gpu_check and not rehearsal.runs_on_cpu(config):
            check_gpu_environment(env_text("RAY_ADDRESS"))
    except LaunchError as err:
        fail(err, USAGE_EXIT)
    auto_set_device(config)
    absolutize_paths(config)
    OmegaConf.resolve(config)  # oc.env and ${dig.*} resolve here, not in a Ray worker with another env
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    if not config.trainer.use_v1:
        fail("trainer.use_v1=false (legacy trainer) is not supported by this recipe", USAGE_EXIT)
    try:
        with live.watching(config):  # validation pictures and reward curves while it trains (docs/watching.md)
            run_ppo(config, task_runner_class=TaskRunnerV1)
    except Exception as err:
        stop = dynamic_sampling_stop(err) or (None if rehearsal.runs_on_cpu(config) else gpu_boundary(err))
        if stop is None:
            raise
        fail(stop, 1)
    if not config.trainer.val_only:
        write_done_marker(config)


if __name__ == "__main__":
    main()
