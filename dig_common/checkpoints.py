"""Checks of a Hugging Face checkpoint folder (``--model-path``) before anything loads it.

A tool that generates with a checkpoint fails here, in one line that names the folder and the fix, instead of
deep inside ``from_pretrained`` (or, on a cluster, after the GPUs were allocated).
"""

from __future__ import annotations

from pathlib import Path

from dig_common.cli import CliError

# A processor is an image-processor config plus a tokenizer (transformers 5 writes processor_config.json,
# the hub's Qwen repos hold preprocessor_config.json).
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# What to fetch from the base model's repo: the processor's files only. Not '*.json': that would also bring the
# base model's config.json and model.safetensors.index.json, which name shards a merged checkpoint does not have.
PROCESSOR_DOWNLOAD_PATTERNS = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "chat_template*",
)


def processor_download_command(hf_path: str, local_dir: str | Path) -> str:
    """The command that copies ``hf_path``'s processor files (a few MB, no weights) into ``local_dir``."""
    include = " ".join(f"'{pattern}'" for pattern in PROCESSOR_DOWNLOAD_PATTERNS)
    return f"huggingface-cli download {hf_path} --include {include} --local-dir {local_dir}"


def check_checkpoint(model_path: str | Path, hf_path: str, flag: str = "--model-path") -> Path:
    """``model_path`` as a Path if it is a checkpoint folder with weights' config and processor files; otherwise
    a CliError naming what is missing and how to get it (``hf_path``: the base model, for its processor)."""
    path = Path(model_path)
    if not path.exists():
        raise CliError(
            f"{flag} {path}: no such folder (a Hugging Face checkpoint folder, e.g. a merged stage checkpoint)"
        )
    if not path.is_dir():
        raise CliError(f"{flag} {path}: not a folder (a Hugging Face checkpoint folder holds config.json and weights)")
    if not (path / "config.json").is_file():
        raise CliError(
            f"{flag} {path}: no config.json, so not a Hugging Face checkpoint; a verl actor checkpoint must be "
            f"merged first: python -m verl.model_merger merge --backend fsdp --local_dir ACTOR_DIR --target_dir {path}"
        )
    has_image_processor = any((path / name).is_file() for name in IMAGE_PROCESSOR_FILES)
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    if not (has_image_processor and has_tokenizer):
        lacking = [] if has_image_processor else [" or ".join(IMAGE_PROCESSOR_FILES)]
        lacking += [] if has_tokenizer else [" or ".join(TOKENIZER_FILES)]
        raise CliError(
            f"{flag} {path}: no processor files (lacks {'; '.join(lacking)}); a merged checkpoint carries them, "
            f"or copy the base model's: {processor_download_command(hf_path, path)}"
        )
    return path
