"""Base-model specs: the ``dig:`` block of ``dig_common/base_model/<name>.yaml``.

One source of truth for a model's coordinate frame and pixel bounds: data_prep writes them into the
parquet, the launch config passes them to the reward as ``reward_kwargs``, eval converts answers with them.
Plain YAML reading on purpose: no Hydra or verl import, so the render venv and data_prep can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from dig_common.paths import BASE_MODEL_DIR
from dig_common.yaml_error import yaml_error_line

DEFAULT_MODEL = "qwen3_vl_8b_thinking"
# reward_fns.geometry.COORD_MODES, repeated so that this module needs no numpy (a test checks they agree)
COORD_MODES = ("rel1000", "abs_resized", "abs", "rel1")
ATTN_IMPLEMENTATIONS = ("flash_attention_2", "sdpa", "eager")


@dataclass(frozen=True)
class Decoding:
    """Validation and eval sampling of a model (``dig.decoding``): what its model card recommends."""

    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # -1 = off
    presence_penalty: float
    n: int  # samples per prompt in validation and eval
    seed: int
    max_new_tokens: int  # eval token budget

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class ModelSpec:
    model_name: str
    hf_path: str
    family: str
    coord_mode: str
    patch_size: int
    resize_factor: int
    min_pixels: int
    max_pixels: int
    require_think: bool
    prompt_variant: str
    attn_implementation: str  # preferred backend; the launcher falls back to sdpa without flash-attn
    use_remove_padding: bool
    decoding: Decoding

    def reward_kwargs(self) -> dict:
        """The reward knobs that depend on the model (docs/contracts.md, coordinate frames: same bounds as the parquet)."""
        return {
            "coord_mode": self.coord_mode,
            "resize_factor": self.resize_factor,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "require_think": self.require_think,
        }


def model_names() -> list[str]:
    return sorted(p.stem for p in BASE_MODEL_DIR.glob("*.yaml"))


def model_file(name_or_path: str | Path) -> Path:
    """Resolve a model name (``qwen2_5_vl_7b``) or a path to a YAML file; clear error otherwise."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        return path
    candidate = BASE_MODEL_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ValueError(
            f"unknown model {str(name_or_path)!r}; known models: {', '.join(model_names())} "
            f"(or give a path to a YAML file shaped like {BASE_MODEL_DIR}/{DEFAULT_MODEL}.yaml)"
        )
    return candidate


def load_model_spec(name_or_path: str | Path = DEFAULT_MODEL) -> ModelSpec:
    path = model_file(name_or_path)
    try:
        block = (yaml.safe_load(path.read_text()) or {}).get("dig")
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {yaml_error_line(err)}") from err
    if not isinstance(block, dict):
        raise ValueError(f"{path}: missing the 'dig:' block")
    names = [f.name for f in fields(ModelSpec)]
    missing = [n for n in names if n not in block]
    if missing:
        raise ValueError(f"{path}: 'dig:' block lacks {', '.join(missing)}")
    values = {n: block[n] for n in names}
    values["decoding"] = _load_decoding(path, values["decoding"])
    spec = ModelSpec(**values)
    if spec.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"{path}: dig.attn_implementation={spec.attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if not isinstance(spec.use_remove_padding, bool):
        raise ValueError(f"{path}: dig.use_remove_padding must be true or false, got {spec.use_remove_padding!r}")
    if spec.coord_mode not in COORD_MODES:
        raise ValueError(f"{path}: dig.coord_mode={spec.coord_mode!r} is not one of {', '.join(COORD_MODES)}")
    if spec.resize_factor != 2 * spec.patch_size:
        raise ValueError(f"{path}: dig.resize_factor ({spec.resize_factor}) must be 2 x patch_size ({spec.patch_size})")
    if not 0 < spec.min_pixels <= spec.max_pixels:
        raise ValueError(f"{path}: need 0 < min_pixels <= max_pixels, got {spec.min_pixels}, {spec.max_pixels}")
    return spec


def _load_decoding(path: Path, block: object) -> Decoding:
    if not isinstance(block, dict):
        raise ValueError(f"{path}: dig.decoding must be a mapping of {', '.join(f.name for f in fields(Decoding))}")
    names = [f.name for f in fields(Decoding)]
    missing = [n for n in names if n not in block]
    unknown = sorted(set(block) - set(names))
    if missing or unknown:
        raise ValueError(f"{path}: dig.decoding lacks {missing or 'nothing'}, has unknown keys {unknown or 'none'}")
    dec = Decoding(
        temperature=float(block["temperature"]),
        top_p=float(block["top_p"]),
        top_k=int(block["top_k"]),
        presence_penalty=float(block["presence_penalty"]),
        n=int(block["n"]),
        seed=int(block["seed"]),
        max_new_tokens=int(block["max_new_tokens"]),
    )
    if dec.temperature < 0 or not 0 < dec.top_p <= 1 or dec.n < 1 or dec.max_new_tokens < 1:
        raise ValueError(f"{path}: dig.decoding out of range: {dec}")
    if dec.greedy and dec.n != 1:
        raise ValueError(f"{path}: dig.decoding is greedy (temperature 0) but n={dec.n}: greedy samples are identical")
    return dec
