"""Prompt-length budget check: does the longest DiG prompt fit ``data.max_prompt_length``?

    python -m data_prep.budget --model NAME [--processor HF_ID_OR_DIR] [--max-prompt-length N] [--image-size WxH]

verl never truncates a multimodal prompt: an over-long one is either dropped by ``filter_overlong_prompts`` or
fails in the rollout ("image features and image tokens do not match", "Multimodal prompt produced N tokens").
So we count the prompt exactly as verl's length filter does (chat template + ``qwen_vl_utils.process_vision_info``
with the row's min/max_pixels + the processor) for the longest prompt: two images at ``max_pixels`` (the default,
valid for any image size) or at ``--image-size`` (the rendered size, e.g. 480x320), plus the instruction text.
Works with the real HF processor (``--processor``, default the model's ``hf_path``) and with the tiny test one.
The processor is read from disk only (a local folder or the Hugging Face cache), never downloaded: without it the
tool stops with one error line (``ProcessorNotFound``, exit 2) naming the fixes: the download command, a local
copy, or ``--estimate``: the launch dry run's offline bound, image tokens from ``smart_resize`` plus a fixed
allowance for the text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from dig_common.checkpoints import processor_download_command
from dig_common.cli import CliError, cli_main, tool_parser
from dig_common.models import ModelSpec, load_model_spec, model_file
from dig_common.prompts import build_vision_messages

PROG = "python -m data_prep.budget"
# Text part of a prompt (instruction + chat template) in tokens: a generous bound for the offline estimate.
PROMPT_TEXT_TOKENS = 300
DEFAULT_MAX_PROMPT_LENGTH = 512  # verl's legacy_data.yaml default, used when the model file sets none


class ProcessorNotFound(CliError):
    """The model's processor is neither a local folder nor in the Hugging Face cache; the message has the fixes."""


def processor_fixes(spec: ModelSpec) -> str:
    """The three ways out of a missing processor (docs/cli.md, errors)."""
    return (
        f"fix: download its processor files (a few MB, no weights) with `{processor_download_command(spec.hf_path)}`, "
        "or point at a local copy with --processor PATH, or add --estimate for the offline bound the launch dry run "
        "checks"
    )


def load_processor(spec: ModelSpec, processor: str | None = None):
    """The HF processor from ``processor`` (a folder or a hub id) or the model's ``hf_path``, from disk only:
    ``local_files_only`` so a missing one fails at once instead of retrying the hub. A hub id that the cache lacks
    is found out before transformers is imported (seconds instead of half a minute)."""
    source = processor or spec.hf_path
    local = Path(source).expanduser()
    looks_like_path = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    missing = f"no processor for {spec.model_name}"
    if looks_like_path and not local.is_dir():
        raise ProcessorNotFound(f"--processor {source}: no such folder; {processor_fixes(spec)}")
    if not looks_like_path:
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(source, local_files_only=True)
        except (OSError, ValueError) as err:  # LocalEntryNotFoundError; HFValidationError for a malformed id
            raise ProcessorNotFound(
                f"{missing}: {source} is not in the Hugging Face cache; {processor_fixes(spec)}"
            ) from err
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(local) if looks_like_path else source, local_files_only=True)
    except (OSError, ValueError) as err:
        where = f"folder {local}" if looks_like_path else f"{source} (in the Hugging Face cache)"
        reason = str(err).splitlines()[0].split(". ")[0][:200]  # transformers' first sentence says what is wrong
        raise ProcessorNotFound(f"{missing}: {where}: {reason}; {processor_fixes(spec)}") from err


def prompt_token_bound(width: int, height: int, spec: ModelSpec) -> int:
    """Upper bound of a two-image prompt in tokens without a processor: image tokens after smart_resize (exact)
    plus PROMPT_TEXT_TOKENS. The launch dry run checks data.max_prompt_length with it."""
    from reward_fns.geometry import resized_size

    h, w = resized_size(height, width, spec.resize_factor, spec.min_pixels, spec.max_pixels)
    return 2 * (h * w) // (spec.resize_factor**2) + PROMPT_TEXT_TOKENS


def offline_estimate(spec: ModelSpec, image_size: tuple[int, int], max_prompt_length: int) -> dict:
    """The launch dry run's bound without a processor: two images' tokens from smart_resize (exact) plus its fixed
    allowance for instruction and chat template."""
    from reward_fns.geometry import resized_size

    width, height = image_size
    h, w = resized_size(height, width, spec.resize_factor, spec.min_pixels, spec.max_pixels)
    bound = prompt_token_bound(width, height, spec)
    return {
        "model": spec.model_name,
        "estimate": True,
        "image_size": [width, height],
        "resized_size": [w, h],
        "image_tokens": h * w // spec.resize_factor**2,
        "text_tokens_allowance": PROMPT_TEXT_TOKENS,
        "prompt_tokens_bound": bound,
        "max_prompt_length": max_prompt_length,
        "fits": bound <= max_prompt_length,
    }


