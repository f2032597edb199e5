"""`bash launch/cpu_rehearsal.sh`: the real curriculum on CPU, checked from what the run leaves behind.

One run per family, as a user starts it: small Blender renders, a tiny model warm-started on them, then verl's
default trainer with vLLM rollouts (vLLM's CPU build), the recipe's reward, validation, checkpoints and the stage
merges, and ``eval.dig --backend vllm`` on the last merge.

- tiny Qwen3-VL Thinking (the rehearsal's default), dynamic sampling on: stages 1 -> 2, killed with SIGKILL (the
  whole process group) right after stage 2 saved its first checkpoint, then rerun: stage 1 is skipped, stage 2
  resumes from that checkpoint; then stage 3 with tuning=lora from stage 2's merge, and eval on its folded merge.
  Every stage's validations must show up as pictures and readable reward curves in TensorBoard (recipes/dig/live.py).
- tiny Qwen2.5-VL: stages 1 -> 2. vLLM 0.24 and transformers 5.5.3 disagree on this model's two-image prompts
  (text-only prompts agree to 1e-6; with the images, and even with the vision tower zeroed, token log-probs differ:
  docs/cpu_rehearsal.md), so its rollouts are not the actor's policy: the served-weights check is pinned as
  failing, and the warm-started policy's vLLM samples never parse (no advantage). Everything else is checked.
- a sabotaged run (stage 2 from the base model instead of stage 1's merge, weight syncs received but never loaded
  into vLLM, rows with one image): each check below must fail on it, each for its own reason.
- a run whose groups never differ (dynamic sampling on num_gt): the recipe's bound must stop it in one line.

What each stage must show (tests/rehearsal_support.py): >= 2 training steps with vLLM rollouts, prompt lengths
equal to the HF processor's for two images, validation with the reward's nine keys, advantages not all zero,
vLLM serving the actor's weights at every step, the first weight sync = the stage's initial weights, the last =
its merged checkpoint, which differs from where it started; stage k's initial weights = stage k-1's merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rehearsal_support as rs

from dig_common.models import load_model_spec
from recipes.dig.lora import FOLDED

# a module fixture runs a whole rehearsal inside the first test that uses it: the suite's 900 s per test is too short
pytestmark = [pytest.mark.slow, pytest.mark.verl, pytest.mark.rehearsal, pytest.mark.timeout(2700)]

QWEN25 = "tiny_qwen2_5_vl"
QWEN3 = "tiny_qwen3_vl_thinking"
# a checkpoint every step, so the kill lands between two of them
EVERY_STEP = "trainer.save_freq=1"
# dynamic sampling in every Qwen3-VL stage (profile=cpu allows 16 batches of prompts per step)
DYNAMIC = ("algorithm.filter_groups.enable=true",)
# stage 3 of the Qwen3-VL run trains LoRA adapters (rank 8 on a 64-wide model) with an lr that moves the policy
# measurably in two steps (rehearsal_support.MIN_LORA_KL)
LORA = (
    "tuning=lora",
    "actor_rollout_ref.model.lora_rank=8",
    "actor_rollout_ref.model.lora_alpha=16",
    "actor_rollout_ref.actor.optim.lr=5e-3",
)


def stage2_saved(out: Path, model: str, step: int):
    exp = rs.experiment(out, model, 2)

    def reached() -> bool:
        tracker = exp / "latest_checkpointed_iteration.txt"
        return tracker.is_file() and tracker.read_text().strip() == str(step)

    return reached


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Stages 1 and 2 with dynamic sampling, SIGKILL during stage 2 after its step-1 checkpoint, rerun; then stage 3
    with LoRA (and dynamic sampling) from stage 2's merge, and eval on stage 3's folded merge."""
    out = tmp_path_factory.mktemp("rehearsal_qwen3") / "run"
    model = f"base_model={QWEN3}"
    first = rs.run_rehearsal(
        out,
        model,
        EVERY_STEP,
        *DYNAMIC,
        "--no-eval",
        stages="1 2",
        kill_when=stage2_saved(out, QWEN3, 1),
        log_name="first.log",
    )
    assert first.killed, f"the run ended (rc={first.rc}) before stage 2 saved step 1:\n{first.log[-3000:]}"
    stage1, stage2 = rs.experiment(out, QWEN3, 1), rs.experiment(out, QWEN3, 2)
    assert not (stage2 / "dig_stage_done.json").exists(), "stage 2 had finished when it was killed"
    before = {
        "stage1_files": sorted(p.relative_to(out) for p in stage1.rglob("*")),
        "stage1_marker_mtime": (stage1 / "dig_stage_done.json").stat().st_mtime_ns,
        "stage2_syncs": rs.syncs(stage2),
    }
    second = rs.run_rehearsal(out, model, EVERY_STEP, *DYNAMIC, "--no-eval", stages="1 2", log_name="second.log")
    assert second.rc == 0, f"rerun failed (rc={second.rc}):\n{second.log[-5000:]}"
    third = rs.run_rehearsal(out, model, *DYNAMIC, *LORA, stages="3", log_name="third.log")
    assert third.rc == 0, f"the LoRA stage 3 failed (rc={third.rc}):\n{third.log[-5000:]}"
    return out, first, second, before, third


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory, qwen3):
    out = tmp_path_factory.mktemp("rehearsal_qwen25") / "run"
    # the rendered pairs are the same for both models (data_prep.build only converts them again)
    shutil.copytree(qwen3[0] / "data" / "pairs", out / "data" / "pairs")
    run = rs.run_rehearsal(out, f"base_model={QWEN25}", "--no-eval", stages="1 2")
    assert run.rc == 0, f"rehearsal failed (rc={run.rc}):\n{run.log[-5000:]}"
    return out, run


