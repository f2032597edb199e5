"""The tiny Qwen-VL fixture is faithful where the recipe depends on it: special tokens, chat templates, image-token
counts (== qwen_vl_utils.smart_resize), HF generate, offline save/load, and verl's RLHFDataset length filter."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from qwen_vl_utils import smart_resize
from tiny_qwen import (
    ADDED_TOKENS,
    FAMILIES,
    PATCH_SIZE,
    REAL_PROCESSOR_PIXEL_BOUNDS,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_tokenizer,
    default_pixel_bounds,
    resize_factor,
    save_tiny_checkpoint,
    verl_data_config,
)

IMAGE_SIZES = ((64, 64), (64, 96))  # (height, width) of the two test images
TWO_IMAGE_MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": "Find every difference."},
        ],
    }
]


def _image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _two_images(seed: int = 0) -> list[Image.Image]:
    return [_image(h, w, seed + i) for i, (h, w) in enumerate(IMAGE_SIZES)]


def _processor_inputs(processor, images):
    text = processor.apply_chat_template(TWO_IMAGE_MESSAGES, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images, return_tensors="pt")


def _predicted_tokens(family: str, height: int, width: int, min_pixels: int, max_pixels: int) -> int:
    factor = resize_factor(family)
    resized_h, resized_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (resized_h // factor) * (resized_w // factor)


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_added_tokens_are_single_ids_in_real_order(family):
    tokenizer = build_tiny_tokenizer(family)
    added = ADDED_TOKENS[family]
    ids = [tokenizer.encode(token, add_special_tokens=False) for token, _ in added]
    assert all(len(token_ids) == 1 for token_ids in ids)
    flat = [token_ids[0] for token_ids in ids]
    assert flat == list(range(flat[0], flat[0] + len(added)))  # same relative order as 151643..
    assert flat[-1] == len(tokenizer) - 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    # special tokens vanish with skip_special_tokens, <tool_call> (not special in Qwen) stays
    text = "<|im_start|>assistant\n<tool_call>x</tool_call><|im_end|>"
    decoded = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert decoded == "assistant\n<tool_call>x</tool_call>"


def test_think_tokens_only_in_qwen3():
    qwen3 = build_tiny_tokenizer("qwen3_vl")
    qwen25 = build_tiny_tokenizer("qwen2_5_vl")
    assert len(qwen3.encode("<think>")) == 1 and len(qwen3.encode("</think>")) == 1
    assert len(qwen25.encode("<think>")) > 1
    # <think> is not special: the reward sees it after skip_special_tokens decoding
    assert qwen3.decode(qwen3.encode("<think>a</think>b<|im_end|>"), skip_special_tokens=True) == "<think>a</think>b"


@pytest.mark.parametrize("family", FAMILIES)
def test_json_answer_round_trips(family):
    tokenizer = build_tiny_tokenizer(family)
    answer = json.dumps([{"bbox_2d": [12, 345, 678, 999], "label": "moved"}, {"bbox_2d": [0, 0, 1000, 1000]}])
    text = f"<think>\ncompare\n</think>\n\n```json\n{answer}\n```"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert json.loads(tokenizer.decode(ids).split("```json\n")[1].split("\n```")[0]) == json.loads(answer)


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_round_trips(text):
    tokenizer = build_tiny_tokenizer("qwen3_vl")
    # NFC normalisation is part of Qwen's tokenizer: compare against the normalised text
    import unicodedata

    normalised = unicodedata.normalize("NFC", text)
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == normalised


# ---------------------------------------------------------------- chat templates


def test_qwen2_5_vl_chat_template_renders_official_format():
    processor = build_tiny_processor("qwen2_5_vl")
    rendered = processor.apply_chat_template(TWO_IMAGE_MESSAGES, tokenize=False, add_generation_prompt=True)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{vision}{vision}Find every difference.<|im_end|>\n<|im_start|>assistant\n"
    )
    numbered = processor.apply_chat_template(TWO_IMAGE_MESSAGES, tokenize=False, add_vision_id=True)
    assert f"Picture 1: {vision}Picture 2: {vision}" in numbered


@pytest.mark.parametrize(("variant", "generation_prompt"), [("thinking", "<think>\n"), ("instruct", "")])
def test_qwen3_vl_chat_template_renders_official_format(variant, generation_prompt):
    processor = build_tiny_processor("qwen3_vl", variant=variant)
    rendered = processor.apply_chat_template(TWO_IMAGE_MESSAGES, tokenize=False, add_generation_prompt=True)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered == (
        f"<|im_start|>user\n{vision}{vision}Find every difference.<|im_end|>\n<|im_start|>assistant\n{generation_prompt}"
    )
    system = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "hi"}]
    assert processor.apply_chat_template(system, tokenize=False).startswith("<|im_start|>system\nBe exact.<|im_end|>\n")


@pytest.mark.parametrize("variant", ["instruct", "thinking"])
def test_qwen3_vl_templates_render_tools_and_tool_turns(variant):
    tokenizer = build_tiny_tokenizer("qwen3_vl", variant)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "ok", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "r"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "f", "parameters": {}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call>"
        ' XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        '<|im_start|>assistant\nok\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nr\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n" + ("<think>\n" if variant == "thinking" else "")
    )


def test_qwen3_vl_thinking_template_splits_reasoning_of_last_turn():
    tokenizer = build_tiny_tokenizer("qwen3_vl", "thinking")
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nwhy\n</think>\n\n[1, 2]"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        rendered == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nwhy\n</think>\n\n[1, 2]<|im_end|>\n"
    )


def test_unknown_family_and_variant_are_rejected():
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_tokenizer("llava")
    with pytest.raises(ValueError, match="no variant 'thinking'"):
        build_tiny_processor("qwen2_5_vl", variant="thinking")
    with pytest.raises(ValueError, match="min_pixels"):
        build_tiny_processor("qwen3_vl", min_pixels=10_000, max_pixels=100)


# ---------------------------------------------------------------- processor


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bounds", ["default", "downscale", "upscale", "real"])
def test_image_tokens_match_smart_resize(family, bounds):
    factor = resize_factor(family)
    min_pixels, max_pixels = {
        "default": default_pixel_bounds(family),
        "downscale": (factor * factor, 3 * factor * factor),  # 64x96 must shrink to <= 3 tokens
        "upscale": (64 * factor * factor, 256 * factor * factor),  # 64x64 must grow to >= 64 tokens
        "real": REAL_PROCESSOR_PIXEL_BOUNDS[family],
    }[bounds]
    processor = build_tiny_processor(family, min_pixels=min_pixels, max_pixels=max_pixels)
    assert processor.image_processor.patch_size == PATCH_SIZE[family]
    assert processor.image_processor.merge_size == 2
    inputs = _processor_inputs(processor, _two_images())
    expected = [_predicted_tokens(family, h, w, min_pixels, max_pixels) for h, w in IMAGE_SIZES]
    per_image = (inputs["image_grid_thw"].prod(dim=1) // 4).tolist()
    assert per_image == expected
    input_ids = inputs["input_ids"][0]
    assert (input_ids == processor.image_token_id).sum().item() == sum(expected)
    assert (input_ids == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum().item() == 2


def test_real_qwen3_vl_processor_bounds_upscale_small_fetched_images():
    """Documents the double-resize trap: the real Qwen3-VL processor min (65536 px) re-grows small images."""
    from qwen_vl_utils import fetch_image

    family = "qwen3_vl"
    factor = resize_factor(family)
    fetched = [
        fetch_image({"image": image, "min_pixels": factor * factor, "max_pixels": 16 * factor * factor}, 16)
        for image in _two_images()
    ]
    predicted = [(im.height // factor) * (im.width // factor) for im in fetched]
    assert predicted == [4, 6]
    no_op = build_tiny_processor(family)
    assert (_processor_inputs(no_op, fetched)["image_grid_thw"].prod(dim=1) // 4).tolist() == predicted
    low, high = REAL_PROCESSOR_PIXEL_BOUNDS[family]
    real = build_tiny_processor(family, min_pixels=low, max_pixels=high)
    regrown = (_processor_inputs(real, fetched)["image_grid_thw"].prod(dim=1) // 4).tolist()
    assert all(tokens >= 64 for tokens in regrown)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_types_match_real_checkpoints(family):
    processor = build_tiny_processor(family)
    expected = {
        "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
        "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    }[family]
    assert (type(processor).__name__, type(processor.video_processor).__name__) == expected
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_generates_from_two_image_prompt(family):
    processor = build_tiny_processor(family)
    model = build_tiny_model(family)
    tokenizer = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tokenizer)  # transformers 5: no top-level vocab_size
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.vision_config.patch_size == PATCH_SIZE[family]
    inputs = _processor_inputs(processor, _two_images())
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
        again = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
        logits = model(**inputs).logits[0, -1]
        other_logits = model(**_processor_inputs(processor, _two_images(seed=7))).logits[0, -1]
    assert generated.shape == (1, prompt_length + 5)
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert torch.equal(generated, again)  # greedy, deterministic
    assert not torch.allclose(logits, other_logits)  # the pixels reach the language model


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_save_load_round_trip_offline(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    min_pixels, max_pixels = default_pixel_bounds(family)
    checkpoint = save_tiny_checkpoint(family, tmp_path / "ckpt", min_pixels=min_pixels, max_pixels=max_pixels)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        path.name for path in checkpoint.iterdir()
    }
    processor = build_tiny_processor(family)
    model = build_tiny_model(family)
    loaded_processor = AutoProcessor.from_pretrained(checkpoint)
    loaded_model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert type(loaded_processor) is type(processor)
    assert type(loaded_model) is type(model)
    assert loaded_processor.chat_template == processor.chat_template
    assert loaded_processor.image_processor.patch_size == PATCH_SIZE[family]
    assert loaded_processor.image_processor.size.shortest_edge == min_pixels
    assert loaded_processor.image_processor.size.longest_edge == max_pixels
    assert loaded_tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    inputs = _processor_inputs(processor, _two_images())
    loaded_inputs = _processor_inputs(loaded_processor, _two_images())
    assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], loaded_inputs["pixel_values"])
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
        actual = loaded_model.generate(**loaded_inputs, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(expected, actual)
    assert loaded_model.generation_config.eos_token_id == model.generation_config.eos_token_id


# ---------------------------------------------------------------- verl RLHFDataset


def _png_bytes(height: int, width: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    _image(height, width, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_two_image_parquet(path, family: str, rows: int, image_min_pixels: int, image_max_pixels: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {
            "data_source": "dig_tiny",
            "prompt": [{"role": "user", "content": "<image><image>Find every difference. Answer in JSON."}],
            "images": [
                {
                    "bytes": _png_bytes(h, w, 10 * row + i),
                    "min_pixels": image_min_pixels,
                    "max_pixels": image_max_pixels,
                }
                for i, (h, w) in enumerate(IMAGE_SIZES)
            ],
            "reward_model": {"style": "rule", "ground_truth": "[]"},
            "extra_info": {"index": row, "family": family},
        }
        for row in range(rows)
    ]
    pq.write_table(pa.Table.from_pylist(records), path)


def _verl_data_config(family: str, max_prompt_length: int, cache_dir):
    return verl_data_config(family, max_prompt_length=max_prompt_length, cache_dir=str(cache_dir))


@pytest.mark.verl
@pytest.mark.parametrize("family", FAMILIES)
def test_rlhf_dataset_accepts_processor_and_counts_image_tokens(family, tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    factor = resize_factor(family)
    # per-image bounds that force a resize (64x96 -> fewer tokens), so qwen_vl_utils must honour the struct keys
    image_min_pixels, image_max_pixels = factor * factor, 4 * factor * factor
    parquet = tmp_path / "tiny.parquet"
    _write_two_image_parquet(
        parquet, family, rows=3, image_min_pixels=image_min_pixels, image_max_pixels=image_max_pixels
    )
    processor = build_tiny_processor(family)  # its own bounds contain the resized images: a no-op on them

    # expected prompt length: chat template + image tokens predicted by smart_resize with the per-image bounds
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    text = text.replace("x", "Find every difference. Answer in JSON.")
    text_tokens = len(processor.tokenizer.encode(text, add_special_tokens=False)) - 2  # minus the 2 <|image_pad|>
    image_tokens = sum(_predicted_tokens(family, h, w, image_min_pixels, image_max_pixels) for h, w in IMAGE_SIZES)
    assert image_tokens < sum(_predicted_tokens(family, h, w, *default_pixel_bounds(family)) for h, w in IMAGE_SIZES)
    prompt_length = text_tokens + image_tokens

    kept = RLHFDataset(str(parquet), processor.tokenizer, _verl_data_config(family, prompt_length, tmp_path), processor)
    assert len(kept) == 3
    dropped = RLHFDataset(
        str(parquet), processor.tokenizer, _verl_data_config(family, prompt_length - 1, tmp_path), processor
    )
    assert len(dropped) == 0  # the filter really counts every image token

    row = kept[0]
    images = [item for item in row["raw_prompt"][0]["content"] if item["type"] == "image"]
    assert len(images) == 2
    assert all(item["max_pixels"] == image_max_pixels for item in images)
    assert row["reward_model"]["ground_truth"] == "[]"


@pytest.mark.verl
def test_verl_data_config_defaults():
    config = verl_data_config("qwen3_vl", max_prompt_length=77)
    assert config.image_patch_size == 16 and config.max_prompt_length == 77
    assert config.filter_overlong_prompts is True and config.filter_overlong_prompts_workers is None
    assert config.prompt_key == "prompt" and config.image_key == "images"  # verl's own defaults survive
