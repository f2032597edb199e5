"""eval.backends: requests built from parquet rows like verl builds them; clear errors; vLLM imported lazily."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from dig_common.cli import CliError
from dig_common.models import load_model_spec
from eval import backends


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def test_messages_from_row_fills_placeholders_in_order_with_pixel_bounds():
    row = {
        "prompt": [
            {"role": "system", "content": "be careful"},
            {"role": "user", "content": "<image><image>Find every difference."},
        ],
        "images": [
            {"bytes": png((255, 0, 0)), "min_pixels": 1024, "max_pixels": 4096},
            {"bytes": png((0, 255, 0)), "min_pixels": 1024, "max_pixels": 4096, "path": None},
        ],
    }
    system, user = backends.dig_request(row)
    assert system == {"role": "system", "content": [{"type": "text", "text": "be careful"}]}
    a, b, text = user["content"]
    assert a["image"].getpixel((0, 0)) == (255, 0, 0) and b["image"].getpixel((0, 0)) == (0, 255, 0)  # A first
    assert a["min_pixels"] == 1024 and a["max_pixels"] == 4096 and "bytes" not in a and "path" not in b
    assert text == {"type": "text", "text": "Find every difference."}


def test_messages_from_row_counts_images():
    prompt = [{"role": "user", "content": "<image><image>x"}]
    with pytest.raises(ValueError, match="more <image> placeholders than the 1 images"):
        backends.messages_from_row(prompt, [{"bytes": png((0, 0, 0))}])
    with pytest.raises(ValueError, match="1 <image> placeholders but the row has 2 images"):
        backends.messages_from_row([{"role": "user", "content": "<image>x"}], [{"bytes": png((0, 0, 0))}] * 2)
    with pytest.raises(ValueError, match="PIL image or a dict with 'bytes'"):
        backends.messages_from_row([{"role": "user", "content": "<image>x"}], ["/no/such.png"])


def test_default_response_budget_comes_from_the_model_config():
    for model in ("qwen3_vl_8b_thinking", "qwen2_5_vl_7b"):
        spec = load_model_spec(model)
        assert backends.default_max_new_tokens(spec) == spec.decoding.max_new_tokens
    assert backends.default_max_new_tokens(load_model_spec("qwen3_vl_8b_thinking")) == 4096


def test_eval_decoding_is_the_model_file_s_with_overrides():
    thinking, greedy = load_model_spec("qwen3_vl_8b_thinking"), load_model_spec("qwen2_5_vl_7b")
    assert backends.eval_decoding(thinking) == thinking.decoding.__class__(**{**thinking.decoding.__dict__, "n": 1})
    assert backends.eval_decoding(thinking, n=None).n == thinking.decoding.n == 4  # the file's n when asked
    assert backends.eval_decoding(greedy, n=None).n == 1
    assert backends.eval_decoding(thinking, temperature=0.0, n=None).n == 1  # greedy override: one sample
    dec = backends.eval_decoding(thinking, max_new_tokens=64, temperature=0.6, seed=7)
    assert (dec.max_new_tokens, dec.temperature, dec.seed, dec.top_p) == (64, 0.6, 7, 0.95)
    with pytest.raises(ValueError, match="greedy decoding .* n=4"):
        backends.eval_decoding(greedy, n=4)


def test_vllm_sampling_params_follow_the_model_card():
    instruct = backends.eval_decoding(load_model_spec("qwen3_vl_8b_instruct"), n=None)
    expected = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5, "max_tokens": 1024}
    assert backends.vllm_sampling_kwargs(instruct) == {**expected, "n": 4, "seed": 0}
    greedy = backends.eval_decoding(load_model_spec("qwen2_5_vl_3b"))
    assert backends.vllm_sampling_kwargs(greedy) == {"temperature": 0.0, "max_tokens": 1024, "n": 1, "seed": 0}


class GenerateSpy:
    """Records the keyword arguments transformers' generate() receives, then runs it."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.inner = model.generate

    def __call__(self, **kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if not hasattr(v, "shape")})
        return self.inner(**kwargs)


