"""The flags the eval command lines share, defined once (docs/cli.md): ``--model``, and for the tools that
generate (eval.dig, eval.refcoco) the answer source, backend and decoding overrides, checked before a model
loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dig_common.argtypes import positive_int
from dig_common.cli import CliError
from dig_common.models import DEFAULT_MODEL, Decoding, ModelSpec
from eval.backends import BACKENDS, Backend, build_backend, check_generation, eval_decoding


def add_model_arg(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME|YAML",
        help=f"base-model file: a name from dig_common/base_model/ or a YAML path{purpose} (default {DEFAULT_MODEL})",
    )


def add_generation_args(parser: argparse.ArgumentParser, predictions_help: str, batch_size: int) -> None:
    """Answers from a file or generated from a checkpoint, the backend and the decoding overrides (None keeps
    the model file's ``dig.decoding`` value)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", metavar="FILE", help=predictions_help)
    source.add_argument("--model-path", metavar="DIR", help="Hugging Face checkpoint folder to generate answers with")
    parser.add_argument("--backend", choices=BACKENDS, default="vllm", help="vllm (GPU) or hf (transformers, CPU too)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help="requests per generation batch")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help="default: dig.decoding.max_new_tokens"
    )
    parser.add_argument("--temperature", type=float, default=None, help="default: dig.decoding.temperature")
    parser.add_argument("--seed", type=int, default=None, help="default: dig.decoding.seed")
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="vLLM tensor parallel size")


def generation_options(args: argparse.Namespace, n: int | None) -> dict:
    """``build_backend``'s keyword arguments from the flags of ``add_generation_args`` (``n``: samples)."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "tensor_parallel_size": args.tensor_parallel_size,
        "seed": args.seed,
        "n": n,
    }


def check_generation_args(args: argparse.Namespace, spec: ModelSpec, n: int | None) -> Decoding:
    """The decoding the flags ask for; the predictions file exists, or the backend is installed and the
    checkpoint has its processor files. Every input error fails here, before a model loads."""
    decoding = eval_decoding(spec, args.max_new_tokens, args.temperature, args.seed, n)
    if args.predictions is not None:
        require_file(args.predictions, "--predictions")
    else:
        check_generation(args.backend, args.model_path, spec)
    return decoding


def backend_from_args(args: argparse.Namespace, spec: ModelSpec, n: int | None) -> Backend:
    return build_backend(args.backend, args.model_path, spec, **generation_options(args, n))


def require_file(path: str | Path, flag: str, what: str = "file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{flag} {path}: no such {what}")
    return path


def parse_reward_kwargs(text: str) -> dict:
    """``--reward-kwargs``: a JSON object of reward knob overrides (the knobs are checked by the reward's code)."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(
            f"--reward-kwargs is not JSON ({err}); give an object, e.g. '{{\"iou_threshold\": 0.75}}'"
        ) from err
    if not isinstance(overrides, dict):
        raise CliError(f"--reward-kwargs must be a JSON object of knob: value pairs, got {text!r}")
    return overrides
