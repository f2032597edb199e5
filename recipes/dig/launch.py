"""One implementation behind launch/grpo_stage{1,2,3}.sh, launch/curriculum.sh and launch/slurm/*.sbatch.

    python -m recipes.dig.launch --stage K [--status] [HYDRA_OVERRIDE ...]
    python -m recipes.dig.launch --curriculum 1 2 3 [HYDRA_OVERRIDE ...]

The environment is read once (recipes/dig/settings.py). For one curriculum stage the launcher composes the exact
config the run will use (recipes/dig/compose.py), runs verl's validate_config, loads the reward through verl's
loader and checks the data and the initial weights (recipes/dig/preflight.py, recipes/dig/handoff.py), prints
that plan, then either stops (DRY_RUN) or builds missing data, merges the stage k-1 checkpoint if needed and
starts ``python -m recipes.dig.main <overrides>``. A dry run and a real run take the same route: the same
resolved settings plan every stage, and the real run executes the plan it printed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dig_common.cli import cli_main, tool_parser
from dig_common.models import ModelSpec
from recipes.dig import rehearsal
from recipes.dig.attention import (
    AttentionChoice,
    AttentionError,
    choose_attention,
    flash_attn_available,
    user_overrides,
)
from recipes.dig.compose import (
    check_override_syntax,
    check_override_types,
    compose,
    hydra_value,
    model_overlay_dir,
    resolve_model,
    stage_overrides,
    validate,
)
from recipes.dig.handoff import (
    DONE_MARKER,
    Handoff,
    experiment_dir,
    merged_weights,
    plan_handoff,
    run_merge,
    stage_done,
)
from recipes.dig.preflight import (
    DataReport,
    check_data,
    check_gpu_environment,
    check_mini_batches,
    check_reward_config,
    load_reward,
    visible_gpus,
    wandb_credentials,
)
from recipes.dig.settings import REPO_ROOT, STAGES, LaunchError, Settings, override_key, take_override


@dataclass
class Plan:
    settings: Settings
    spec: ModelSpec
    cfg: object
    overrides: list[str]
    handoff: Handoff
    data: DataReport
    reward_probe: object
    overlay_dir: Path | None
    attention: AttentionChoice

    def train_command(self) -> list[str]:
        return [self.settings.python, "-m", "recipes.dig.main", *self.overrides]


# flash-attn is probed in the training interpreter once per launcher process (a subprocess import)
flash_attn_in = functools.lru_cache(maxsize=None)(flash_attn_available)


def attention_overrides(spec: ModelSpec, settings: Settings, cfg) -> tuple[AttentionChoice, list[str]]:
    """The backend for this run (``cfg``: the stage composed without it, for the sequence-parallel size)."""
    sp_size = int(cfg.actor_rollout_ref.actor.get("ulysses_sequence_parallel_size", 1) or 1)
    try:
        user_attn, user_padding = user_overrides(settings.extra_overrides)
        choice = choose_attention(spec, flash_attn_in(settings.python), user_attn, user_padding, sp_size)
    except AttentionError as err:
        raise LaunchError(f"attention backend: {err}") from err
    given = {override_key(o) for o in settings.extra_overrides}
    return choice, [o for o in choice.overrides() if override_key(o) not in given]


def plan_stage(settings: Settings, overlay_root: Path | None = None) -> Plan:
    """Everything a stage run needs, checked, without starting anything. Raises LaunchError."""
    stage = settings.stage
    if stage not in STAGES:
        raise LaunchError(f"stage {stage}: expected one of {STAGES}")
    check_override_syntax(settings.extra_overrides)
    spec, model_option, model_path = resolve_model(settings)
    overlay = None
    if model_path is not None:
        overlay = model_overlay_dir(model_path, overlay_root or Path(tempfile.mkdtemp(prefix="dig_model_")))
    model_ref = str(model_path) if model_path else model_option

    prev_cfg = None
    if stage > 1 and not settings.init_model:
        prev_cfg = compose(stage_overrides(settings, stage - 1, model_option, overlay) + settings.extra_overrides)
    handoff = plan_handoff(settings, stage, prev_cfg, spec)

    overrides = stage_overrides(settings, stage, model_option, overlay)
    if stage > 1 or settings.init_model:
        overrides.append(f"actor_rollout_ref.model.path={hydra_value(handoff.init_path)}")
    attention, attention_args = attention_overrides(spec, settings, compose(overrides + settings.extra_overrides))
    overrides += attention_args + settings.extra_overrides
    cfg = compose(overrides)
    if settings.extra_overrides:
        check_override_types(
            compose(overrides[: len(overrides) - len(settings.extra_overrides)]), cfg, settings.extra_overrides
        )
    validate(cfg)
    check_mini_batches(cfg)
    check_reward_config(cfg, spec)
    probe = load_reward(cfg)
    data = check_data(cfg, spec, settings, stage, model_ref)
    return Plan(settings, spec, cfg, overrides, handoff, data, probe, overlay, attention)


def describe(plan: Plan) -> str:
    cfg, s = plan.cfg, plan.settings
    rollout = cfg.actor_rollout_ref.rollout
    val = rollout.val_kwargs
    sampling = "greedy" if not val.do_sample else f"temperature {val.temperature}, top_p {val.top_p}, top_k {val.top_k}"
    lines = [
        f"[dig] stage {s.stage} | model {plan.spec.model_name} ({plan.spec.hf_path}, coord_mode={plan.spec.coord_mode})",
        f"[dig] GPUs: {cfg.trainer.nnodes} node(s) x {cfg.trainer.n_gpus_per_node}; rollout TP "
        f"{rollout.tensor_model_parallel_size}, n={rollout.n}, batch {cfg.data.train_batch_size} prompts, "
        f"{cfg.trainer.total_epochs} epochs",
        f"[dig] experiment: {cfg.trainer.project_name}/{cfg.trainer.experiment_name} -> {cfg.trainer.default_local_dir}"
        f" (resume_mode={cfg.trainer.resume_mode})",
        f"[dig] init weights: {plan.handoff.init_path} [{plan.handoff.note}]",
        f"[dig] {plan.attention.describe()}",
        f"[dig] validation decoding: {sampling}, n={val.n}",
        f"[dig] profile: {take_override('profile', s.extra_overrides)[0] or 'none (a GPU cluster: dig_grpo.yaml as it stands)'}",
        f"[dig] tuning: {describe_tuning(cfg)}",
        f"[dig] memory: {describe_memory(cfg)}",
        f"[dig] dynamic sampling: {describe_dynamic_sampling(cfg)}",
    ]
    if plan.handoff.merge_command:
        lines.append(f"[dig] merge: {shlex.join(plan.handoff.merge_command)}")
    lines += [f"[dig] {line}" for line in plan.data.lines]
    lines.append(
        f"[dig] reward: {cfg.reward.custom_reward_function.path}::{cfg.reward.custom_reward_function.name} "
        f"loaded by verl (probe on a malformed answer: {plan.reward_probe})"
    )
    lines.append(f"[dig] logger: {list(cfg.trainer.logger)}; validate_config: passed")
    return "\n".join(lines)


def describe_tuning(cfg) -> str:
    model = cfg.actor_rollout_ref.model
    lr = cfg.actor_rollout_ref.actor.optim.lr
    if not model.lora_rank:
        return f"full fine-tuning (tuning=full), lr {lr:g}"
    return (
        f"LoRA (tuning=lora) rank {model.lora_rank}, alpha {model.lora_alpha}, on {model.target_modules} except "
        f"{model.exclude_modules}; lr {lr:g}; reference = the actor with its adapter off; vLLM gets "
        f"{'merged weights' if model.lora.merge else 'the adapter'} each step; the stage merge folds it into full weights"
    )


def describe_memory(cfg) -> str:
    actor, ref, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.ref, cfg.actor_rollout_ref.rollout

    def onoff(flag) -> str:
        return "on" if flag else "off"

    reference = (
        "none (LoRA: the actor)"
        if cfg.actor_rollout_ref.model.lora_rank
        else f"param offload {onoff(ref.fsdp_config.param_offload)}"
    )
    return (
        f"actor param offload {onoff(actor.fsdp_config.param_offload)}, optimizer offload "
        f"{onoff(actor.fsdp_config.optimizer_offload)}, {actor.ppo_max_token_len_per_gpu} tokens per micro batch; "
        f"reference {reference}; vLLM gpu_memory_utilization {rollout.gpu_memory_utilization}, TP "
        f"{rollout.tensor_model_parallel_size}, sleeps during updates {onoff(rollout.free_cache_engine)}"
    )


def describe_dynamic_sampling(cfg) -> str:
    groups = cfg.algorithm.filter_groups
    if not groups.enable:
        return "off (algorithm.filter_groups.enable=true drops groups whose samples all score the same)"
    batch = cfg.data.train_batch_size
    return (
        f"on: groups whose {groups.metric!r} is equal across the {cfg.actor_rollout_ref.rollout.n} samples are "
        f"replaced; at most {groups.max_num_gen_batches} x {batch} prompts per step, then the run stops"
    )


def resolve_gpus(settings: Settings) -> None:
    """Real runs check the GPU environment first; without trainer.n_gpus_per_node (or a profile, which sets it)
    they use the GPUs this node sees. A dry run keeps dig_grpo.yaml's value, the CPU rehearsal its profile's (and has no GPU to check)."""
    if settings.dry_run or rehearsal.selected(settings.extra_overrides):
        return
    check_gpu_environment(settings.ray_address)
    given = {override_key(o) for o in settings.extra_overrides}
    if "trainer.n_gpus_per_node" not in given and "profile" not in given:  # a profile sets its own GPU count
        settings.gpus_per_node = visible_gpus()


def plan_and_print(settings: Settings) -> Plan:
    overlay_root = None if settings.dry_run else settings.ckpt_dir / "model_configs"
    plan = plan_stage(settings, overlay_root)
    print(describe(plan), flush=True)
    if "wandb" in plan.cfg.trainer.logger and not wandb_credentials():
        print(
            "[dig] WARNING: trainer.logger has wandb but no WANDB_API_KEY / ~/.netrc login (WANDB_MODE=offline to log locally)"
        )
    return plan


def prepare(plan: Plan) -> None:
    """What a real run does before training: build missing data, merge the previous stage's checkpoint."""
    settings = plan.settings
    if plan.data.build_command:
        print(f"[dig] building data: {shlex.join(plan.data.build_command)}", flush=True)
        if importlib.util.find_spec("data_prep.build") is None:
            raise LaunchError("data_prep.build is not available in this Python; cannot build the missing data")
        rc = subprocess.run(plan.data.build_command, check=False).returncode
        if rc != 0:
            raise LaunchError(f"data build failed (rc={rc}): {shlex.join(plan.data.build_command)}")
        plan.data = check_data(plan.cfg, plan.spec, settings, settings.stage, settings.model)
    if plan.handoff.merge_command:
        run_merge(plan.handoff)