def prompt_tokens(out: Path, model: str, stage: int) -> set[int]:
    spec = load_model_spec(model)
    return rs.expected_prompt_tokens(
        out / "data" / model / f"stage{stage}" / "train.parquet", out / "models" / model, spec.patch_size
    )


def stage_inits(out: Path, model: str, stages: list[int]) -> dict[int, Path]:
    """Stage 1 starts from the tiny model, stage k from stage k-1's merge (what the launcher must have used)."""
    inits = {1: out / "models" / model}
    for stage in stages[1:]:
        inits[stage] = rs.merged(rs.experiment(out, model, stage - 1))
    return inits


def check_handoffs(out: Path, model: str, stages: list[int]) -> None:
    """Every stage's syncs start at its initial weights and end at its merge (a LoRA stage: its merge is its initial
    weights plus the folded adapter); the merges differ stage to stage; the done markers name where each started."""
    inits = stage_inits(out, model, stages)
    for stage in stages:
        evidence = rs.evidence(out, model, stage)
        exp = rs.experiment(out, model, stage)
        if (rs.merged(exp) / FOLDED).is_file():
            rs.check_lora_stage(exp, inits[stage], evidence, stage)
        else:
            rs.check_syncs(exp, inits[stage], stage, len(evidence.steps))
    merges = [rs.load(rs.merged(rs.experiment(out, model, s))) for s in stages]
    assert all(rs.mismatches(a, b) > 0 for a, b in zip(merges, merges[1:], strict=False))
    for stage in stages[1:]:
        marker = json.loads((rs.experiment(out, model, stage) / "dig_stage_done.json").read_text())
        assert Path(marker["init_model"]) == inits[stage]


def test_qwen3_three_stages_on_vllm_rollouts(qwen3):
    out = qwen3[0]
    for stage in (1, 2, 3):
        evidence = rs.check_trained(out, QWEN3, stage)
        rs.check_two_image_prompts(evidence, prompt_tokens(out, QWEN3, stage), stage)
        rs.check_served_weights(evidence, stage)


def test_qwen3_dynamic_sampling_evicts_groups_without_spread(qwen3):
    out = qwen3[0]
    evicted = [rs.check_dynamic_sampling(rs.evidence(out, QWEN3, stage), stage) for stage in (1, 2, 3)]
    assert sum(evicted) > 0
    # every step still trained on a full batch of groups, some of them with spread
    for stage in (1, 2, 3):
        rs.check_trained(out, QWEN3, stage)


