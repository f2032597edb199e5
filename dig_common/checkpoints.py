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
# What to fetch of a model's processor (a few MB, no weights): into a checkpoint folder, its processor files only,
# not '*.json', which would also bring the base model's config.json and model.safetensors.index.json (naming
# shards a merged checkpoint does not have). Into the Hugging Face cache, config.json too (harmless there, and
# what AutoProcessor falls back on to find the processor class).
PROCESSOR_DOWNLOAD_PATTERNS = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "chat_template*",
)
CACHE_PROCESSOR_PATTERNS = ("config.json", *PROCESSOR_DOWNLOAD_PATTERNS)


def hf_download_command(
    repo: str, patterns: tuple[str, ...] = (), local_dir: str | Path | None = None, repo_type: str | None = None
) -> str:
    """The one form of a download command the tools print (huggingface_hub's ``hf`` CLI; ``huggingface-cli``
    no longer works in the huggingface_hub this repo installs)."""
    parts = ["hf download", repo]
    parts += [f"--repo-type {repo_type}"] if repo_type else []
    parts += [f"--include '{pattern}'" for pattern in patterns]
    parts += [f"--local-dir {local_dir}"] if local_dir is not None else []
    return " ".join(parts)


def processor_download_command(hf_path: str, local_dir: str | Path | None = None) -> str:
    """Copies ``hf_path``'s processor files into ``local_dir`` (a checkpoint folder), or into the HF cache."""
    if local_dir is None:
        return hf_download_command(hf_path, CACHE_PROCESSOR_PATTERNS)
    return hf_download_command(hf_path, PROCESSOR_DOWNLOAD_PATTERNS, local_dir)


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
