"""One GRPO step on CPU through verl 0.9.1's own worker code, for tests/test_train_step.py and benchmarks/.

The chain is the GPU run's, with HF ``generate`` standing in for vLLM and one gloo process for the GPUs:
``data_prep.to_verl`` rows -> verl ``RLHFDataset`` -> HF ``generate`` (a group per prompt) -> the recipe's
reward loaded by verl's ``get_custom_reward_fn`` -> verl ``core_algos`` GRPO advantages -> old / reference
log-probs and policy updates in verl's ``ActorRolloutRefWorker`` (role ``actor`` and role ``ref``, FSDP2
engine), configured from ``dig_grpo.yaml`` composed the way the launcher composes it.

Workarounds of verl internals (each listed in docs/train_step.md with what it would take upstream):

1. ``CPUPlatform``: verl 0.9.1 registers no CPU platform; detection falls back to ``nvidia``
   (``verl/plugin/platform/platform_manager.py``, ``_detect_platform_name``, line 117). Registered through the
   public ``PlatformRegistry.register`` / ``set_platform`` plugin API.
2. ``VERL_ENGINE_DEVICE=cuda``: the FSDP engine is registered for ``cuda``/``npu`` only
   (``verl/workers/engine/fsdp/transformer_impl.py``, ``@EngineRegistry.register``); the registry's documented
   override (``verl/workers/engine/base.py`` line 405) picks it; the engine itself then runs on the CPU platform.
3. ``unpinned_ref_offload``: the forward-only FSDP2 engine (the reference policy) always offloads with
   ``CPUOffloadPolicy(pin_memory=True)`` (``verl/workers/engine/fsdp/transformer_impl.py`` line 462); pinning
   host memory needs a CUDA driver. Swapped for ``pin_memory=False`` while the workers are built.
4. ``transformers_patches_undone``: building a worker patches transformers' Qwen-VL classes process-wide
   (``verl/models/transformers/monkey_patch.py``, ``apply_monkey_patch`` line 294: ``forward`` of the
   model classes, ``_flash_attention_forward``); HF ``generate`` in a later test of the same pytest process
   (tests/test_e2e_cpu.py) would run verl's packed forward. The patched attributes are put back afterwards.
5. ``agent_loop_position_ids``: the agent loop's (4, L) multimodal position ids come from a method of
   ``AgentLoopWorker`` (``verl/experimental/agent_loop/agent_loop.py`` line 920, ``_compute_position_ids``), a
   Ray actor this test does not start; it is called unbound with a stand-in ``self`` holding only the processor.

Not workarounds but stand-ins, because this runs without Ray or TransferQueue: ``to_batch`` builds the jagged
TensorDict the V1 trainer's TransferQueue hands the workers (fields as ``trainer/ppo/v1/agent_loop_tq.py``
stores them) and ``with_info`` adds the trainer's per-call settings the way ``tqbridge`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from tiny_qwen import build_tiny_model, save_tiny_checkpoint, verl_data_config

REPO = Path(__file__).resolve().parents[1]
# Model files whose dig: block the tiny models stand in for (one per family).
MODELS = {"qwen2_5_vl": "qwen2_5_vl_3b", "qwen3_vl": "qwen3_vl_4b_thinking"}
NUM_PROMPTS = 2
GROUP_SIZE = 4  # responses per prompt: GROUP_SIZE - 1 sampled by HF generate + the ground-truth answer
SAMPLED_TOKENS = 6  # max new tokens per sampled response
NUM_UPDATES = 2
# Test-only knobs (not the recipe's): a random 0.2 M-parameter model needs a large step to move measurably in 3
# updates, and tiny batches. Everything the loss is made of (KL type and coefficient, loss aggregation, clip
# ratios, use_kl_loss) stays as the recipe composes it.
TINY_OVERRIDES = (
    "actor_rollout_ref.actor.optim.lr=1e-3",
    "actor_rollout_ref.actor.optim.weight_decay=0.0",
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0",
    f"actor_rollout_ref.actor.ppo_mini_batch_size={NUM_PROMPTS}",
    f"actor_rollout_ref.rollout.n={GROUP_SIZE}",
    f"data.train_batch_size={NUM_PROMPTS}",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=4096",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=4096",
    "trainer.n_gpus_per_node=1",
)
# The recipe's settings this test must use unchanged (asserted against the composed config).
RECIPE_LOSS_KEYS = ("use_kl_loss", "kl_loss_type", "kl_loss_coef", "loss_agg_mode", "clip_ratio_low", "clip_ratio_high")


def compose_recipe(overrides: list[str]):
    """dig_grpo.yaml composed exactly as the launcher composes it (the one place that names the launcher's API)."""
    from recipes.dig.launch import compose

    return compose(overrides)


# --------------------------------------------------------------------------------------------------------------
# verl on CPU: platform, engine device, unpinned reference offload, one gloo process


def cpu_platform_class():
    """verl's ``cpu`` platform: the CPU rehearsal's (recipes/dig/rehearsal/cpu_verl.py, workaround 1)."""
    from recipes.dig.rehearsal.cpu_verl import register_platform

    return register_platform()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# transformers modules whose classes / functions verl's apply_monkey_patch replaces for Qwen-VL models
PATCHED_MODULES = (
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
    "transformers.integrations.flash_attention",
)


@contextlib.contextmanager
def transformers_patches_undone() -> Iterator[None]:
    """Workaround 4: put back whatever verl patched in transformers' Qwen-VL modules (module and class attributes)."""
    import importlib
    import inspect

    saved = []
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        saved.append((module, dict(vars(module))))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name:
                saved.append((cls, dict(vars(cls))))
    try:
        yield
    finally:
        for owner, before in saved:
            for key, value in list(vars(owner).items()):
                if key not in before:
                    delattr(owner, key)
                elif before[key] is not value:
                    setattr(owner, key, before[key])


@contextlib.contextmanager
def verl_on_cpu() -> Iterator[None]:
    """verl's workers in this process: CPU platform, FSDP engine lookup, one gloo rank, unpinned ref offload."""
    import torch.distributed as dist
    from verl.plugin.platform import platform_manager
    from verl.workers.engine.fsdp import transformer_impl

    env = {
        "VERL_ENGINE_DEVICE": "cuda",  # workaround 2: the FSDP engine is registered for cuda/npu only
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    saved_env = {key: os.environ.get(key) for key in env}
    saved_platform = platform_manager._current_platform
    saved_policy = transformer_impl.CPUOffloadPolicy
    os.environ.update(env)
    # workaround 1: platform_manager.py line 117 falls back to nvidia; set_platform is the public override
    platform_manager.set_platform(cpu_platform_class()())
    # workaround 3: transformer_impl.py line 462 pins the reference's offloaded parameters (needs a CUDA driver)
    transformer_impl.CPUOffloadPolicy = lambda **kwargs: saved_policy(**{**kwargs, "pin_memory": False})
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with transformers_patches_undone():
            yield
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()
        transformer_impl.CPUOffloadPolicy = saved_policy
        platform_manager._current_platform = saved_platform
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------------------
# Rows, config, responses, rewards, advantages


def family_spec(family: str):
    from dig_common.models import load_model_spec

    return load_model_spec(MODELS[family])


def recipe_config(family: str, model_path: Path, extra: tuple[str, ...] = ()):
    """The recipe config for ``family``'s model file, with the launcher's attention choice for a flash-attn-less
    Python (sdpa; remove-padding off for Qwen2.5-VL, on for Qwen3-VL) and the tiny test knobs."""
    from recipes.dig.attention import choose_attention

    spec = family_spec(family)
    attention = choose_attention(spec, flash_attn=False)
    overrides = [
        f"base_model={spec.model_name}",
        "stage=stage1",
        "profile=cpu",  # the CPU rehearsal's choices: fp32 compute, no torch.compile (TINY_OVERRIDES win after it)
        *attention.overrides(),
        f"actor_rollout_ref.model.path={model_path}",
        *TINY_OVERRIDES,
        *extra,
    ]
    return compose_recipe(overrides)


def write_rows(out: Path, family: str, num: int = NUM_PROMPTS, seed: int = 11) -> Path:
    """``data_prep.to_verl`` rows for ``family``'s model from synthetic 64x64 pairs (no Blender)."""
    from data_prep import to_verl
    from data_prep.synthetic import write_pairs

    pairs = write_pairs(out / "pairs", num=num, k=lambda i: 1 + i % 2, seed=seed, width=64, height=64)
    parquet = out / f"{MODELS[family]}.parquet"
    to_verl.convert(pairs, parquet, MODELS[family], stage=1, split="train")
    return parquet


def rewrite_images(parquet: Path, edit: Callable[[dict], dict]) -> Path:
    """Rewrite every row with ``edit(row)`` (negative tests: one image, wrong bounds); same file, atomic."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    rows = [edit(row) for row in table.to_pylist()]
    tmp = parquet.with_name(parquet.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp)
    tmp.replace(parquet)
    return parquet


def one_image_rows(row: dict) -> dict:
    """A row that carries only image A (and one ``<image>`` placeholder): consistent, so only our checks catch it."""
    row["images"] = row["images"][:1]
    for message in row["prompt"]:
        message["content"] = message["content"].replace("<image><image>", "<image>", 1)
    return row


def wrong_bounds_rows(row: dict) -> dict:
    """A row whose per-image pixel bounds are not its model file's (here: 4x the minimum)."""
    for image in row["images"]:
        image["min_pixels"] *= 4
        image["max_pixels"] = max(image["max_pixels"], image["min_pixels"])
    return row


def load_items(parquet: Path, family: str, processor, cache_dir: Path) -> list[dict]:
    from verl.utils.dataset.rl_dataset import RLHFDataset

    spec = family_spec(family)
    config = verl_data_config(family, max_prompt_length=4096, cache_dir=str(cache_dir))
    assert config.image_patch_size == spec.patch_size
    dataset = RLHFDataset(str(parquet), processor.tokenizer, config, processor)
    return [dataset[i] for i in range(len(dataset))]


def reward_fn_from_config(cfg):
    """The reward exactly as verl loads it from the composed config (``reward.custom_reward_function``)."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    fn = get_custom_reward_fn(cfg)
    assert fn is not None, "reward.custom_reward_function.path is not set"
    return fn


def ground_truth_answer(ground_truth: str, spec) -> str:
    """The ground truth written as the model answers: its frame, its JSON form, its think block."""
    from reward_fns import geometry

    truth = json.loads(ground_truth)
    frame = dict(factor=spec.resize_factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    boxes = geometry.from_pixels(truth["boxes"], spec.coord_mode, truth["width"], truth["height"], **frame)
    pairs = zip(boxes.tolist(), truth["types"], strict=True)
    body = json.dumps([{"bbox_2d": [round(v) for v in box], "label": kind} for box, kind in pairs])
    return ("<think>B differs here.</think>\n" if spec.require_think else "") + body


def vision_token_ids(tokenizer) -> list[list[int]]:
    """Tokens a rollout must not emit: a random tiny policy samples them, and get_rope_index then fails."""
    names = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    return [[tokenizer.convert_tokens_to_ids(name)] for name in names]


@dataclass
class Prompt:
    """One dataset row after the processor: what the rollout and the agent loop's bookkeeping start from."""

    uid: str
    item: dict
    prompt_ids: list[int]
    multi_modal_inputs: dict  # pixel_values, image_grid_thw, mm_token_type_ids (as the processor returns them)


@dataclass
class Sample:
    """One trajectory in the agent loop's shape (prompt ids, response ids, the processor's vision inputs)."""

    prompt: Prompt
    response_ids: list[int]
    score: float = 0.0
    scored: dict = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return self.prompt.uid


def prepare_prompts(items: list[dict], processor, spec) -> list[Prompt]:
    """Chat template + vision inputs per row, as verl's agent loop prepares them; checks what reaches the tower."""
    from eval.backends import prepare

    prompts = []
    for index, item in enumerate(items):
        text, images = prepare(processor, item["raw_prompt"], spec.patch_size)
        inputs = processor(text=[text], images=images, return_tensors="pt")
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        prompts.append(Prompt(f"prompt{index}", item, inputs["input_ids"][0].tolist(), vision))
    check_two_images_per_row(prompts, spec)
    return prompts


def rollout(prompts: list[Prompt], model, processor, spec, seed: int = 0) -> list[Sample]:
    """Per prompt: GROUP_SIZE - 1 responses sampled by HF ``generate`` plus the ground-truth answer.

    A random tiny policy never answers correctly, so without the scripted answer every reward in a group is the
    same and GRPO has nothing to learn from; the scripted answer stands for the rollout a trained policy makes.
    Must run before any verl worker is built: verl patches the Qwen-VL ``forward`` at class level
    (``verl/models/transformers/monkey_patch.py``, ``apply_monkey_patch``) for its packed inputs.
    """
    import torch

    tokenizer = processor.tokenizer
    samples = []
    for index, prompt in enumerate(prompts):
        inputs = {"input_ids": torch.tensor([prompt.prompt_ids]), **prompt.multi_modal_inputs}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if spec.family == "qwen2_5_vl":  # Qwen2.5-VL's generate rejects the processor's mm_token_type_ids
            inputs.pop("mm_token_type_ids", None)
        torch.manual_seed(seed + index)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=SAMPLED_TOKENS,
                num_return_sequences=GROUP_SIZE - 1,
                bad_words_ids=vision_token_ids(tokenizer),
            )
        responses = [_strip_padding(row[len(prompt.prompt_ids) :].tolist(), tokenizer) for row in out]
        answer = ground_truth_answer(prompt.item["reward_model"]["ground_truth"], spec)
        responses.append(tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        samples += [Sample(prompt, response) for response in responses]
    return samples


def _strip_padding(ids: list[int], tokenizer) -> list[int]:
    """Generated ids up to and including the first stop token (generate pads finished rows)."""
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for position, token in enumerate(ids):
        if token in stops:
            return ids[: position + 1]
    return ids


def score(samples: list[Sample], reward_fn, tokenizer) -> None:
    """Score every response with verl's loaded reward (as verl's reward loop calls it: decoded, special skipped)."""
    for sample in samples:
        item = sample.prompt.item
        result = reward_fn(
            data_source=item["data_source"],
            solution_str=tokenizer.decode(sample.response_ids, skip_special_tokens=True),
            ground_truth=item["reward_model"]["ground_truth"],
            extra_info=item["extra_info"],
        )
        sample.scored = result if isinstance(result, dict) else {"score": float(result)}
        sample.score = float(sample.scored["score"])


def grpo_advantages(samples: list[Sample], cfg):
    """verl core_algos' estimator named by ``algorithm.adv_estimator`` (grpo), outcome reward on the last token."""
    import numpy as np
    import torch
    from verl.trainer.ppo import core_algos

    lengths = [len(s.response_ids) for s in samples]
    mask = torch.zeros(len(samples), max(lengths))
    rewards = torch.zeros_like(mask)
    for row, (length, sample) in enumerate(zip(lengths, samples, strict=True)):
        mask[row, :length] = 1
        rewards[row, length - 1] = sample.score
    estimator = core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator)
    advantages, _ = estimator(
        token_level_rewards=rewards,
        response_mask=mask,
        index=np.array([s.uid for s in samples], dtype=object),
        norm_adv_by_std_in_grpo=cfg.algorithm.get("norm_adv_by_std_in_grpo", True),
        config=cfg.algorithm,
    )
    return advantages, mask


# --------------------------------------------------------------------------------------------------------------
# The checks each failure mode trips (called by the test before any worker is built, and by the benchmark)


class TrainStepCheckError(AssertionError):
    """A property the GPU step relies on does not hold for these rows / rewards."""


def expected_grid(spec, width: int, height: int) -> list[int]:
    """(t, h, w) patch grid of one image resized with the model file's bounds (the frame the reward assumes)."""
    from reward_fns import geometry

    seen_h, seen_w = geometry.resized_size(height, width, spec.resize_factor, spec.min_pixels, spec.max_pixels)
    return [1, seen_h // spec.patch_size, seen_w // spec.patch_size]


def check_two_images_per_row(prompts: list[Prompt], spec) -> None:
    for prompt in prompts:
        info = prompt.item["extra_info"]
        grid = prompt.multi_modal_inputs["image_grid_thw"].tolist()
        want = expected_grid(spec, info["width"], info["height"])
        if len(grid) != 2:
            raise TrainStepCheckError(f"{prompt.uid}: {len(grid)} image(s) reached the processor, expected 2 (A, B)")
        if grid != [want, want]:
            raise TrainStepCheckError(
                f"{prompt.uid}: image grid {grid} != {[want, want]} from {spec.model_name}'s pixel bounds "
                f"({spec.min_pixels}, {spec.max_pixels}): the rows carry other bounds than the reward assumes"
            )


def check_rewards_discriminate(samples: list[Sample], advantages) -> None:
    groups: dict[str, list[float]] = {}
    for sample in samples:
        groups.setdefault(sample.uid, []).append(sample.score)
    if all(len(set(scores)) == 1 for scores in groups.values()):
        raise TrainStepCheckError(f"reward is constant within every group {groups}: GRPO advantages are all zero")
    if not bool((advantages != 0).any()):
        raise TrainStepCheckError("every GRPO advantage is zero")


# --------------------------------------------------------------------------------------------------------------
# verl's batch format and workers


def to_batch(samples: list[Sample], processor, advantages=None, mask=None):
    """The TensorDict the V1 trainer hands the workers: one jagged row per trajectory, agent-loop position ids."""
    import torch
    from tensordict import NonTensorStack, TensorDict

    fields: dict[str, list] = {
        k: [] for k in ("prompts", "responses", "input_ids", "attention_mask", "response_mask", "position_ids")
    }
    multi_modal = []
    for sample in samples:
        prompts = torch.tensor(sample.prompt.prompt_ids)
        responses = torch.tensor(sample.response_ids)
        input_ids = torch.cat([prompts, responses])
        attention_mask = torch.ones_like(input_ids)
        vision = dict(sample.prompt.multi_modal_inputs)
        grid = vision["image_grid_thw"]
        vision["images_seqlens"] = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
        fields["prompts"].append(prompts)
        fields["responses"].append(responses)
        fields["input_ids"].append(input_ids)
        fields["attention_mask"].append(attention_mask)
        fields["response_mask"].append(torch.ones_like(responses))
        fields["position_ids"].append(agent_loop_position_ids(processor, input_ids, attention_mask, vision))
        multi_modal.append(vision)
    data = {k: torch.nested.as_nested_tensor(v, layout=torch.jagged) for k, v in fields.items()}
    data["loss_mask"] = data["response_mask"]  # as verl's agent loop stores it (agent_loop_tq.py)
    batch = TensorDict(data, batch_size=[len(samples)])
    batch["multi_modal_inputs"] = NonTensorStack(*multi_modal)
    if advantages is not None:
        from verl.workers.utils.padding import response_to_nested

        batch["advantages"] = response_to_nested(advantages, batch["response_mask"])
    return batch


def agent_loop_position_ids(processor, input_ids, attention_mask, multi_modal_inputs):
    """(4, L) position ids as verl's agent loop computes them (``AgentLoopWorker._compute_position_ids``)."""
    # workaround 5: verl/experimental/agent_loop/agent_loop.py line 920 is a Ray actor's method; it reads only
    # self.processor, so it runs unbound with a stand-in self
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    # pops mm_token_type_ids from multi_modal_inputs, as the agent loop does before storing them
    return AgentLoopWorker._compute_position_ids(
        SimpleNamespace(processor=processor), input_ids[None], attention_mask[None], multi_modal_inputs
    ).squeeze(0)


def with_info(batch, **info):
    """``batch`` plus the trainer's per-call settings (KVBatchMeta.extra_info becomes non-tensor data in verl)."""
    from verl.utils import tensordict_utils as tu

    out = batch.clone()
    for key, value in info.items():
        tu.assign_non_tensor_data(out, key, value)
    return out


@dataclass
class Front:
    """Everything before the workers: config, processor, rows, rollouts, rewards, GRPO advantages."""

    family: str
    spec: object
    cfg: object
    checkpoint: Path
    processor: object
    prompts: list[Prompt]
    samples: list[Sample]
    advantages: object
    response_mask: object


def front_half(family: str, workdir: Path, parquet: Path | None = None, reward_path: str | None = None) -> Front:
    """Rows -> RLHFDataset -> HF generate -> verl-loaded reward -> GRPO advantages, with the checks on the way."""
    from verl.utils import hf_processor

    spec = family_spec(family)
    checkpoint = save_tiny_checkpoint(family, workdir / "checkpoint")
    extra = (f"reward.custom_reward_function.path={reward_path}",) if reward_path else ()
    cfg = recipe_config(family, checkpoint, extra)
    processor = hf_processor(str(checkpoint))  # verl's loader: binds the model's get_rope_index to it
    parquet = parquet or write_rows(workdir / "rows", family)
    items = load_items(parquet, family, processor, workdir / "cache")
    prompts = prepare_prompts(items, processor, spec)
    samples = rollout(prompts, build_tiny_model(family), processor, spec)
    score(samples, reward_fn_from_config(cfg), processor.tokenizer)
    advantages, mask = grpo_advantages(samples, cfg)
    check_rewards_discriminate(samples, advantages)
    return Front(family, spec, cfg, checkpoint, processor, prompts, samples, advantages, mask)


@dataclass
class StepResult:
    initial_log_probs: object  # (bs, max_response) padded, before any update
    final_log_probs: object  # after the last update
    ref_log_probs: object
    metrics: list[dict]  # update_actor metrics per update
    params_before: dict
    params_after: dict
    vision_grids: list[list[list[int]]]  # image_grid_thw of every vision-tower call in the actor, per call
    seconds_per_update: list[float]  # wall clock of each update_actor call
    cpu_seconds_per_update: list[float]  # CPU time of this process (all threads) per call: steadier on a shared box


def _full_state(module) -> dict:
    import torch

    state = {}
    for name, value in module.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[name] = value.detach().to(torch.float32).clone()
    return state


def _vision_tower(module):
    for name in ("visual", "model.visual"):
        tower = module
        for part in name.split("."):
            tower = getattr(tower, part, None)
        if tower is not None:
            return tower
    raise AttributeError(f"{type(module).__name__} has no vision tower (visual / model.visual)")


def train_steps(front: Front, num_updates: int = NUM_UPDATES) -> StepResult:
    """Reference pass, then ``num_updates`` GRPO steps (old log-probs -> update) in verl's own workers."""
    import copy
    import time

    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.padding import response_from_nested

    cfg = front.cfg
    temperature = cfg.actor_rollout_ref.rollout.temperature
    batch = to_batch(front.samples, front.processor, front.advantages, front.response_mask)
    response_mask = batch["response_mask"]

    def padded(nested):
        return response_from_nested(nested, response_mask).to_padded_tensor(0.0)

    def log_prob_request(entropy: bool):
        """A log-prob call's batch with the settings the trainer sends along."""
        return with_info(batch, calculate_entropy=entropy, compute_loss=False, temperature=temperature)

    with verl_on_cpu():
        ref = ActorRolloutRefWorker(config=copy.deepcopy(cfg.actor_rollout_ref), role="ref")
        ref.init_model()
        actor = ActorRolloutRefWorker(config=copy.deepcopy(cfg.actor_rollout_ref), role="actor")
        actor.init_model()
        module = actor.actor.engine.module
        grids: list = []
        hook = _vision_tower(module).register_forward_pre_hook(
            lambda _m, args, kwargs: grids.append(
                (kwargs.get("grid_thw", args[1] if len(args) > 1 else None)).tolist()
            ),
            with_kwargs=True,
        )
        params_before = _full_state(module)

        ref_out = ref.compute_ref_log_prob(log_prob_request(entropy=False))
        batch["ref_log_prob"] = response_from_nested(ref_out["log_probs"], response_mask)
        actor_cfg = cfg.actor_rollout_ref.actor
        mini_batch = actor_cfg.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n
        update_info = dict(
            calculate_entropy=actor_cfg.calculate_entropy or actor_cfg.entropy_coeff != 0,
            distillation_use_topk=False,
            distillation_only=False,
            global_batch_size=mini_batch,
            mini_batch_size=mini_batch,
            epochs=actor_cfg.ppo_epochs,
            seed=actor_cfg.data_loader_seed,
            dataloader_kwargs={"shuffle": actor_cfg.shuffle},
            temperature=temperature,
        )
        metrics, log_probs, seconds, cpu_seconds = [], [], [], []
        for _ in range(num_updates):
            old = actor.compute_log_prob(log_prob_request(entropy=True))
            batch["old_log_probs"] = response_from_nested(old["log_probs"], response_mask)
            log_probs.append(padded(old["log_probs"]))
            start, cpu_start = time.perf_counter(), time.process_time()
            out = actor.update_actor(with_info(batch, **update_info))
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            metrics.append(dict(out["metrics"]))
        final = actor.compute_log_prob(log_prob_request(entropy=False))
        hook.remove()
        return StepResult(
            initial_log_probs=log_probs[0],
            final_log_probs=padded(final["log_probs"]),
            ref_log_probs=padded(ref_out["log_probs"]),
            metrics=metrics,
            params_before=params_before,
            params_after=_full_state(module),
            vision_grids=grids,
            seconds_per_update=seconds,
            cpu_seconds_per_update=cpu_seconds,
        )