def run_trainer(command: list[str]) -> int:
    """The trainer as a child (curriculum): SIGTERM/SIGINT/SIGUSR1 reach it, its exit code comes back."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, lambda signum, _frame: proc.send_signal(signum)) for sig in forwarded}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(settings: Settings, exec_trainer: bool = True) -> int:
    """One stage: plan, print, then (real run) prepare and start the trainer from that same plan."""
    start = time.monotonic()
    resolve_gpus(settings)
    plan = plan_and_print(settings)
    if not settings.dry_run:
        prepare(plan)
    command = plan.train_command()
    print(f"[dig] command: {shlex.join(command)}", flush=True)
    if settings.dry_run:
        print(
            f"[dig] DRY_RUN: stage {settings.stage} OK in {time.monotonic() - start:.1f} s; nothing started", flush=True
        )
        return 0
    if not exec_trainer:
        return run_trainer(command)
    os.chdir(REPO_ROOT)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.execv(command[0], command)  # hand the process (and SLURM's signals) to the trainer


def stage_experiment_dir(settings: Settings) -> Path:
    spec, model_option, model_path = resolve_model(settings)
    overlay = model_overlay_dir(model_path, Path(tempfile.mkdtemp(prefix="dig_model_"))) if model_path else None
    cfg = compose(stage_overrides(settings, settings.stage, model_option, overlay) + settings.extra_overrides)
    return experiment_dir(cfg)


def status(settings: Settings) -> int:
    """Exit 0 if the stage finished (DONE marker), 1 if not; prints the experiment dir."""
    exp_dir = stage_experiment_dir(settings)
    done = stage_done(exp_dir)
    print(f"stage {settings.stage}: {'done' if done else 'not done'} ({exp_dir})")
    return 0 if done else 1


def curriculum_stage_settings(settings: Settings, stages: list[int]) -> list[Settings]:
    """The one resolved settings, per stage: INIT_MODEL seeds the first stage only; a dry run plans stage k on
    the checkpoint stage k-1 will produce when stage k-1 comes before it in the list (else it must be done)."""
    return [
        replace(
            settings,
            stage=stage,
            init_model=settings.init_model if i == 0 else None,
            # only a stage whose predecessor runs before it in this list: STAGES="2 3" needs stage 1 done
            assume_previous=settings.assume_previous or (settings.dry_run and i > 0 and stages[i - 1] == stage - 1),
        )
        for i, stage in enumerate(stages)
    ]


def curriculum(settings: Settings, stages: list[int]) -> int:
    """Stages in order, skipping finished ones; a failed stage stops the chain (rerun to resume it).

    Dry and real runs alike plan every stage in this process from the same settings; the real run then trains
    stage k (a child process) before stage k+1 is planned on its checkpoint.
    """
    resolve_gpus(settings)
    for stage_settings in curriculum_stage_settings(settings, stages):
        stage = stage_settings.stage
        exp_dir = stage_experiment_dir(stage_settings)
        if stage_done(exp_dir):
            print(f"[dig] curriculum: stage {stage} already finished ({exp_dir / DONE_MARKER}), skipping", flush=True)
            continue
        print(f"[dig] curriculum: stage {stage}", flush=True)
        rc = run(stage_settings, exec_trainer=False)
        if rc != 0:
            print(f"[dig] curriculum: stage {stage} failed (rc={rc}); rerun to resume it", file=sys.stderr, flush=True)
            return rc
    if not settings.dry_run:
        merge_last(curriculum_stage_settings(settings, stages)[-1])
    print("[dig] curriculum: done", flush=True)
    return 0


def merge_last(settings: Settings) -> Path | None:
    """The curriculum's last stage merged to HF too (what eval loads), like every stage before it; its path."""
    exp_dir = stage_experiment_dir(settings)
    done = stage_done(exp_dir)
    if done is None:
        return None
    merge = merged_weights(exp_dir, done, settings.stage, settings.python)
    if merge.merge_command:
        run_merge(merge)
    print(f"[dig] curriculum: stage {settings.stage}'s last step, merged for evaluation: {merge.init_path}", flush=True)
    return Path(merge.init_path)


PROG = "python -m recipes.dig.launch"


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(PROG, __doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", type=int, choices=STAGES, help="run (or DRY_RUN) one curriculum stage")
    which.add_argument(
        "--curriculum",
        type=int,
        nargs="+",
        choices=STAGES,
        metavar="STAGE",
        help="run these stages in order, skipping finished ones",
    )
    parser.add_argument("--status", action="store_true", help="with --stage: exit 0 if it has finished, 1 otherwise")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, passed to verl")
    args = parser.parse_args(argv)
    if args.curriculum:
        return curriculum(Settings.from_env(args.curriculum[0], args.overrides), args.curriculum)
    settings = Settings.from_env(args.stage, args.overrides)
    return status(settings) if args.status else run(settings)


if __name__ == "__main__":
    sys.exit(main())
