"""The CPU rehearsal's tiny policies (recipes/dig/rehearsal): the CLI builds a seeded, loadable checkpoint of each
tiny model file, atomically, and its warm start teaches the recipe's answer format on the rehearsal's own rows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from data_prep import to_verl
from data_prep.synthetic import write_pairs
from dig_common.models import load_model_spec
from recipes.dig.rehearsal import tiny_models, warm_start
from reward_fns.dig_reward import compute_score

TINY_MODELS = ("tiny_qwen2_5_vl", "tiny_qwen3_vl_thinking")
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention kernels


def build(capsys, *args: str) -> tuple[int, dict | None, str]:
    """Run the CLI in this process: (exit status, its JSON line, stderr); argparse's flag errors exit too."""
    try:
        code = tiny_models.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else None, err


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Rehearsal-style rows: 8 synthetic 64x64 pairs with one difference, converted for each tiny model file."""
    root = tmp_path_factory.mktemp("rows")
    pairs = write_pairs(root / "pairs", num=8, k=1, seed=40, width=64, height=64)
    for name in TINY_MODELS:
        to_verl.convert(pairs, root / f"{name}.parquet", name, stage=1, split="train")
    return root


@pytest.mark.parametrize("name", TINY_MODELS)
def test_cli_builds_a_seeded_checkpoint_that_transformers_loads(name, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    spec = load_model_spec(name)
    code, result, _ = build(capsys, "--model", name, "--out", str(tmp_path / "a"), "--seed", "3")
    assert code == 0 and result["status"] == "built" and result["steps"] == 0
    assert (result["family"], result["variant"], result["seed"]) == (spec.family, spec.prompt_variant, 3)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "a")
    processor = AutoProcessor.from_pretrained(tmp_path / "a")
    text = model.config.text_config
    assert text.head_dim in VLLM_CPU_HEAD_SIZES and text.num_attention_heads % text.num_key_value_heads == 0
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    expected_class = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}
    assert type(model).__name__ == expected_class[spec.family]
    # the processor resizes as the parquet says (the model file's bounds), so it never resizes verl's images again
    assert processor.image_processor.size == {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    assert processor.image_processor.patch_size == spec.patch_size
    generation_prompt = processor.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert generation_prompt.endswith("<think>\n") == spec.require_think
    # seeded: the same seed gives the same weights, another seed others
    build(capsys, "--model", name, "--out", str(tmp_path / "b"), "--seed", "3")
    build(capsys, "--model", name, "--out", str(tmp_path / "c"), "--seed", "4")
    a, b, c = (load_file(tmp_path / d / "model.safetensors") for d in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_rerun_keeps_an_equal_build_and_refuses_another(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert build(capsys, "--model", "tiny_qwen2_5_vl", "--out", str(out))[0] == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    code, result, _ = build(capsys, "--model", "tiny_qwen2_5_vl", "--out", str(out))
    assert (code, result["status"]) == (0, "up to date")
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    code, result, err = build(capsys, "--model", "tiny_qwen2_5_vl", "--out", str(out), "--seed", "1")
    assert (code, result) == (2, None)
    assert err.strip() == (
        f"python -m recipes.dig.rehearsal.tiny_models: error: --out {out} already holds a tiny checkpoint built "
        "with other settings: delete it or choose another --out"
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = build(capsys, "--model", "tiny_qwen2_5_vl", "--out", str(tmp_path / "other"))
    assert code == 2 and "holds files that are not a tiny checkpoint" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny_nope"], "unknown model 'tiny_nope'; known models: "),
        (
            ["--model", "tiny_qwen2_5_vl", "--data", "{tmp}/missing.parquet"],
            "--data {tmp}/missing.parquet: no such file",
        ),
        (["--model", "tiny_qwen2_5_vl", "--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, _, err = build(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", str(out))
    last = err.strip().splitlines()[-1]  # argparse's flag errors print the usage above it, as every tool's do
    assert code == 2 and (len(err.strip().splitlines()) == 1 or "--steps" in args)
    assert last.startswith("python -m recipes.dig.rehearsal.tiny_models: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in last
    assert list(tmp_path.iterdir()) == []


def test_a_build_that_fails_midway_leaves_nothing(rows, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("killed during the warm start")

    monkeypatch.setattr(warm_start, "warm_start", fail)
    spec = load_model_spec("tiny_qwen2_5_vl")
    with pytest.raises(RuntimeError, match="killed"):
        tiny_models.build_checkpoint(spec, tmp_path / "ckpt", data=rows / "tiny_qwen2_5_vl.parquet", steps=1)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary folder


@pytest.mark.parametrize("name", TINY_MODELS)
def test_target_answer_is_a_perfect_answer_in_the_model_frame(name):
    spec = load_model_spec(name)
    gt = {"boxes": [[10, 5, 30, 25], [40, 40, 64, 60]], "width": 64, "height": 64, "types": ["color", "added"]}
    answer = warm_start.target_answer(json.dumps(gt), spec)
    result = compute_score("dig", answer, json.dumps(gt), **spec.reward_kwargs())
    assert (result["format"], result["f1"]) == (1.0, 1.0) and result["miou"] > 0.9
    listed = json.loads(answer.rsplit("</think>", 1)[-1])
    assert [item["label"] for item in listed] == ["color", "added"]
    if spec.coord_mode == "rel1000":
        assert listed[0]["bbox_2d"] == [156, 78, 469, 391]  # 10 / 64 * 1000 ...
    else:  # abs_resized: 64x64 -> 56x56 for Qwen2.5-VL's factor 28
        assert listed[0]["bbox_2d"] == [9, 4, 26, 22]
    assert answer.startswith(f"{warm_start.THOUGHT}\n</think>\n\n") == spec.require_think


def test_examples_mask_the_prompt_and_hold_verls_image_tokens(rows):
    spec = load_model_spec("tiny_qwen3_vl_thinking")
    processor = tiny_models.build_tiny_processor(spec.family, spec.prompt_variant, spec.min_pixels, spec.max_pixels)
    examples = warm_start.build_examples(rows / "tiny_qwen3_vl_thinking.parquet", spec, processor)
    assert len(examples) == 8
    tokenizer = processor.tokenizer
    for ex in examples:
        ids, labels = ex.tokens["input_ids"], ex.labels
        assert (labels[: ex.prompt_tokens] == warm_start.IGNORE_INDEX).all()
        assert tokenizer.decode(labels[ex.prompt_tokens :]) == ex.answer + "<|im_end|>"
        assert torch.equal(ids[ex.prompt_tokens :], labels[ex.prompt_tokens :])
        # two 64x64 images inside the bounds: (64 / 16)^2 / 4 = 4 merged tokens each
        assert ex.image_tokens == 8 and int((ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 8
        assert tokenizer.decode(ids[: ex.prompt_tokens]).endswith("<|im_start|>assistant\n<think>\n")
        assert ex.images["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]


@pytest.mark.slow
def test_warm_start_lowers_the_loss_and_makes_sampled_answers_parseable(rows, tmp_path, capsys):
    """The thinking family (the recipe's default, and the harder format: a closed thought before the list)."""
    import pyarrow.parquet as pq

    from eval.backends import HFBackend, dig_request

    name = "tiny_qwen3_vl_thinking"
    spec = load_model_spec(name)
    data = rows / f"{name}.parquet"
    code, result, _ = build(capsys, "--model", name, "--out", str(tmp_path / "warm"), "--data", str(data))
    assert code == 0
    stats = result["warm_start"]
    assert stats["rows"] == 8 and stats["loss_after"] < 0.5 * stats["loss_before"], stats
    backend = HFBackend(tmp_path / "warm", spec, temperature=1.0, n=8, max_new_tokens=96, seed=0)
    records = pq.read_table(data).to_pylist()[:2]
    formats = []
    for record, generation in zip(records, backend.generate_n([dig_request(r) for r in records]), strict=True):
        gt = record["reward_model"]["ground_truth"]
        formats += [compute_score("dig", t, gt, **spec.reward_kwargs())["format"] for t in generation.texts]
    assert sum(formats) > 0, formats