def test_qwen3_lora_stage_serves_the_adapter_and_folds_it_into_its_merge(qwen3):
    out, third = qwen3[0], qwen3[4]
    assert "[dig] tuning: LoRA (tuning=lora) rank 8, alpha 16" in third.log
    assert "[dig] folding the LoRA adapter into the merge" in third.log
    stage3 = rs.experiment(out, QWEN3, 3)
    assert (rs.merged(stage3) / FOLDED).is_file()  # check_handoffs (test above) checks the LoRA stage's weights
    assert not rs.syncs(stage3), "a LoRA stage loaded full weights into vLLM (the adapter path was not taken)"
    # the LoRA check refuses a fully tuned stage (its merge has no folded adapter)
    stage2 = rs.experiment(out, QWEN3, 2)
    with pytest.raises(AssertionError, match="not a folded LoRA merge"):
        rs.check_lora_stage(stage2, rs.merged(rs.experiment(out, QWEN3, 1)), rs.evidence(out, QWEN3, 2), 2)


def test_qwen3_live_pictures_and_component_curves_at_every_validation(qwen3):
    out = qwen3[0]
    for stage in (1, 2, 3):
        validations = rs.check_live(out, QWEN3, stage, rs.evidence(out, QWEN3, stage))
        assert validations[0] == 0 and len(validations) >= 2, (stage, validations)


def test_qwen3_each_stage_starts_from_the_previous_merge(qwen3):
    check_handoffs(qwen3[0], QWEN3, [1, 2, 3])


def test_qwen3_kill_during_stage_2_then_rerun_resumes_it(qwen3):
    out, _, second, before, _ = qwen3
    stage1 = rs.experiment(out, QWEN3, 1)
    assert "stage 1 already finished" in second.log and "[dig] curriculum: stage 1\n" not in second.log
    assert sorted(p.relative_to(out) for p in stage1.rglob("*")) == before["stage1_files"], "stage 1 was touched"
    assert (stage1 / "dig_stage_done.json").stat().st_mtime_ns == before["stage1_marker_mtime"]
    stage2 = rs.experiment(out, QWEN3, 2)
    new_syncs = [p for p in rs.syncs(stage2) if p not in before["stage2_syncs"]]
    assert new_syncs, "the rerun's stage 2 loaded no weights into vLLM"
    # the rerun's first sync is the step-1 checkpoint's weights (= the last sync before the kill), not the
    # stage's initial weights (its first sync, fp32; one step moves them less than bf16 can show): it resumed
    resumed = rs.load(new_syncs[0])
    assert rs.mismatches(resumed, rs.load(before["stage2_syncs"][-1])) == 0
    assert rs.mismatches(resumed, rs.load(before["stage2_syncs"][0])) > 0
    assert sorted(rs.scalars(out, QWEN3, 2)["training/global_step"]) == [1, 2]


def test_qwen3_eval_serves_the_last_merge_with_vllm(qwen3):
    out, third = qwen3[0], qwen3[4]
    last = rs.merged(rs.experiment(out, QWEN3, 3))
    assert f"cpu_rehearsal: eval: {last}" in third.log
    results = json.loads((out / "eval" / QWEN3 / "results.json").read_text())
    samples = (out / "eval" / QWEN3 / "results.samples.jsonl").read_text().splitlines()
    pairs = {
        row["extra_info"]["pair_id"]
        for row in pq.read_table(out / "data" / QWEN3 / "test" / "test.parquet").to_pylist()
    }
    assert {json.loads(s)["pair_id"] for s in samples} == pairs  # every test pair answered, from the last merge
    assert results["overall"]["n"] == len(samples) == len(pairs) * results["decoding"]["n"]


