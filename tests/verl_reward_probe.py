"""Run by tests/test_reward_verl.py in a subprocess whose working directory is NOT the repo (as in a Ray
worker): load the DiG reward with verl 0.9.1's own loader from a composed config, then score a batch
through verl's reward loop (RewardLoopManager -> Ray RewardLoopWorker -> NaiveRewardManager), exactly the
path a training step takes. Prints one JSON object on the last line.

    python verl_reward_probe.py <reward_file> <tokenizer_dir> '<json list of [response, ground_truth]>'
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile


def main() -> None:
    reward_file, tokenizer_dir, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    import numpy as np
    import ray
    import torch
    from hydra import compose, initialize_config_module
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    overrides = [
        f"reward.custom_reward_function.path={reward_file}",
        "reward.custom_reward_function.name=compute_score",
        "+reward.custom_reward_function.reward_kwargs.coord_mode=abs",
        "+reward.custom_reward_function.reward_kwargs.iou_threshold=0.5",
        "reward.num_workers=1",
        f"actor_rollout_ref.model.path={tokenizer_dir}",
    ]
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose("ppo_trainer", overrides=overrides)

    direct_fn = get_custom_reward_fn(config)  # verl's loader: import by file path + reward_kwargs partial
    direct = [direct_fn(data_source="dig", solution_str=r, ground_truth=g, extra_info={}) for r, g in cases]

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt_len, response_len = 4, 96
    prompts, responses, masks = [], [], []
    for response, _ in cases:
        ids = tokenizer(response, add_special_tokens=False)["input_ids"][:response_len]
        pad = tokenizer.pad_token_id or 0
        prompts.append([pad] * prompt_len)
        responses.append(ids + [pad] * (response_len - len(ids)))
        masks.append([1] * prompt_len + [1] * len(ids) + [0] * (response_len - len(ids)))
    batch = {
        "prompts": torch.tensor(prompts),
        "responses": torch.tensor(responses),
        "attention_mask": torch.tensor(masks),
    }
    non_tensor = {
        "data_source": np.array(["dig"] * len(cases), dtype=object),
        "reward_model": np.array([{"style": "rule", "ground_truth": g} for _, g in cases], dtype=object),
        "extra_info": np.array([{"index": i} for i in range(len(cases))], dtype=object),
    }
    data = DataProto.from_dict(tensors=batch, non_tensors=non_tensor)

    # a private cluster in its own temp dir: never an ambient one (RAY_ADDRESS, or a stale ray_current_cluster
    # file that an earlier `ray start` left in Ray's default temp dir)
    temp_dir = tempfile.mkdtemp(prefix="dig_ray_")
    ray.init(
        address="local",
        _temp_dir=temp_dir,
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
    )
    try:
        manager = RewardLoopManager(config)
        out = manager.compute_rm_score(data)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    rm_scores = out.batch["rm_scores"]
    print(
        json.dumps(
            {
                "direct": direct,
                "reward_extra_keys": out.meta_info["reward_extra_keys"],
                "extra": {k: [float(v) for v in out.non_tensor_batch[k]] for k in out.meta_info["reward_extra_keys"]},
                "rm_score_sums": rm_scores.sum(-1).tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
