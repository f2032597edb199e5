"""Generation backends for eval: vLLM offline (GPU) and HF transformers ``generate`` (CPU-capable).

A request is a list of chat messages in the content-list form verl builds from a parquet row
(``RLHFDataset._build_messages``): image items hold a PIL image plus the row's ``min_pixels`` / ``max_pixels``.
Both backends prepare it the way verl's agent loop does for rollouts: ``qwen_vl_utils.process_vision_info``
with the model's patch size (the same smart_resize the reward assumes for ``abs_resized``), then the
processor's chat template; answers are decoded with ``skip_special_tokens=True`` like verl's reward input.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Protocol

import yaml
from PIL import Image

from recipes.dig.models import ModelSpec, model_file

IMAGE_SPLIT = re.compile(r"(<image>)")
DEFAULT_MAX_NEW_TOKENS = 1024
PROMPT_TOKEN_BUDGET = 8192  # two images at the configs' max_pixels plus the instruction fit well inside


class Backend(Protocol):
    def generate(self, requests: list[list[dict]]) -> list[str]: ...


def default_max_new_tokens(spec: ModelSpec) -> int:
    """The training response budget of the model config (``data.max_response_length``)."""
    config = yaml.safe_load(model_file(spec.model_name).read_text()) or {}
    return int((config.get("data") or {}).get("max_response_length") or DEFAULT_MAX_NEW_TOKENS)


def _image_item(entry) -> dict:
    if isinstance(entry, Image.Image):
        return {"type": "image", "image": entry.convert("RGB")}
    if isinstance(entry, dict) and entry.get("bytes") is not None:
        item = {k: v for k, v in entry.items() if k not in ("bytes", "path") and v is not None}
        item["image"] = Image.open(io.BytesIO(entry["bytes"])).convert("RGB")
        return {"type": "image", **item}
    raise ValueError(f"image entry must be a PIL image or a dict with 'bytes', got {type(entry).__name__}")


def messages_from_row(prompt: list[dict], images: list) -> list[dict]:
    """DESIGN §5 ``prompt`` + ``images`` -> content-list messages, ``<image>`` placeholders filled in order."""
    images = list(images or [])
    used = 0
    messages = []
    for message in prompt:
        content = message["content"]
        if not isinstance(content, str):
            messages.append(dict(message))
            continue
        parts = []
        for segment in IMAGE_SPLIT.split(content):
            if segment == "<image>":
                if used >= len(images):
                    raise ValueError(f"prompt has more <image> placeholders than the {len(images)} images")
                parts.append(_image_item(images[used]))
                used += 1
            elif segment:
                parts.append({"type": "text", "text": segment})
        messages.append({"role": message["role"], "content": parts})
    if used != len(images):
        raise ValueError(f"prompt has {used} <image> placeholders but the row has {len(images)} images")
    return messages


def dig_request(row: dict) -> list[dict]:
    """One DiG parquet row (prompt + images columns) as a request."""
    return messages_from_row(row["prompt"], row["images"])


def prepare(processor, messages: list[dict], patch_size: int) -> tuple[str, list[Image.Image]]:
    """(prompt text, resized images) exactly as verl's agent loop prepares a rollout prompt."""
    from qwen_vl_utils import process_vision_info

    images, _ = process_vision_info(messages, image_patch_size=patch_size)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, list(images or [])


class HFBackend:
    """transformers ``generate``; greedy at temperature 0. Works on CPU (slowly) for small models and tests."""

    def __init__(self, model_path, spec: ModelSpec, max_new_tokens: int | None = None, temperature: float = 0.0,
                 batch_size: int = 4, seed: int = 0, model=None, processor=None, device: str | None = None):  # fmt: skip
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.spec = spec
        self.max_new_tokens = max_new_tokens or default_max_new_tokens(spec)
        self.temperature = temperature
        self.batch_size = batch_size
        self.seed = seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = processor or AutoProcessor.from_pretrained(model_path)
        if model is None:
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)
        self.model = model.to(self.device).eval()

    def generate(self, requests: list[list[dict]]) -> list[str]:
        import torch

        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # batched decoder-only generation
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            batch = [
                prepare(self.processor, m, self.spec.patch_size) for m in requests[start : start + self.batch_size]
            ]
            texts = [text for text, _ in batch]
            images = [img for _, imgs in batch for img in imgs]
            inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device)
            sampling = (
                {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
            )
            torch.manual_seed(self.seed + start)
            with torch.no_grad():
                generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return out


class VLLMBackend:
    """vLLM offline engine: batched, two images per prompt (``limit_mm_per_prompt``). GPU only."""

    def __init__(self, model_path, spec: ModelSpec, max_new_tokens: int | None = None, temperature: float = 0.0,
                 tensor_parallel_size: int = 1, seed: int = 0, gpu_memory_utilization: float = 0.85,
                 max_images: int = 2, max_model_len: int | None = None):  # fmt: skip
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError(
                "the vllm backend needs vLLM (a GPU install: `pip install -r requirements.txt`); "
                "use --backend hf to generate with transformers instead"
            ) from err
        from transformers import AutoProcessor

        self.spec = spec
        self.processor = AutoProcessor.from_pretrained(model_path)
        max_new_tokens = max_new_tokens or default_max_new_tokens(spec)
        self.llm = LLM(
            model=str(model_path),
            tensor_parallel_size=tensor_parallel_size,
            limit_mm_per_prompt={"image": max_images},
            gpu_memory_utilization=gpu_memory_utilization,
            # bounded context: the checkpoints' native 256k would reserve KV cache eval never uses
            max_model_len=max_model_len or max_new_tokens + PROMPT_TOKEN_BUDGET,
            seed=seed,
        )
        self.sampling = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)

    def generate(self, requests: list[list[dict]]) -> list[str]:
        prompts = []
        for messages in requests:
            text, images = prepare(self.processor, messages, self.spec.patch_size)
            prompts.append({"prompt": text, "multi_modal_data": {"image": images}})
        outputs = self.llm.generate(prompts, self.sampling)
        return [o.outputs[0].text for o in outputs]


def build_backend(name: str, model_path, spec: ModelSpec, *, max_new_tokens: int | None = None,
                  temperature: float = 0.0, tensor_parallel_size: int = 1, seed: int = 0) -> Backend:  # fmt: skip
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"--model-path: not a folder: {model_path}")
    if name == "vllm":
        return VLLMBackend(model_path, spec, max_new_tokens, temperature, tensor_parallel_size, seed)
    if name == "hf":
        return HFBackend(model_path, spec, max_new_tokens, temperature, seed=seed)
    raise ValueError(f"--backend must be vllm or hf, got {name!r}")


def read_done(path: Path, key: str) -> set[str]:
    """Ids already answered in a predictions file (for resuming)."""
    import json

    if not path.exists():
        return set()
    with open(path) as handle:
        return {str(json.loads(line)[key]) for line in handle if line.strip()}


def generate_to_file(backend: Backend, batches, path: Path, key: str) -> int:
    """Answer ``batches`` (iterables of ``(id, request)``) and append ``{key: id, "response": text}`` lines to
    ``path`` after each batch, skipping ids already there: an interrupted run resumes. Returns the count."""
    import json

    done = read_done(path, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "a") as handle:
        for batch in batches:
            todo = [(i, r) for i, r in batch if str(i) not in done]
            if not todo:
                continue
            responses = backend.generate([r for _, r in todo])
            for (i, _), response in zip(todo, responses, strict=True):
                handle.write(json.dumps({key: i, "response": response}) + "\n")
                done.add(str(i))
            handle.flush()
            count += len(todo)
    return count
