"""Stage handoff on a real-format checkpoint: a tiny Qwen2.5-VL wrapped with FSDP2 (gloo, world size 1) is saved
by verl's own FSDPCheckpointManager, then merged to HF by verl's real model_merger through the launcher.

Checks which checkpoint stage 2 starts from (the last step, only once stage 1 is marked done), that the merge
produces the trained weights and is skipped once done, and that the curriculum driver skips a finished stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_launch import dry_settings

from recipes.dig import launch
from recipes.dig.handoff import DONE_MARKER, is_merged, run_merge
from recipes.dig.main import write_done_marker
from recipes.dig.settings import LaunchError, Settings

pytestmark = pytest.mark.verl

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MODEL = "qwen2_5_vl_3b"
FAMILY = "qwen2_5_vl"
LAST_STEP = 4

# Runs in a subprocess: torch.distributed state must not leak into the pytest process.
FSDP_SAVE = """
import os, sys
family, out, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from tiny_qwen import build_tiny_model, build_tiny_processor
from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

dist.init_process_group("gloo", rank=0, world_size=1)
model = build_tiny_model(family)
fully_shard(model, mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",)))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
contents = ["model", "optimizer", "extra"]
checkpoint_config = OmegaConf.create({"save_contents": contents, "load_contents": contents, "async_save": False})
manager = FSDPCheckpointManager(model, optimizer, None, processing_class=build_tiny_processor(family),
                                checkpoint_config=checkpoint_config)
manager.save_checkpoint(local_path=out, global_step=step)
dist.destroy_process_group()
"""


def save_fsdp_checkpoint(actor_dir: Path, step: int) -> None:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29500 + os.getpid() % 1000),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    result = subprocess.run(
        [sys.executable, "-c", FSDP_SAVE, FAMILY, str(actor_dir), str(step)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """Stage 1 as the trainer leaves it: global_step_2 and global_step_4 (the last), tracker at 4, no marker yet."""
    root = tmp_path_factory.mktemp("handoff")
    exp_dir = root / "ckpt" / "dig" / f"{MODEL}_stage1"
    save_fsdp_checkpoint(exp_dir / f"global_step_{LAST_STEP}" / "actor", LAST_STEP)
    shutil.copytree(exp_dir / f"global_step_{LAST_STEP}", exp_dir / "global_step_2")  # an older checkpoint
    (exp_dir / "latest_checkpointed_iteration.txt").write_text(str(LAST_STEP))
    return root, exp_dir


def settings(root: Path, stage: int, **kwargs) -> Settings:
    return dry_settings(root, stage, model=MODEL, **kwargs)


def test_handoff_chooses_last_step_merges_once(stage1_run):
    root, exp_dir = stage1_run
    actor_dir = exp_dir / f"global_step_{LAST_STEP}" / "actor"
    assert json.loads((actor_dir / "fsdp_config.json").read_text()) == {"FSDP_version": 2, "world_size": 1}
    assert (actor_dir / "model_world_size_1_rank_0.pt").is_file() and (actor_dir / "huggingface").is_dir()

    # checkpoints but no done marker: stage 1 is still running (or died): stage 2 must not start from it
    with pytest.raises(LaunchError, match=f"stage 1 checkpoint missing.*global_step_{LAST_STEP}"):
        launch.plan_stage(settings(root, 2))

    stage1 = launch.plan_stage(settings(root, 1))
    write_done_marker(stage1.cfg)  # what recipes/dig/main.py does once the training loop returns
    assert json.loads((exp_dir / DONE_MARKER).read_text())["global_step"] == LAST_STEP
    assert launch.status(settings(root, 1)) == 0 and launch.status(settings(root, 2)) == 1

    plan = launch.plan_stage(settings(root, 2))
    merged = exp_dir / "hf_merged" / f"global_step_{LAST_STEP}"
    assert plan.handoff.init_path == str(merged)
    assert plan.cfg.actor_rollout_ref.model.path == str(merged)
    assert plan.handoff.merge_command[:6] == [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
    assert plan.handoff.merge_command[plan.handoff.merge_command.index("--local_dir") + 1] == str(actor_dir)
    assert "merged now" in plan.handoff.note and not merged.exists()  # a dry run does not merge

    run_merge(plan.handoff)  # verl's real FSDP -> HF merger
    assert is_merged(merged) and (merged / "config.json").is_file()
    assert sorted(p.name for p in merged.parent.iterdir()) == [merged.name]  # no temp dir left behind
    from tiny_qwen import build_tiny_model
    from transformers import AutoModelForImageTextToText

    trained = build_tiny_model(FAMILY).state_dict()
    loaded = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.bfloat16).state_dict()
    assert set(loaded) == set(trained)
    for name, tensor in loaded.items():  # the merger stores bf16
        assert torch.equal(tensor, trained[name].to(torch.bfloat16)), name
    stamp = {p: p.stat().st_mtime_ns for p in merged.iterdir()}

    again = launch.plan_stage(settings(root, 2))  # rerun: merge skipped
    assert again.handoff.merge_command is None and "already merged" in again.handoff.note
    assert again.handoff.init_path == str(merged)
    assert {p: p.stat().st_mtime_ns for p in merged.iterdir()} == stamp

    with pytest.raises(LaunchError, match="stage 2 checkpoint missing"):
        launch.plan_stage(settings(root, 3))
    explicit = launch.plan_stage(settings(root, 3, init_model=str(merged)))
    assert explicit.cfg.actor_rollout_ref.model.path == str(merged)


@pytest.mark.slow
def test_curriculum_skips_finished_stage(stage1_run):
    root, exp_dir = stage1_run
    if not (exp_dir / DONE_MARKER).exists():  # when run alone
        write_done_marker(launch.plan_stage(settings(root, 1)).cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "INIT_MODEL", "STAGES", "LOGGER")}
    env.update(DRY_RUN="1")
    overrides = [f"base_model={MODEL}", f"curriculum.ckpt_dir={root / 'ckpt'}", f"curriculum.data_dir={root / 'data'}"]
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "curriculum.sh"), *overrides],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "curriculum: stage 1 already finished (" in out
    assert "DRY_RUN: stage 1 OK" not in out
    assert f"stage 1 global_step_{LAST_STEP}" in out  # stage 2 starts from stage 1's last step
    assert "DRY_RUN: stage 2 OK" in out and "DRY_RUN: stage 3 OK" in out
    assert "stage 2 runs first (curriculum)" in out
    assert "curriculum: done" in out
