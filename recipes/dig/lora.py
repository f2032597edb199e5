"""Fold a LoRA adapter into the full weights of a merged checkpoint (the stage handoff of ``tuning=lora``).

    python -m recipes.dig.lora DIR      (recipes/dig/handoff.py runs it on the merge's temp folder)

verl 0.9.1's model merger writes a LoRA run's checkpoint as the *base* weights plus ``DIR/lora_adapter/``
(``verl/model_merger/base_model_merger.py``, ``save_lora_adapter``): loaded as a plain checkpoint, that is the
model before training. This adds each adapter pair to its weight, W + (alpha / r) B A, computed in float32 and stored
in the checkpoint's dtype, and saves the model in place, so the next stage, eval and vLLM load the trained policy.
The adapter stays in ``DIR/lora_adapter/`` for whoever wants it alone; ``DIR/lora_folded.json`` records the fold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dig_common.cli import cli_main, tool_parser
from dig_common.fileio import atomic_write_text

ADAPTER_DIR = "lora_adapter"
FOLDED = "lora_folded.json"
# verl's merger names adapter tensors after the PEFT-wrapped module: base_model.model.<module>.lora_{A,B}.weight
PEFT_PREFIX = "base_model.model."
SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LoraError(ValueError):
    pass


def adapter_pairs(tensors: dict) -> dict[str, tuple]:
    """``{module path: (A, B)}`` from an adapter's tensors; a module with A but no B (or the reverse) is an error."""
    halves: dict[str, dict[str, object]] = {}
    for name, tensor in tensors.items():
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise LoraError(f"adapter tensor {name!r} is not a lora_A / lora_B weight")
        module = name[: -len(suffix)].removeprefix(PEFT_PREFIX)
        halves.setdefault(module, {})[suffix] = tensor
    incomplete = sorted(m for m, h in halves.items() if len(h) != 2)
    if incomplete:
        raise LoraError(f"adapter has lora_A or lora_B alone for {incomplete[:3]}")
    return {m: (h[SUFFIXES[0]], h[SUFFIXES[1]]) for m, h in halves.items()}


def scaling(adapter_config: dict) -> float:
    rank, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha")
    if not rank or not alpha:
        raise LoraError(f"adapter_config.json: r={rank!r}, lora_alpha={alpha!r}; both must be positive")
    if adapter_config.get("use_rslora"):
        return alpha / rank**0.5
    return alpha / rank


def fold_into(model, pairs: dict[str, tuple], scale: float) -> int:
    """Add scale * B @ A to each module's weight in place; returns how many modules changed."""
    import torch

    with torch.no_grad():
        for module_path, (a, b) in pairs.items():
            try:
                weight = model.get_submodule(module_path).weight
            except AttributeError as err:
                raise LoraError(f"the adapter's module {module_path!r} is not in the model ({err})") from err
            delta = scale * (b.float() @ a.float())
            if delta.shape != weight.shape:
                raise LoraError(f"{module_path}: adapter gives {tuple(delta.shape)}, weight is {tuple(weight.shape)}")
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(pairs)


def fold(model_dir: Path) -> dict | None:
    """Fold ``model_dir/lora_adapter`` into ``model_dir``'s weights; None when there is no adapter."""
    import transformers
    from safetensors.torch import load_file

    adapter = model_dir / ADAPTER_DIR
    if not (adapter / "adapter_model.safetensors").is_file():
        return None
    if (model_dir / FOLDED).is_file():
        raise LoraError(f"{model_dir}: the adapter is already folded in ({FOLDED}); folding twice adds it twice")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    pairs = adapter_pairs(load_file(adapter / "adapter_model.safetensors"))
    scale = scaling(adapter_config)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class.from_pretrained(model_dir, dtype=config.dtype or "bfloat16")
    folded = fold_into(model, pairs, scale)
    for old in [*model_dir.glob("*.safetensors"), *model_dir.glob("*.safetensors.index.json")]:
        old.unlink()  # the model is in memory; save_pretrained may shard differently
    model.save_pretrained(model_dir)
    record = {"modules": folded, "rank": adapter_config["r"], "alpha": adapter_config["lora_alpha"], "scaling": scale}
    atomic_write_text(model_dir / FOLDED, json.dumps(record, indent=2))
    return record


PROG = "python -m recipes.dig.lora"


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(PROG, __doc__)
    parser.add_argument("model_dir", type=Path, help="a merged checkpoint folder with lora_adapter/ inside")
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        raise LoraError(f"{args.model_dir}: not a merged checkpoint folder (no config.json)")
    record = fold(args.model_dir)
    if record is None:
        print(f"[dig] {args.model_dir}: no LoRA adapter, nothing to fold")
    else:
        print(f"[dig] folded the LoRA adapter into {args.model_dir}: {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