def test_qwen25_two_stages(qwen25):
    out, run = qwen25
    for stage in (1, 2):
        evidence = rs.check_trained(out, QWEN25, stage, need_advantage=False)
        rs.check_two_image_prompts(evidence, prompt_tokens(out, QWEN25, stage), stage)
        # pinned: vLLM and transformers disagree on tiny Qwen2.5-VL with images (docs/cpu_rehearsal.md); when
        # this starts to pass, check advantages and served weights for this family too
        with pytest.raises(AssertionError, match="did not serve the actor's weights"):
            rs.check_served_weights(evidence, stage)
    check_handoffs(out, QWEN25, [1, 2])
    assert "cpu_rehearsal: eval" not in run.log
    # dynamic sampling is off here: its check must say so
    with pytest.raises(AssertionError, match="no training/filter_groups/evicted_samples"):
        rs.check_dynamic_sampling(rs.evidence(out, QWEN25, 1), 1)


def one_image(parquet: Path) -> None:
    table = pq.read_table(parquet)
    rows = table.to_pylist()
    for row in rows:
        row["images"] = row["images"][:1]
        for message in row["prompt"]:
            message["content"] = message["content"].replace("<image><image>", "<image>", 1)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), parquet)


def test_checks_fail_on_a_sabotaged_stage(qwen3, tmp_path):
    """Stage 2 started from the base model, weight syncs dropped before vLLM loads them, rows with one image:
    the stage still runs, and each check catches its own fault."""
    out = qwen3[0]
    broken = tmp_path / "run"
    for part in ("data", "models"):
        shutil.copytree(out / part, broken / part)
    shutil.copytree(rs.experiment(out, QWEN3, 1), rs.experiment(broken, QWEN3, 1))
    for split in ("train", "val"):
        one_image(broken / "data" / QWEN3 / "stage2" / f"{split}.parquet")
    run = rs.run_rehearsal(
        broken,
        f"base_model={QWEN3}",
        "--no-eval",
        # a second external module after the workarounds: receives each sync, records it, never loads it
        'ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES="recipes.dig.rehearsal.cpu_verl,'
        'rehearsal_sabotage"',
        stages="2",
        env={"INIT_MODEL": str(broken / "models" / QWEN3), "PYTHONPATH": str(Path(__file__).parent)},
    )
    assert run.rc == 0, f"sabotaged run failed (rc={run.rc}):\n{run.log[-5000:]}"
    evidence = rs.evidence(broken, QWEN3, 2)
    with pytest.raises(AssertionError, match="prompt lengths"):
        rs.check_two_image_prompts(evidence, prompt_tokens(out, QWEN3, 2), 2)
    with pytest.raises(AssertionError, match="did not serve the actor's weights"):
        rs.check_served_weights(evidence, 2)
    with pytest.raises(AssertionError, match="first sync is not its initial weights"):
        rs.check_syncs(rs.experiment(broken, QWEN3, 2), rs.merged(rs.experiment(broken, QWEN3, 1)), 2, 2)


def test_dynamic_sampling_stops_a_run_whose_groups_never_differ(qwen3, tmp_path):
    """Filtering on num_gt, equal for every answer to one pair, every group is evicted: verl alone would refill
    forever; the recipe's bound stops the run at 2 batches of prompts with one line, and nothing is marked done."""
    out = qwen3[0]
    run_dir = tmp_path / "run"
    for part in ("data", "models"):
        shutil.copytree(out / part, run_dir / part)
    run = rs.run_rehearsal(
        run_dir,
        f"base_model={QWEN3}",
        "--no-eval",
        "algorithm.filter_groups.enable=true",
        "algorithm.filter_groups.metric=num_gt",
        "algorithm.filter_groups.max_num_gen_batches=2",
        "trainer.val_before_train=false",
        stages="1",
        timeout=900,
    )
    assert run.rc != 0, run.log[-3000:]
    errors = [line for line in run.log.splitlines() if line.startswith("python -m recipes.dig.main: error:")]
    assert len(errors) == 1, run.log[-5000:]
    assert "dynamic sampling: training step 1 generated 8 prompts" in errors[0]
    assert "max_num_gen_batches=2 x data.train_batch_size=4" in errors[0] and "'num_gt'" in errors[0]
    assert "[dig] curriculum: stage 1 failed (rc=1); rerun to resume it" in run.log
    assert not (rs.experiment(run_dir, QWEN3, 1) / "dig_stage_done.json").exists()
