"""End-to-end proof on CPU: Blender render -> data_prep.to_verl -> verl RLHFDataset -> HF generate -> reward
loaded by verl's own loader -> eval.dig. Tiny random Qwen2.5-VL and Qwen3-VL models, built offline.

What GPU training does differently is only the rollout engine (vLLM) and the optimiser; every piece of data
and every frame conversion a GRPO step relies on runs here for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_qwen import build_tiny_model, build_tiny_processor, save_tiny_checkpoint

from data_prep import to_verl
from dig_common.models import load_model_spec
from eval import dig
from eval.backends import HFBackend, prepare
from reward_fns import geometry
from reward_fns.dig_reward import RESULT_KEYS

REPO = Path(__file__).resolve().parents[1]
MODELS = {"qwen2_5_vl": "qwen2_5_vl_3b", "qwen3_vl": "qwen3_vl_4b_thinking"}  # abs_resized / rel1000 + think
NUM_PAIRS = 4


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    from data_prep.render.generate import GenerateConfig, generate

    out = tmp_path_factory.mktemp("pairs")
    stats = generate(
        GenerateConfig(out=out, num=NUM_PAIRS, k="1-2", width=64, height=64, samples=1, denoise=False, progress=False)
    )
    assert stats["accepted"] == NUM_PAIRS
    return out


def verl_data_config(spec, cache_dir):
    import verl
    from omegaconf import OmegaConf

    defaults = OmegaConf.load(Path(verl.__file__).parent / "trainer/config/data/legacy_data.yaml")
    return OmegaConf.merge(
        defaults,
        {
            "image_patch_size": spec.patch_size,
            "max_prompt_length": 2048,
            "filter_overlong_prompts": True,  # counts image tokens: a frame/bounds mistake would drop rows
            # None: filter in-process. With 1, datasets still forks a pool, which can deadlock in a process that
            # already runs threads (the render fixture's worker pipes, torch's pools).
            "filter_overlong_prompts_workers": None,
            "cache_dir": str(cache_dir),
        },
    )


def verl_reward_fn(spec):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    path = str(REPO / "reward_fns" / "dig_reward.py")
    function = {"path": path, "name": "compute_score", "reward_kwargs": spec.reward_kwargs()}
    config = OmegaConf.create({"reward": {"custom_reward_function": function}})
    fn = get_custom_reward_fn(config)
    assert fn is not None
    return fn


def to_verl_argv(pairs_dir: Path, parquet: Path, spec) -> list[str]:
    """``data_prep.to_verl`` arguments that convert the rendered pairs into the test split for ``spec``."""
    where = ["--pairs", str(pairs_dir), "--out", str(parquet)]
    return [*where, "--model", spec.model_name, "--stage", "test", "--split", "test"]


def gt_answer(ground_truth: str, spec) -> str:
    """The ground truth written as the model would answer: its frame, its JSON form, its think block."""
    gt = json.loads(ground_truth)
    frame = dict(factor=spec.resize_factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    boxes = geometry.from_pixels(gt["boxes"], spec.coord_mode, gt["width"], gt["height"], **frame).tolist()
    body = json.dumps([{"bbox_2d": b, "label": t} for b, t in zip(boxes, gt["types"], strict=True)])
    return ("<think>A and B differ here.</think>\n" if spec.require_think else "") + body


@pytest.mark.render
@pytest.mark.verl
@pytest.mark.parametrize("family", sorted(MODELS))
def test_render_convert_load_generate_score(family, pairs_dir, tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    spec = load_model_spec(MODELS[family])
    parquet = tmp_path / "test.parquet"
    assert to_verl.main(to_verl_argv(pairs_dir, parquet, spec)) == 0

    processor = build_tiny_processor(family)
    dataset = RLHFDataset(str(parquet), processor.tokenizer, verl_data_config(spec, tmp_path / "cache"), processor)
    assert len(dataset) == NUM_PAIRS  # none filtered out
    items = [dataset[i] for i in range(NUM_PAIRS)]

    # the frame the reward assumes is the frame the model sees: image grid == smart_resize with the parquet bounds
    _, images = prepare(processor, items[0]["raw_prompt"], spec.patch_size)
    grid = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"].tolist()
    width, height = items[0]["extra_info"]["width"], items[0]["extra_info"]["height"]
    seen = geometry.resized_size(height, width, spec.resize_factor, spec.min_pixels, spec.max_pixels)
    assert [(h * spec.patch_size, w * spec.patch_size) for _, h, w in grid] == [seen, seen]

    # generate with HF transformers on verl's own prompts (two images each), score with verl's reward loader
    backend = HFBackend(None, spec, max_new_tokens=8, model=build_tiny_model(family), processor=processor, batch_size=4)
    responses = backend.generate([item["raw_prompt"] for item in items])
    assert len(responses) == NUM_PAIRS and all(isinstance(r, str) for r in responses)
    reward_fn = verl_reward_fn(spec)
    for item, response in zip(items, responses, strict=True):
        out = reward_fn(
            data_source=item["data_source"],
            solution_str=response,
            ground_truth=item["reward_model"]["ground_truth"],
            extra_info=item["extra_info"],
        )
        assert list(out) == list(RESULT_KEYS) and all(isinstance(v, float) for v in out.values())
        assert out["num_gt"] == item["extra_info"]["num_differences"]

    # the ground truth answered in the model's frame scores 1.0 through the whole chain
    for item in items:
        ground_truth = item["reward_model"]["ground_truth"]
        out = reward_fn(
            data_source=item["data_source"],
            solution_str=gt_answer(ground_truth, spec),
            ground_truth=ground_truth,
            extra_info=item["extra_info"],
        )
        assert out["score"] == pytest.approx(1.0), (family, out)

    # and eval.dig reports the same on the parquet
    preds = tmp_path / "gt_answers.jsonl"
    answers = [
        {"pair_id": i["extra_info"]["pair_id"], "response": gt_answer(i["reward_model"]["ground_truth"], spec)}
        for i in items
    ]
    preds.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    out = tmp_path / "results.json"
    assert (
        dig.main(["--data", str(parquet), "--predictions", str(preds), "--model", spec.model_name, "--out", str(out)])
        == 0
    )
    results = json.loads(out.read_text())
    assert results["overall"]["f1"] == pytest.approx(1.0) and results["overall"]["score"] == pytest.approx(1.0)
    assert sum(s["n"] for s in results["per_type"].values()) == sum(i["extra_info"]["num_differences"] for i in items)


@pytest.mark.render
def test_eval_dig_generates_with_hf_backend_from_a_checkpoint(pairs_dir, tmp_path):
    """The CLI path a user runs on a merged checkpoint (here a tiny saved one), generation then scoring; a rerun
    resumes from the predictions file instead of generating again."""
    family = "qwen2_5_vl"
    spec = load_model_spec(MODELS[family])
    parquet = tmp_path / "test.parquet"
    assert to_verl.main(to_verl_argv(pairs_dir, parquet, spec)) == 0
    ckpt = save_tiny_checkpoint(family, tmp_path / "ckpt")
    out = tmp_path / "res" / "results.json"
    argv = ["--data", str(parquet), "--model-path", str(ckpt), "--backend", "hf", "--model", spec.model_name]
    argv += ["--out", str(out), "--max-new-tokens", "6", "--batch-size", "2"]
    assert dig.main(argv) == 0
    predictions = (tmp_path / "res" / "results.predictions.jsonl").read_text().splitlines()
    assert len(predictions) == NUM_PAIRS
    results = json.loads(out.read_text())
    assert results["overall"]["n"] == NUM_PAIRS
    assert np.isfinite(results["overall"]["score"])
    assert dig.main(argv) == 0  # resumes: nothing left to generate, nothing appended
    assert (tmp_path / "res" / "results.predictions.jsonl").read_text().splitlines() == predictions
