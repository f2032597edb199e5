"""The real (not dry) curriculum, rehearsed on CPU up to the GPU boundary.

A private Ray head declares 8 GPUs (Ray accepts that on a machine without any) and enough CPUs for verl's
TaskRunner, TransferQueue's 8 storage actors and the resource pool; `bash launch/curriculum.sh` runs in real mode
against it (RAY_ADDRESS) on tiny smoke data and a tiny offline Qwen2.5-VL checkpoint. Stage 1 is marked finished
(done marker + merged HF weights, as recipes/dig/main.py and the handoff leave them), so the rerun skips it and
plans stage 2 on stage 1's merged checkpoint, from the same resolved settings the dry run uses: the model comes
from `base_model=` (an override the launcher consumes), INIT_MODEL seeds only the first stage of the list.
verl's TaskRunner then builds both datasets (filter_overlong_prompts through `datasets`' process pool, no row
dropped) and the trainer stops where its workers need CUDA, with one named message. The Ray processes are
stopped by their process group and nothing of Ray is left behind (its own --temp-dir under tmp).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from ray_local import ray_head, ray_processes
from test_launch import LAUNCH_ENV_KEYS, write_stage_parquet
from tiny_qwen import save_tiny_checkpoint

from dig_common.models import load_model_spec
from recipes.dig.handoff import DONE_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.verl]

REPO = Path(__file__).resolve().parents[1]
MODEL = "qwen2_5_vl_3b"
TRAINER_TIMEOUT = 480  # the whole curriculum call; a hang (e.g. too few Ray CPUs) fails here, not in CI's limit
SMALL_BATCH = ["data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    with ray_head(root / "ray", num_gpus=8, num_cpus=16) as head:
        yield root, head
    assert ray_processes(root / "ray") == [], "Ray processes left behind"


def test_real_curriculum_rerun_reaches_the_gpu_boundary(cluster):
    root, head = cluster
    spec = load_model_spec(MODEL)
    tiny = save_tiny_checkpoint("qwen2_5_vl", root / "tiny")
    for stage in (1, 2):
        for split in ("train", "val"):
            write_stage_parquet(
                root / "data" / MODEL / f"stage{stage}" / f"{split}.parquet", spec.min_pixels, spec.max_pixels
            )
    # stage 1 as a finished run leaves it: done marker at its last step, that step merged to HF
    stage1 = root / "ckpt" / "dig" / f"{MODEL}_stage1"
    merged = stage1 / "hf_merged" / "global_step_4"
    shutil.copytree(tiny, merged)
    (stage1 / DONE_MARKER).write_text(json.dumps({"global_step": 4, "stage": 1, "model": MODEL}))

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS and not k.startswith("RAY_")}
    env.update(
        head.env(),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DRY_RUN="false",
        STAGES="1 2",
        INIT_MODEL=str(tiny),
    )
    settings = [f"curriculum.ckpt_dir={root / 'ckpt'}", f"curriculum.data_dir={root / 'data'}"]
    settings += ["trainer.n_gpus_per_node=1", "trainer.logger=[console]"]
    log = root / "curriculum.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", str(REPO / "launch" / "curriculum.sh"), f"base_model={MODEL}", *settings, *SMALL_BATCH],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=TRAINER_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            pytest.fail(f"the real curriculum hung for {TRAINER_TIMEOUT}s:\n{log.read_text()[-6000:]}")
    text = log.read_text()
    lines = text.splitlines()
    tail = text[-6000:]

    # the rerun skips the finished stage and plans stage 2 for the overridden model on stage 1's merged weights
    assert f"[dig] curriculum: stage 1 already finished ({stage1 / DONE_MARKER}), skipping" in lines, tail
    assert f"[dig] stage 2 | model {MODEL} ({spec.hf_path}, coord_mode={spec.coord_mode})" in lines, tail
    assert f"[dig] init weights: {merged} [stage 1 global_step_4, already merged]" in lines  # not INIT_MODEL
    exp2 = root / "ckpt" / "dig" / f"{MODEL}_stage2"
    assert f"[dig] experiment: dig/{MODEL}_stage2 -> {exp2} (resume_mode=auto)" in lines
    for split in ("train", "val"):
        assert any(
            line.startswith(f"[dig] data {split}: {root / 'data' / MODEL / 'stage2' / f'{split}.parquet'} (2 rows")
            for line in lines
        )
    command = next(line for line in lines if line.startswith("[dig] command: "))
    for override in (
        f"base_model={MODEL}",
        "stage=stage2",
        f"curriculum.data_dir={root / 'data'}",
        f"curriculum.ckpt_dir={root / 'ckpt'}",
        "trainer.n_gpus_per_node=1",
        f"actor_rollout_ref.model.path={merged}",
        *SMALL_BATCH,
    ):
        assert f" {override}" in command, (override, command)
    assert "stage=stage1" not in text and "DRY_RUN" not in text

    # verl's TaskRunner built both datasets, dropping no row
    assert "train and validate dataloader initialized, train dataset size: 2, val dataset size: 2" in text, tail
    assert text.count("filter dataset len: 2") == 2

    # then the trainer stopped at the GPU boundary with one named message, and the curriculum stopped with it
    stops = [line for line in lines if line.startswith("python -m recipes.dig.main: error: ")]
    assert len(stops) == 1 and "training stopped at the GPU boundary" in stops[0], tail
    assert rc != 0 and "[dig] curriculum: stage 2 failed" in text
    assert not (exp2 / DONE_MARKER).exists()
