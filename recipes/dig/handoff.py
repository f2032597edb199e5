"""Stage handoff: the done marker, the latest checkpoint, and stage k's initial weights (stage k-1's last step,
merged to HF by verl's model merger into a temp dir renamed on success)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dig_common.fileio import temp_path
from dig_common.models import ModelSpec
from recipes.dig.lora import ADAPTER_DIR as LORA_ADAPTER_DIR
from recipes.dig.settings import LaunchError, Settings

# Written by recipes/dig/main.py when a stage's training loop returned normally.
DONE_MARKER = "dig_stage_done.json"
# Merged HF weights of <experiment>/global_step_N live in <experiment>/hf_merged/global_step_N.
MERGED_DIRNAME = "hf_merged"


@dataclass
class Handoff:
    """Where stage k's initial weights come from."""

    init_path: str
    # human-readable origin: base model / existing merge / merge to run / explicit INIT_MODEL
    note: str
    merge_command: list[str] | None = None
    merge_target: Path | None = None


def experiment_dir(cfg) -> Path:
    return Path(cfg.trainer.default_local_dir)


def latest_step(exp_dir: Path) -> int | None:
    tracker = exp_dir / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise LaunchError(f"{tracker}: expected a step number, found {text!r}")
    return int(text)


def stage_done(exp_dir: Path) -> dict | None:
    marker = exp_dir / DONE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def merged_dir(exp_dir: Path, step: int) -> Path:
    return exp_dir / MERGED_DIRNAME / f"global_step_{step}"


def is_merged(target: Path) -> bool:
    """A finished merge: the rename from the temp dir happened, so config and weights are all there."""
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


# A Hugging Face hub id, "org/name": what INIT_MODEL may be instead of a folder (the run downloads it).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def check_init_model(value: str) -> str:
    """INIT_MODEL: a complete Hugging Face checkpoint folder (config.json and weights), or a hub id. Returns the
    plan's note; raises LaunchError for a path that is not such a folder (checked here, before any GPU)."""
    path = Path(value).expanduser()
    if not path.exists() and HUB_ID.fullmatch(value):
        return "INIT_MODEL (explicit), a hub id: the run downloads it"
    fix = (
        "set INIT_MODEL to a Hugging Face checkpoint folder (config.json and *.safetensors, e.g. a stage's "
        "hf_merged/global_step_N) or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct"
    )
    if not path.is_dir():
        raise LaunchError(f"INIT_MODEL={value}: {'not a folder' if path.exists() else 'no such folder'}; {fix}")
    weights = [f for pattern in WEIGHT_GLOBS for f in path.glob(pattern)]
    missing = [name for name, ok in (("config.json", (path / "config.json").is_file()), ("weights", weights)) if not ok]
    if missing:
        raise LaunchError(
            f"INIT_MODEL={value}: not a complete checkpoint folder (no {' and no '.join(missing)}"
            f"{'' if 'weights' not in missing else ' *.safetensors / *.bin'}); {fix}"
        )
    return f"INIT_MODEL (explicit), checked: config.json and {len(weights)} weight file(s)"


def merge_command(python: str, actor_dir: Path, target: Path) -> list[str]:
    merger = [python, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
    return [*merger, "--local_dir", str(actor_dir), "--target_dir", str(target)]


def plan_handoff(settings: Settings, stage: int, prev_cfg, spec: ModelSpec) -> Handoff:
    """Stage 1: the base model. Stage k: stage k-1's last step, merged to HF (merge planned if not done yet)."""
    if settings.init_model:
        return Handoff(settings.init_model, check_init_model(settings.init_model))
    if stage == 1:
        return Handoff(spec.hf_path, f"base model {spec.hf_path}")
    prev_dir = experiment_dir(prev_cfg)
    prev_script = f"launch/grpo_stage{stage - 1}.sh"
    done = stage_done(prev_dir)
    if done is None:
        if settings.assume_previous:
            return Handoff(
                str(prev_dir / MERGED_DIRNAME / "global_step_LAST"),
                f"stage {stage - 1} runs first (curriculum); its last step is merged before stage {stage} starts",
            )
        step = latest_step(prev_dir)
        state = f"its latest checkpoint is global_step_{step}" if step else "it has no checkpoint"
        raise LaunchError(
            f"stage {stage - 1} checkpoint missing: {prev_dir} has no {DONE_MARKER} ({state}). Run (or resume) "
            f"{prev_script} with the same base_model / curriculum.ckpt_dir first, or set INIT_MODEL=<HF dir> to start stage {stage} "
            f"from given weights"
        )
    return merged_weights(prev_dir, done, stage - 1, settings.python)


def merged_weights(exp_dir: Path, done: dict, stage: int, python: str) -> Handoff:
    """A finished stage's last step as HF weights: its merge, or the merge to run (stage handoff and the
    curriculum's final merge for eval)."""
    step = int(done["global_step"])
    actor_dir = exp_dir / f"global_step_{step}" / "actor"
    target = merged_dir(exp_dir, step)
    if is_merged(target):
        return Handoff(str(target), f"stage {stage} global_step_{step}, already merged")
    if not (actor_dir / "fsdp_config.json").is_file() or not any(actor_dir.glob("model_world_size_*_rank_0.pt")):
        raise LaunchError(
            f"stage {stage} checkpoint missing: {actor_dir} lacks fsdp_config.json / model_world_size_*_rank_0.pt "
            f"(deleted? {DONE_MARKER} says global_step_{step} is the last step)"
        )
    return Handoff(
        str(target),
        f"stage {stage} global_step_{step}, merged now (not merged yet)",
        merge_command=merge_command(python, actor_dir, target),
        merge_target=target,
    )


def run_merge(handoff: Handoff) -> None:
    """verl's FSDP->HF merger into a temp dir (plus, for a LoRA run, the adapter folded into the weights by
    recipes/dig/lora.py), then rename: a killed merge never looks finished.

    A folder, so not ``atomic_output`` (files only); the temp name is the same sibling ``temp_path`` gives."""
    assert handoff.merge_command and handoff.merge_target
    target = handoff.merge_target
    tmp = temp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    command = handoff.merge_command[:-1] + [str(tmp)]
    print(f"[dig] merging: {shlex.join(command)}", flush=True)
    try:
        result = subprocess.run(command, check=False)
        if result.returncode != 0 or not is_merged(tmp):
            raise LaunchError(f"model merge failed (rc={result.returncode}): {shlex.join(command)}")
        if (tmp / LORA_ADAPTER_DIR).is_dir():  # tuning=lora: verl's merger wrote base weights + the adapter
            fold = [command[0], "-m", "recipes.dig.lora", str(tmp)]
            print(f"[dig] folding the LoRA adapter into the merge: {shlex.join(fold)}", flush=True)
            result = subprocess.run(fold, check=False)
            if result.returncode != 0 or not is_merged(tmp):
                raise LaunchError(f"LoRA fold failed (rc={result.returncode}): {shlex.join(fold)}")
        if not target.exists():  # else a concurrent merge finished first: keep it
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