@dataclass(frozen=True)
class PromptBudget:
    model: str
    image_size: tuple[int, int]  # (width, height) of each input image
    resized_size: tuple[int, int]  # (width, height) after smart_resize with the model's min/max_pixels
    image_tokens: int  # per image, as the processor expands <|image_pad|>
    prompt_tokens: int  # the whole prompt: chat template + 2 images + text
    max_prompt_length: int

    @property
    def text_tokens(self) -> int:
        return self.prompt_tokens - 2 * self.image_tokens

    @property
    def fits(self) -> bool:
        return self.prompt_tokens <= self.max_prompt_length

    def advice(self, spec: ModelSpec) -> str:
        """What to change when the prompt does not fit, with the numbers."""
        factor_sq = spec.resize_factor**2
        per_image = (self.max_prompt_length - self.text_tokens) // 2
        lines = [
            f"{self.model}: the longest prompt needs {self.prompt_tokens} tokens = 2 images x {self.image_tokens} "
            f"({self.image_size[0]}x{self.image_size[1]} px -> {self.resized_size[0]}x{self.resized_size[1]}) "
            f"+ {self.text_tokens} text/template tokens, but data.max_prompt_length={self.max_prompt_length}.",
            f"  fix: raise data.max_prompt_length to >= {self.prompt_tokens} "
            f"(e.g. data.max_prompt_length={math.ceil(self.prompt_tokens / 256) * 256})",
        ]
        if per_image >= 4:
            lines.append(
                f"   or: lower dig.max_pixels in {model_file(spec.model_name)} to <= {per_image * factor_sq} "
                f"({per_image} tokens of {spec.resize_factor}x{spec.resize_factor} px per image)"
            )
        return "\n".join(lines)


def max_prompt_length_of(model: str | Path) -> int:
    """``data.max_prompt_length`` the model's config file sets (the value the launch uses for that model)."""
    raw = yaml.safe_load(model_file(model).read_text()) or {}
    value = (raw.get("data") or {}).get("max_prompt_length")
    return int(value) if value is not None else DEFAULT_MAX_PROMPT_LENGTH


def largest_image_size(spec: ModelSpec, max_aspect: float = 4.0) -> tuple[int, int]:
    """(width, height) of an image that smart_resize keeps at the most tokens ``max_pixels`` allows.

    Grid rows x cols of merged patches with rows * cols <= max_pixels / factor^2, as large as possible with an
    aspect ratio of at most ``max_aspect`` (a prime token count would otherwise give a 1 x N strip).
    """
    factor = spec.resize_factor
    max_tokens = spec.max_pixels // factor**2
    best = (1, 1)
    for rows in range(1, math.isqrt(max_tokens) + 1):
        cols = max_tokens // rows
        if cols / rows <= max_aspect and rows * cols > best[0] * best[1]:
            best = (rows, cols)
    rows, cols = best
    return cols * factor, rows * factor


def measure_prompt(
    processor, spec: ModelSpec, image_size: tuple[int, int], system_prompt: str | None = None
) -> tuple[int, int, tuple[int, int]]:
    """(prompt tokens, image tokens per image, resized (w, h)) for two ``image_size`` images, counted like verl."""
    from PIL import Image
    from qwen_vl_utils import process_vision_info

    width, height = image_size
    image_a = Image.new("RGB", (width, height), (200, 30, 30))
    image_b = Image.new("RGB", (width, height), (30, 30, 200))
    messages = build_vision_messages(spec, image_a, image_b, system_prompt)
    # Same calls as RLHFDataset.maybe_filter_out_long_prompts: the factor comes from data.image_patch_size,
    # which the model file sets to spec.patch_size.
    images, _ = process_vision_info(messages, image_patch_size=spec.patch_size)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=images, return_tensors="np")
    prompt_tokens = len(inputs["input_ids"][0])
    merge = getattr(processor.image_processor, "merge_size", 2)
    grid = inputs["image_grid_thw"]
    per_image = [int(t * h * w) // merge**2 for t, h, w in grid]
    if len(per_image) != 2 or per_image[0] != per_image[1]:
        raise RuntimeError(f"expected two equal image grids, got {grid.tolist()}")
    return prompt_tokens, per_image[0], images[0].size


def check_prompt_budget(
    processor,
    model: str | Path,
    max_prompt_length: int | None = None,
    image_size: tuple[int, int] | None = None,
    system_prompt: str | None = None,
) -> PromptBudget:
    """Measure the longest prompt; ``image_size`` None means images at the model's ``max_pixels``."""
    spec = load_model_spec(model)
    if max_prompt_length is None:
        max_prompt_length = max_prompt_length_of(model)
    size = image_size or largest_image_size(spec)
    prompt_tokens, image_tokens, resized = measure_prompt(processor, spec, size, system_prompt)
    return PromptBudget(spec.model_name, tuple(size), tuple(resized), image_tokens, prompt_tokens, max_prompt_length)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from err
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return width, height


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(PROG, __doc__)
    parser.add_argument("--model", required=True, help="base model name or YAML path")
    parser.add_argument("--processor", default=None, help="HF id or local dir of the processor (default: hf_path)")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="default: the model file's data.*")
    parser.add_argument("--image-size", type=_parse_size, default=None, help="WxH; default: images at max_pixels")
    parser.add_argument("--system-prompt", default=None, help="'default' or literal text, as for to_verl")
    parser.add_argument(
        "--estimate", action="store_true", help="no processor: the launch dry run's bound (smart_resize + allowance)"
    )
    args = parser.parse_args(argv)
    spec = load_model_spec(args.model)
    if args.estimate:
        limit = args.max_prompt_length or max_prompt_length_of(args.model)
        report = offline_estimate(spec, args.image_size or largest_image_size(spec), limit)
        print(json.dumps(report))
        if not report["fits"]:
            print(
                f"{spec.model_name}: up to {report['prompt_tokens_bound']} prompt tokens (estimate) but "
                f"data.max_prompt_length={limit}: raise it or lower dig.max_pixels",
                file=sys.stderr,
            )
            return 1
        return 0
    # Read from disk only: without this huggingface_hub may still phone home (e.g. for its user-agent data).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    processor = load_processor(spec, args.processor)
    budget = check_prompt_budget(processor, args.model, args.max_prompt_length, args.image_size, args.system_prompt)
    print(json.dumps({**asdict(budget), "text_tokens": budget.text_tokens, "fits": budget.fits}))
    if not budget.fits:
        print(budget.advice(spec), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
