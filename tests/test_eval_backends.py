"""eval.backends: requests built from parquet rows like verl builds them; clear errors; vLLM imported lazily."""

from __future__ import annotations

import importlib.util
import io

import pytest
from PIL import Image

from eval import backends
from recipes.dig.models import load_model_spec


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
    assert backends.default_max_new_tokens(load_model_spec("qwen3_vl_8b_thinking")) == 4096
    assert backends.default_max_new_tokens(load_model_spec("qwen2_5_vl_7b")) == 1024


def test_build_backend_checks_inputs(tmp_path):
    spec = load_model_spec("qwen2_5_vl_7b")
    with pytest.raises(FileNotFoundError, match="--model-path"):
        backends.build_backend("hf", tmp_path / "missing", spec)
    with pytest.raises(ValueError, match="--backend must be vllm or hf"):
        backends.build_backend("tgi", tmp_path, spec)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_explains_a_missing_vllm(tmp_path):
    with pytest.raises(ImportError, match="use --backend hf"):
        backends.build_backend("vllm", tmp_path, load_model_spec("qwen3_vl_8b_thinking"))


class EchoBackend:
    """Answers each request with its number of images, to test resumable generation without a model."""

    def __init__(self):
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        return [f"{sum(item.get('type') == 'image' for m in r for item in m['content'])} images" for r in requests]


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
