"""Checks before anything slow: the reward through verl's loader, the data (or the command that builds it) and
its prompt budget, and the GPU environment of a real run."""

from __future__ import annotations

import importlib.util
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from data_prep.budget import prompt_token_bound
from data_prep.stages import STAGES_FILE
from dig_common.models import ModelSpec
from dig_common.parquet import model_mismatch, open_parquet
from recipes.dig.settings import LaunchError, Settings

RENDER_SEC_PER_PAIR = 4.5  # 480x320, 16 spp: measured wall time per pair on a 2-core box
CONVERT_SEC_PER_PAIR = 0.01  # parquet conversion of a 480x320 pair, rounded up (benchmarks/prep.py: 364-682 pairs/s)


def check_reward_config(cfg, spec: ModelSpec) -> None:
    """The reward must see the same frame and pixel bounds the parquet was written with."""
    from omegaconf import OmegaConf

    from reward_fns.dig_reward import check_reward_kwargs

    kwargs = OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs, resolve=True)
    try:  # the same check compute_score makes, but here, before any GPU is requested
        check_reward_kwargs(**kwargs)
    except ValueError as err:
        raise LaunchError(f"reward.custom_reward_function.reward_kwargs: {err}") from err
    for key, want in spec.reward_kwargs().items():
        if kwargs.get(key) != want:
            raise LaunchError(
                f"reward.custom_reward_function.reward_kwargs.{key}={kwargs.get(key)!r} but the model file says "
                f"dig.{key}={want!r}; set it in the model file's dig: block, not on the command line"
            )


