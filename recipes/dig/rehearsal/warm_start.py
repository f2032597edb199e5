"""Warm start of a tiny rehearsal policy: a short supervised pass on the ground-truth answers of the rehearsal's rows.

A random tiny policy never answers in the recipe's format, so every reward of a GRPO group is equal, every
advantage is zero and an update changes nothing. A few hundred teacher-forced steps on the right answers of the
rehearsal's own parquet (``data_prep.to_verl`` rows) make sampled answers sometimes parseable, with boxes that
vary from sample to sample: rewards then vary within a group and GRPO has something to learn.

Each example is what the policy sees in verl and what it should answer:

- the prompt: the row through verl's own ``RLHFDataset`` (its ``<image>`` placeholders filled with the row's two
  images and their pixel bounds), the images resized by verl's ``process_multi_modal_info`` with the processor's
  patch size, the processor's chat template with the generation prompt, then the processor (image tokens);
- the answer (:func:`target_answer`): the row's ``reward_model.ground_truth`` boxes (original pixels) converted
  into the model file's frame with ``reward_fns.geometry.from_pixels``, printed as the prompt asks
  (``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``), after a short thought closed by ``</think>`` for thinking
  models (their generation prompt already opened ``<think>``), then ``<|im_end|>``.

The loss is the cross-entropy on the answer tokens only (prompt and image tokens are masked), plain torch on CPU.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dig_common.models import ModelSpec
from reward_fns import geometry

DEFAULT_STEPS = 100
BATCH_SIZE = 8  # rows per step: same-size renders give same-length prompts, so a batch costs little more than a row
LEARNING_RATE = 5e-3
THOUGHT = "Compare A and B."
IGNORE_INDEX = -100  # torch's cross-entropy ignore index: prompt tokens carry no loss


def target_answer(ground_truth: str | dict, spec: ModelSpec) -> str:
    """The right answer to a row, as the model should print it (without the end-of-turn token).

    Boxes go from original pixels into the model's frame (rounded to integers, as models print them; ``rel1`` keeps
    three decimals); labels are the ground truth's change types when it names one per box, else ``"difference"``.
    """
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    boxes = geometry.from_pixels(
        gt["boxes"],
        spec.coord_mode,
        gt["width"],
        gt["height"],
        factor=spec.resize_factor,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
    )
    types = gt.get("types") or []
    labels = types if len(types) == len(boxes) else ["difference"] * len(boxes)
    answer = []
    for box, label in zip(boxes, labels, strict=True):
        values = [round(float(v), 3) for v in box] if spec.coord_mode == "rel1" else [int(v) for v in np.rint(box)]
        answer.append({"bbox_2d": values, "label": label})
    text = json.dumps(answer)
    if spec.require_think:
        text = f"{THOUGHT}\n</think>\n\n{text}"
    return text


@dataclass
class Example:
    """One teacher-forced sequence: the processor's tensors for prompt + answer and the answer-only labels."""

    tokens: dict  # per-token tensors (L,): input_ids, attention_mask, mm_token_type_ids (whatever the processor gives)
    images: dict  # per-image tensors: pixel_values (patches, dim), image_grid_thw (images, 3)
    labels: object  # torch.LongTensor (L,), IGNORE_INDEX on prompt tokens
    prompt_tokens: int
    image_tokens: int
    answer: str