def test_hf_backend_samples_n_answers_with_the_model_file_s_sampling(monkeypatch):
    from tiny_qwen import build_tiny_model, build_tiny_processor

    spec = load_model_spec("qwen3_vl_4b_thinking")
    model = build_tiny_model("qwen3_vl")
    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    processor = build_tiny_processor("qwen3_vl")
    backend = backends.HFBackend(None, spec, max_new_tokens=3, model=model, processor=processor, batch_size=2, n=2)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    image_item = {"type": "image", "image": image, "min_pixels": 1024, "max_pixels": 4096}
    request = [{"role": "user", "content": [image_item, {"type": "text", "text": "Find every difference."}]}]
    first = backend.generate_n([request] * 3)
    assert len(first) == 3 and all(len(g.texts) == 2 and len(g.truncated) == 2 for g in first)
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 20, "num_return_sequences": 2}
    assert spy.calls[0] == {"max_new_tokens": 3, **sampling}
    assert [g.texts for g in backend.generate_n([request] * 3)] == [g.texts for g in first]  # fixed seed
    assert backend.generate([request] * 3) == [g.texts[0] for g in first]  # the first sample of each

    greedy = backends.HFBackend(
        None, load_model_spec("qwen2_5_vl_3b"), max_new_tokens=2, model=model, processor=processor
    )
    greedy.spec = spec  # the tiny processor is a Qwen3-VL one: patch 16
    assert len(greedy.generate_n([request])[0].texts) == 1
    assert spy.calls[-1] == {"max_new_tokens": 2, "do_sample": False}


def test_build_backend_checks_inputs(tmp_path):
    spec = load_model_spec("qwen2_5_vl_7b")
    with pytest.raises(CliError, match="--model-path .*missing: no such folder"):
        backends.build_backend("hf", tmp_path / "missing", spec)
    with pytest.raises(CliError, match="--backend must be one of vllm, hf, got 'tgi'"):
        backends.build_backend("tgi", tmp_path, spec)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_explains_a_missing_vllm(tmp_path):
    """Before the checkpoint is even looked at (tmp_path is not one)."""
    with pytest.raises(CliError, match="vLLM is not installed .*; --backend hf generates with transformers"):
        backends.build_backend("vllm", tmp_path, load_model_spec("qwen3_vl_8b_thinking"))


class EchoBackend:
    """Answers each request with its number of images, to test resumable generation without a model."""

    def __init__(self):
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        return [f"{sum(item.get('type') == 'image' for m in r for item in m['content'])} images" for r in requests]


class SamplingEchoBackend(EchoBackend):
    def generate_n(self, requests):
        return [backends.Generation([f"{i}a", f"{i}b"], [False, True]) for i, _ in enumerate(self.generate(requests))]


def test_generate_to_file_keeps_every_sample_and_its_limit_flag(tmp_path):
    request = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    path = tmp_path / "p.jsonl"
    assert backends.generate_to_file(SamplingEchoBackend(), [[("a", request)]], path, "id") == 1
    expected = {"id": "a", "response": "0a", "responses": ["0a", "0b"], "truncated": [False, True]}
    assert json.loads(path.read_text()) == expected


def test_generate_to_file_appends_and_resumes(tmp_path):
    request = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
    path = tmp_path / "p.jsonl"
    backend = EchoBackend()
    assert backends.generate_to_file(backend, [[("a", request), ("b", request)], [("c", request)]], path, "id") == 3
    assert backends.read_done(path, "id") == {"a", "b", "c"}
    assert '"response": "2 images"' in path.read_text()
    # a rerun over the same ids plus one new one answers only the new one
    assert backends.generate_to_file(backend, [[("a", request), ("d", request)]], path, "id") == 1
    assert len(path.read_text().splitlines()) == 4 and backend.calls == 3
    # a run killed mid-write leaves a cut last line: resuming drops it, answers that id again, appends after it
    with open(path, "a") as handle:
        handle.write('{"id": "e", "resp')
    assert backends.generate_to_file(backend, [[("e", request), ("f", request)]], path, "id") == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "b", "c", "d", "e", "f"]  # every line whole, each id once
    # a damaged line that is not the last one is not a kill's doing: named, not dropped
    path.write_text(path.read_text().replace('{"id": "b"', '{"ID": "b"'))
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not a predictions line .* fix or delete that line"):
        backends.generate_to_file(backend, [[("g", request)]], path, "id")


def test_docs_decoding_table_matches_the_model_files():
    """docs/eval.md lists each model file's eval decoding; a changed file must change the table."""
    from dig_common.models import model_names

    docs = (Path(__file__).resolve().parents[1] / "docs" / "eval.md").read_text()
    for name in model_names():
        dec = load_model_spec(name).decoding
        row = next(line for line in docs.splitlines() if line.startswith("| `") and f"`{name}`" in line)
        assert row.endswith(f"| {dec.n} | {dec.max_new_tokens} |"), name
        assert ("| greedy" in row) == dec.greedy, name
        if not dec.greedy:
            assert f"temperature {dec.temperature}, top_p {dec.top_p}, top_k {dec.top_k}" in row, name
