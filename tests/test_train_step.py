"""One GRPO policy update on CPU through verl 0.9.1's own actor and reference workers, per model family.

Rows from ``data_prep.to_verl`` (two 64x64 synthetic images each) -> verl ``RLHFDataset`` -> a group of
responses per prompt from HF ``generate`` -> the recipe's reward loaded by verl -> GRPO advantages from verl's
``core_algos`` -> reference log-probs and policy updates in ``ActorRolloutRefWorker`` (FSDP2, one gloo rank),
with the loss settings of ``dig_grpo.yaml`` as the launcher composes it. What only a GPU run shows (vLLM
rollouts, memory sizing) is listed in docs/train_step.md.

The negative tests feed the same chain rows with one image, rows with other pixel bounds, and a reward that
returns a constant: each must be stopped, by name, before any worker is built.
"""

from __future__ import annotations

import math

import pytest
import train_step_support as support

pytestmark = [pytest.mark.train_step, pytest.mark.verl]

FAMILIES = sorted(support.MODELS)  # qwen2_5_vl: remove-padding off (needs flash-attn); qwen3_vl: on, sdpa


@pytest.fixture(scope="module")
def fronts(tmp_path_factory):
    """Rows -> rollouts -> rewards -> advantages per family, built once (before any worker) and shared."""
    cache = {}

    def get(family: str) -> support.Front:
        if family not in cache:
            cache[family] = support.front_half(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_update_through_verl_workers(family, fronts):
    front = fronts(family)
    cfg, spec = front.cfg, front.spec

    # the recipe's own loss settings reached the actor config unchanged (only lr / batch sizes are test knobs)
    recipe = support.compose_recipe([f"base_model={spec.model_name}", "stage=stage1"]).actor_rollout_ref.actor
    actor_cfg = cfg.actor_rollout_ref.actor
    for key in support.RECIPE_LOSS_KEYS:
        assert actor_cfg[key] == recipe[key], key
    assert actor_cfg.use_kl_loss and actor_cfg.kl_loss_type == "low_var_kl" and actor_cfg.kl_loss_coef > 0
    packing = cfg.actor_rollout_ref.model.use_remove_padding
    assert packing == (family == "qwen3_vl")
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"

    # the group has a reward spread (the scripted ground-truth answer scores, samples do not)
    scores = [s.score for s in front.samples]
    assert len(scores) == support.NUM_PROMPTS * support.GROUP_SIZE
    assert all(math.isfinite(v) for v in scores)

    result = support.train_steps(front)

    for metrics in result.metrics:
        for key in ("loss", "actor/pg_loss", "kl_loss", "grad_norm"):
            values = metrics[key] if isinstance(metrics[key], list) else [metrics[key]]
            assert values and all(math.isfinite(float(v)) for v in values), (key, metrics)
    kl_after_first = [float(m["kl_loss"][-1]) for m in result.metrics[1:]]
    assert all(v > 0 for v in kl_after_first), kl_after_first  # the actor moved away from the reference
    assert float(result.metrics[0]["kl_loss"][0]) == pytest.approx(0.0, abs=1e-3)  # ... from where it started

    changed = [name for name, before in result.params_before.items() if not before.equal(result.params_after[name])]
    assert len(changed) == len(result.params_before), sorted(set(result.params_before) - set(changed))

    # reference pass = the initial policy's log-probs (same weights, forward-only offloaded engine)
    mask = front.response_mask.bool()
    assert (result.ref_log_probs[mask] - result.initial_log_probs[mask]).abs().max() < 0.1

    # GRPO moved the policy the way the advantages point
    per_response = front.advantages[:, 0]
    best, worst = int(per_response.argmax()), int(per_response.argmin())
    gain = ((result.final_log_probs - result.initial_log_probs) * mask).sum(dim=1)
    assert gain[best] > 0, (per_response.tolist(), gain.tolist())
    assert gain[worst] < 0, (per_response.tolist(), gain.tolist())

    # two images, in the model file's frame, reached the vision tower in every row of every forward
    want = support.expected_grid(spec, 64, 64)
    seen = [grid for call in result.vision_grids for grid in call]
    assert seen and all(grid == want for grid in seen), result.vision_grids
    actor_forwards = 2 * support.NUM_UPDATES + 1  # old log-probs + update per step, then the final log-probs
    assert len(seen) == 2 * len(front.samples) * actor_forwards, (len(seen), len(front.samples))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("edit", "message"),
    [(support.one_image_rows, "1 image"), (support.wrong_bounds_rows, "other bounds")],
    ids=["one_image", "wrong_pixel_bounds"],
)
def test_bad_rows_are_stopped_before_the_workers(family, edit, message, tmp_path, fronts):
    from verl.utils import hf_processor

    front = fronts(family)
    parquet = support.rewrite_images(support.write_rows(tmp_path / "rows", family), edit)
    processor = hf_processor(str(front.checkpoint))
    items = support.load_items(parquet, family, processor, tmp_path / "cache")
    assert len(items) == support.NUM_PROMPTS  # the dataset accepts them: only the check stands in the way
    with pytest.raises(support.TrainStepCheckError, match=message):
        support.prepare_prompts(items, processor, front.spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_constant_reward_is_stopped_before_the_workers(family, tmp_path, fronts):
    front = fronts(family)
    constant = tmp_path / "constant_reward.py"
    constant.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):\n"
        "    return {'score': 0.5}\n"
    )
    cfg = support.recipe_config(family, front.checkpoint, (f"reward.custom_reward_function.path={constant}",))
    samples = [support.Sample(s.prompt, s.response_ids) for s in front.samples]
    support.score(samples, support.reward_fn_from_config(cfg), front.processor.tokenizer)
    advantages, _ = support.grpo_advantages(samples, cfg)
    with pytest.raises(support.TrainStepCheckError, match="constant"):
        support.check_rewards_discriminate(samples, advantages)