def load_rows(parquet: Path, spec: ModelSpec, processor) -> list[tuple[list[dict], list, str]]:
    """(messages, images, ground truth) per row, as verl prepares a rollout prompt from the row."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from recipes.dig.rehearsal.tiny_models import verl_data_config

    config = verl_data_config(spec.family, filter_overlong_prompts=False, max_prompt_length=1 << 20)
    dataset = RLHFDataset(data_files=[str(parquet)], tokenizer=processor.tokenizer, config=config, processor=processor)
    patch = processor.image_processor.patch_size
    rows = []
    for index in range(len(dataset)):
        item = dataset[index]
        messages = item["raw_prompt"]
        images, _, _ = RLHFDataset._process_multi_modal_info(messages, image_patch_size=patch, config=config)
        rows.append((messages, list(images or []), item["reward_model"]["ground_truth"]))
    return rows


def build_examples(parquet: Path, spec: ModelSpec, processor) -> list[Example]:
    import torch

    tokenizer = processor.tokenizer
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    examples = []
    for messages, images, ground_truth in load_rows(parquet, spec, processor):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = dict(processor(text=[text], images=images or None, return_tensors="pt"))
        answer = target_answer(ground_truth, spec)
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        answer_ids = torch.tensor(answer_ids, dtype=torch.long)
        prompt_ids = inputs.pop("input_ids")[0]
        tokens = {"input_ids": torch.cat([prompt_ids, answer_ids])}
        for key in [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape == (1, len(prompt_ids))]:
            # attention mask: the answer is attended; token types (mm_token_type_ids): the answer is text (0)
            fill = 1 if key == "attention_mask" else 0
            tokens[key] = torch.cat([inputs.pop(key)[0], torch.full_like(answer_ids, fill)])
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids])
        image_tokens = int((prompt_ids == image_pad).sum())
        examples.append(Example(tokens, inputs, labels, len(prompt_ids), image_tokens, answer))
    if not examples:
        raise ValueError(f"--data {parquet}: the parquet has no rows to warm-start on")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict:
    """A right-padded batch (padding: pad id, attention 0, label IGNORE_INDEX) with the images concatenated."""
    import torch

    width = max(len(ex.labels) for ex in examples)

    def pad(tensor, value):
        return torch.cat([tensor, torch.full((width - len(tensor),), value, dtype=tensor.dtype)])

    batch = {
        key: torch.stack([pad(ex.tokens[key], pad_id if key == "input_ids" else 0) for ex in examples])
        for key in examples[0].tokens
    }
    batch["labels"] = torch.stack([pad(ex.labels, IGNORE_INDEX) for ex in examples])
    for key in examples[0].images:
        batch[key] = torch.cat([ex.images[key] for ex in examples])
    return batch


def answer_loss(model, examples: list[Example], pad_id: int, batch_size: int = BATCH_SIZE) -> float:
    """Mean cross-entropy per answer token over ``examples`` (no gradient)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / max(count, 1)


def warm_start(model, processor, spec: ModelSpec, parquet: Path, steps: int = DEFAULT_STEPS, seed: int = 0) -> dict:
    """Train ``model`` in place: ``steps`` AdamW steps (cosine decay) on batches of ``BATCH_SIZE`` rows of ``parquet``
    (shuffled, seeded), loss on the answer tokens only.

    Returns what happened: rows, steps, answer loss before and after, seconds, prompt and image token counts.
    """
    import torch

    started = time.monotonic()
    examples = build_examples(Path(parquet), spec, processor)
    pad_id = processor.tokenizer.pad_token_id
    loss_before = answer_loss(model.eval(), examples, pad_id)
    model.train()
    # the vision tower stays as built: the answer format needs none of it, and its patch convolution's backward is
    # most of a step's time on CPU
    model.model.visual.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = np.random.default_rng(seed)
    queue: list[int] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            if len(queue) < BATCH_SIZE:
                queue += [int(i) for i in order.permutation(len(examples))]
            picked, queue = queue[:BATCH_SIZE], queue[BATCH_SIZE:]
            loss = model(**collate([examples[i] for i in picked], pad_id)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    model.requires_grad_(True).eval()
    return {
        "rows": len(examples),
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "loss_before": round(loss_before, 4),
        "loss_after": round(answer_loss(model, examples, pad_id), 4),
        "seconds": round(time.monotonic() - started, 1),
        "prompt_tokens": sorted({ex.prompt_tokens for ex in examples}),
        "image_tokens": sorted({ex.image_tokens for ex in examples}),
    }
