"""dig_common.prompts (templates per frame / variant, system prompt) and data_prep.budget (prompt-length check)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from data_prep import budget as budget_mod
from data_prep import to_verl
from data_prep.synthetic import write_pairs
from dig_common import prompts
from dig_common.models import load_model_spec, model_names

FRAME_PHRASES = {
    "rel1000": "0-1000 scale",
    "abs_resized": "absolute pixel positions in the image as you see it",
    "abs": "absolute pixel positions in the original image",
    "rel1": "fractions of the image size between 0 and 1",
}


@pytest.mark.parametrize("name", model_names())
def test_every_model_gets_a_complete_prompt(name):
    spec = load_model_spec(name)
    messages = prompts.build_prompt(spec)
    assert [m["role"] for m in messages] == ["user"]
    content = messages[0]["content"]
    assert content.startswith("<image><image>") and content.count("<image>") == 2
    assert "The first image is A" in content and "the second image is B" in content
    assert "number of differences is not given" in content
    assert '[{"bbox_2d": [x1, y1, x2, y2], "label": ' in content
    assert "empty list: []" in content
    assert FRAME_PHRASES[spec.coord_mode] in content
    assert "$" not in content  # every template slot filled


def test_frame_wording_follows_coord_mode():
    spec = load_model_spec("qwen3_vl_8b_instruct")
    for mode, phrase in FRAME_PHRASES.items():
        text = prompts.build_instruction(dataclasses.replace(spec, coord_mode=mode))
        assert phrase in text
        assert all(other not in text for m, other in FRAME_PHRASES.items() if m != mode)


def test_thinking_variant_asks_for_reasoning_then_the_list():
    thinking = prompts.build_instruction(load_model_spec("qwen3_vl_8b_thinking"))
    instruct = prompts.build_instruction(load_model_spec("qwen3_vl_8b_instruct"))
    assert "reasoning" in thinking and "final answer" in thinking
    assert "reasoning" not in instruct
    assert thinking != instruct


def test_system_prompt_option():
    spec = load_model_spec("qwen2_5_vl_7b")
    assert prompts.build_prompt(spec, system_prompt=None)[0]["role"] == "user"
    default = prompts.build_prompt(spec, system_prompt="default")
    assert default[0] == {"role": "system", "content": (prompts.PROMPT_DIR / "system.txt").read_text().strip()}
    custom = prompts.build_prompt(spec, system_prompt="Be brief.")
    assert custom[0] == {"role": "system", "content": "Be brief."} and custom[1]["role"] == "user"
    with pytest.raises(ValueError, match="system prompt is empty"):
        prompts.build_prompt(spec, system_prompt="  ")


def test_missing_template_is_named(tmp_path):
    spec = dataclasses.replace(load_model_spec("qwen2_5_vl_7b"), prompt_variant="chatty")
    with pytest.raises(ValueError, match=r"no prompt_variant template .*chatty\.txt; available: instruct, thinking"):
        prompts.build_prompt(spec)


def test_templates_are_files_that_change_the_prompt(tmp_path):
    (tmp_path / "coords").mkdir()
    (tmp_path / "instruct.txt").write_text("Spot the changes. $coordinate_frame\n")
    (tmp_path / "coords" / "abs_resized.txt").write_text("Pixels.")
    spec = load_model_spec("qwen2_5_vl_7b")
    assert prompts.build_prompt(spec, prompt_dir=tmp_path) == [
        {"role": "user", "content": "<image><image>Spot the changes. Pixels."}
    ]
    (tmp_path / "instruct.txt").write_text("Spot $unknown_slot")
    with pytest.raises(ValueError, match="bad template placeholder"):
        prompts.build_prompt(spec, prompt_dir=tmp_path)


def test_vision_messages_carry_images_in_order_with_bounds():
    spec = load_model_spec("qwen3_vl_8b_thinking")
    messages = prompts.build_vision_messages(spec, "a.png", "b.png", system_prompt="default")
    assert [m["role"] for m in messages] == ["system", "user"]
    parts = messages[1]["content"]
    assert [(p["type"], p.get("image")) for p in parts] == [("image", "a.png"), ("image", "b.png"), ("text", None)]
    assert all((p["min_pixels"], p["max_pixels"]) == (spec.min_pixels, spec.max_pixels) for p in parts[:2])
    assert parts[2]["text"] == prompts.build_instruction(spec)


# ---------------------------------------------------------------- prompt-length budget


def test_largest_image_hits_max_pixels():
    for name in ("qwen2_5_vl_7b", "qwen3_vl_8b_thinking"):
        spec = load_model_spec(name)
        width, height = budget_mod.largest_image_size(spec)
        factor = spec.resize_factor
        assert width % factor == 0 and height % factor == 0
        assert (width // factor) * (height // factor) == spec.max_pixels // factor**2


@pytest.mark.verl
@pytest.mark.parametrize("model", ["qwen2_5_vl_7b", "qwen3_vl_8b_thinking"])
def test_budget_counts_exactly_what_verl_filters(model, tmp_path):
    """The budget's count is the length verl's filter computes: max_prompt_length = count keeps the row, count-1 drops it."""
    from test_to_verl import load_with_verl
    from tiny_qwen import build_tiny_processor

    spec = load_model_spec(model)
    processor = build_tiny_processor(spec.family, spec.prompt_variant)
    # 700x100: a height where resizing with the wrong factor (28 instead of 32, i.e. data.image_patch_size=14 for
    # Qwen3-VL) gives a different token count even after the processor's own re-rounding.
    result = budget_mod.check_prompt_budget(processor, model, image_size=(700, 100))
    assert result.image_tokens * 2 < result.prompt_tokens
    pairs = write_pairs(tmp_path / "pairs", num=1, seed=4, width=700, height=100)
    out = tmp_path / "one.parquet"
    to_verl.convert(pairs, out, model, stage=1, split="train")
    kept = load_with_verl(out, processor, spec.patch_size, result.prompt_tokens, tmp_path / "c1")
    assert len(kept) == 1
    dropped = load_with_verl(out, processor, spec.patch_size, result.prompt_tokens - 1, tmp_path / "c2")
    assert len(dropped) == 0


@pytest.mark.parametrize("model", ["qwen2_5_vl_3b", "qwen3_vl_4b_thinking"])
def test_budget_at_max_pixels_fails_with_numbers_and_knobs(model):
    from tiny_qwen import build_tiny_processor

    spec = load_model_spec(model)
    LIMIT = 1200  # below two images at max_pixels (2 x 512 tokens) + the instruction
    processor = build_tiny_processor(spec.family, spec.prompt_variant)
    result = budget_mod.check_prompt_budget(processor, model, max_prompt_length=LIMIT)
    max_tokens = spec.max_pixels // spec.resize_factor**2
    assert result.image_tokens == max_tokens  # two images at max_pixels
    assert result.prompt_tokens == 2 * max_tokens + result.text_tokens and result.text_tokens > 0
    assert not result.fits
    advice = result.advice(spec)
    assert f"needs {result.prompt_tokens} tokens" in advice and f"data.max_prompt_length={LIMIT}" in advice
    assert f"raise data.max_prompt_length to >= {result.prompt_tokens}" in advice
    per_image = (LIMIT - result.text_tokens) // 2
    assert "lower dig.max_pixels in " in advice and f"<= {per_image * spec.resize_factor**2}" in advice
    # Following the advice makes it fit.
    assert budget_mod.check_prompt_budget(processor, model, max_prompt_length=result.prompt_tokens).fits
    smaller = dataclasses.replace(spec, max_pixels=per_image * spec.resize_factor**2)
    size = budget_mod.largest_image_size(smaller)
    assert budget_mod.check_prompt_budget(processor, model, max_prompt_length=LIMIT, image_size=size).fits


def test_budget_cli_exit_codes(tmp_path, capsys):
    from tiny_qwen import build_tiny_processor

    saved = tmp_path / "proc"
    build_tiny_processor("qwen2_5_vl", save_dir=saved)
    argv = ["--model", "qwen2_5_vl_7b", "--processor", str(saved), "--image-size", "480x320"]
    assert budget_mod.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["resized_size"] == [476, 308] and report["image_tokens"] == 17 * 11
    assert report["max_prompt_length"] == budget_mod.max_prompt_length_of("qwen2_5_vl_7b")
    assert budget_mod.main([*argv, "--max-prompt-length", "300"]) == 1
    assert "raise data.max_prompt_length" in capsys.readouterr().err
    assert budget_mod.main(["--model", "qwen9"]) == 2