def load_reward(cfg):
    """Load compute_score through verl's own loader and score one malformed answer (must not raise)."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    path = cfg.reward.custom_reward_function.path
    try:
        fn = get_custom_reward_fn(cfg)
    except Exception as err:
        raise LaunchError(
            f"reward.custom_reward_function.path={path}: cannot load: {type(err).__name__}: {err}"
        ) from err
    if fn is None:
        raise LaunchError("reward.custom_reward_function.path is not set")
    ground_truth = json.dumps({"boxes": [[10, 10, 20, 20]], "width": 64, "height": 64})
    try:
        result = fn(data_source="dig", solution_str="no boxes here", ground_truth=ground_truth, extra_info={})
    except Exception as err:
        raise LaunchError(
            f"reward {path}: compute_score raised on a malformed answer: {type(err).__name__}: {err}"
        ) from err
    if not (isinstance(result, dict) and "score" in result) and not isinstance(result, int | float):
        raise LaunchError(
            f"reward {path}: compute_score returned {type(result).__name__}; verl needs a float or a dict with 'score'"
        )
    return result


def check_mini_batches(cfg) -> None:
    """What verl 0.9.1 checks only without dynamic batch sizes, and then asserts in the first actor update.

    ``ActorConfig.validate`` requires train_batch_size >= ppo_mini_batch_size only when ``use_dynamic_bsz`` is
    off; the recipe runs with it on. A real run then reaches ``engine_workers.train_mini_batch`` after the first
    rollout: each of the dp = GPUs / ulysses_sequence_parallel_size ranks holds train_batch_size x n / dp
    samples and ``tensordict_utils.make_iterator`` asserts that they split into whole mini-batches of
    ppo_mini_batch_size x n / dp (after ``assert (ppo_mini_batch_size x n) % dp == 0``). Both are refused here."""
    actor, rollout, trainer = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout, cfg.trainer
    train, mini, n = int(cfg.data.train_batch_size), int(actor.ppo_mini_batch_size), int(rollout.n)
    sp = int(actor.get("ulysses_sequence_parallel_size", 1) or 1)
    dp = max(int(trainer.nnodes) * int(trainer.n_gpus_per_node) // sp, 1)
    if train % mini:
        relation = "below" if train < mini else "not a multiple of"
        raise LaunchError(
            f"data.train_batch_size={train} is {relation} actor_rollout_ref.actor.ppo_mini_batch_size={mini}: "
            "verl's first actor update would stop on it (after the first rollout); make data.train_batch_size a "
            "multiple of ppo_mini_batch_size (or lower ppo_mini_batch_size)"
        )
    if (mini * n) % dp:
        raise LaunchError(
            f"actor_rollout_ref.actor.ppo_mini_batch_size x rollout.n = {mini} x {n} is not divisible by the {dp} "
            f"data-parallel ranks (GPUs / ulysses_sequence_parallel_size): verl's first actor update would stop "
            "on it; choose ppo_mini_batch_size so that it is"
        )


@dataclass
class DataReport:
    ready: bool
    lines: list[str]
    build_command: list[str] | None = None


def data_files(cfg) -> dict[str, Path]:
    files = {}
    for split, key in (("train", "train_files"), ("val", "val_files")):
        value = cfg.data[key]
        paths = [value] if isinstance(value, str) else list(value)
        for i, p in enumerate(paths):
            files[split if i == 0 else f"{split}{i}"] = Path(p)
    return files


def inspect_parquet(path: Path, cfg, spec: ModelSpec) -> str:
    from data_prep.to_verl import SCHEMA

    try:
        pf = open_parquet(path, "data file")
    except ValueError as err:
        raise LaunchError(str(err)) from err
    missing = [c for c in SCHEMA.names if c not in pf.schema_arrow.names]
    if missing:
        raise LaunchError(
            f"data file {path}: missing column(s) {missing} of the verl layout; rebuild with data_prep.build"
        )
    rows = pf.metadata.num_rows
    if rows == 0:
        raise LaunchError(f"data file {path}: 0 rows")
    why = model_mismatch(pf, spec)
    if why:
        raise LaunchError(
            f"data file {path}: {why} (base_model={spec.model_name}); the data was built for another model: the "
            "parquets are per model (data_prep.build --model)"
        )
    sizes = pf.read(columns=["extra_info"]).column("extra_info").to_pylist()
    worst = max(prompt_token_bound(int(e["width"]), int(e["height"]), spec) for e in sizes if e and e.get("width"))
    if worst > cfg.data.max_prompt_length:
        raise LaunchError(
            f"data file {path}: a two-image prompt needs up to ~{worst} tokens but data.max_prompt_length="
            f"{cfg.data.max_prompt_length}: raise it in the model file or lower dig.max_pixels"
        )
    return f"{path} ({rows} rows, prompts <= ~{worst} tokens of {cfg.data.max_prompt_length})"


def planned_build(data_dir: Path, stage: int) -> dict:
    """What data_prep.build does for a stage's missing parquets: pairs per source still to generate (none when the
    pairs are there: it only converts), pairs to convert, image size and pair sources (data_prep/stages.yaml, read
    by data_prep.stages: the one loader of that file; the size: data_prep.build.render_settings)."""
    from data_prep.build import pairs_to_make, render_settings
    from data_prep.stages import load_curriculum, load_source_mixes

    try:
        curriculum = load_curriculum(STAGES_FILE)
        definition = curriculum.stage(stage)
        mix = load_source_mixes(STAGES_FILE)[definition.name]
    except (ValueError, FileNotFoundError) as err:
        raise LaunchError(str(err)) from err
    size = render_settings(curriculum)
    return {
        "pairs": {split: sum(run.num for run in runs) for split, runs in definition.splits.items()},
        "to_make": pairs_to_make(data_dir, definition, list(definition.splits), mix),
        "width": size["width"],
        "height": size["height"],
        "sources": mix.describe(),
    }


def check_data(cfg, spec: ModelSpec, settings: Settings, stage: int, model_ref: str) -> DataReport:
    files = data_files(cfg)
    missing = {split: p for split, p in files.items() if not p.is_file()}
    lines = [f"data {split}: {inspect_parquet(p, cfg, spec)}" for split, p in files.items() if split not in missing]
    if "train" not in missing:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(files["train"]).metadata.num_rows
        if rows < cfg.data.train_batch_size:  # verl's train loader drops the last partial batch
            raise LaunchError(
                f"data file {files['train']}: {rows} rows < data.train_batch_size={cfg.data.train_batch_size}, so "
                "no training step would run; build more pairs or lower data.train_batch_size"
            )
    if not missing:
        return DataReport(True, lines)
    data_dir = Path(cfg.curriculum.data_dir)
    expected = {split: data_dir / spec.model_name / f"stage{stage}" / f"{split}.parquet" for split in ("train", "val")}
    if any(files.get(s) != p for s, p in expected.items() if s in missing):
        raise LaunchError(f"data file(s) not found: {', '.join(str(p) for p in missing.values())} (set by an override)")
    plan = planned_build(data_dir, stage)
    worst = prompt_token_bound(plan["width"], plan["height"], spec)
    if worst > cfg.data.max_prompt_length:
        raise LaunchError(
            f"data.max_prompt_length={cfg.data.max_prompt_length} is below the ~{worst} tokens of a two-image prompt "
            f"at the planned {plan['width']}x{plan['height']} render ({STAGES_FILE.name}): raise it in the model file"
        )
    command = [settings.python, "-m", "data_prep.build", "--out-dir", str(data_dir), "--model", model_ref]
    command += ["--stage", str(stage)]
    if settings.data_workers:
        command += ["--workers", str(settings.data_workers)]
    command += settings.data_build_args
    pairs = sum(plan["pairs"].values())
    to_render = plan["to_make"]["rendered"]
    if not any(plan["to_make"].values()):
        work = (
            f"the pairs are in {data_dir / 'pairs'} (shared by every model): it only converts {pairs} pairs "
            f"(~{pairs * CONVERT_SEC_PER_PAIR:.0f} s)"
        )
    else:
        workers = settings.data_workers or 1
        hours = to_render * RENDER_SEC_PER_PAIR / workers / 3600
        work = (
            f"renders {to_render} pairs x {RENDER_SEC_PER_PAIR} s/pair (measured at 480x320, 16 spp on 2 cores) / "
            f"{workers} worker(s) = ~{hours:.1f} h"
        )
        if plan["to_make"]["photo"]:
            work += f", makes {plan['to_make']['photo']} photo pairs"
        work += f", then converts {pairs} pairs"
    lines.append(
        f"data: missing {', '.join(str(p) for p in missing.values())}; the run builds them first with "
        f"`{shlex.join(command)}`: {work}; sources {plan['sources']}; prompts <= ~{worst} tokens of "
        f"{cfg.data.max_prompt_length}"
    )
    return DataReport(False, lines, command)


def check_gpu_environment(ray_address: str | None) -> None:
    """Before anything slow or Ray: a real run needs vLLM and GPUs (or a Ray cluster that has them)."""
    if ray_address:
        return  # GPUs live in the cluster; verl checks trainer.nnodes x n_gpus_per_node against it
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise LaunchError(
            "no GPU visible (torch.cuda.device_count() == 0): training needs GPUs. Use DRY_RUN=1 to "
            "validate everything on CPU, or set RAY_ADDRESS to a Ray cluster with GPUs"
        )
    if importlib.util.find_spec("vllm") is None:
        raise LaunchError(
            "vLLM is not installed in this Python: a training run needs the GPU stack "
            "(pip install -r requirements.txt && pip install -e . --no-deps). To validate on CPU use DRY_RUN=1"
        )


def wandb_credentials() -> bool:
    import os

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def visible_gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)
