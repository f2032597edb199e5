"""Opening a DiG parquet (docs/contracts.md, parquet row) and telling which model it was built for.

Every tool that reads one (eval.dig, eval.visualize, the launch dry run) opens it here, so a truncated or foreign
file is named in the error instead of pyarrow's bare "magic bytes not found"; and every tool that scores with a
model's frame checks here that the rows were written for that model (data_prep.to_verl stores per-image pixel
bounds and the model's instruction in each row, and the model's name in the file's metadata).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dig_common.models import ModelSpec, load_model_spec, model_names
from dig_common.prompts import IMAGE_PLACEHOLDER, build_instruction

METADATA_KEY = b"dig"  # the schema metadata key data_prep.to_verl writes its conversion record under


def open_parquet(path: str | Path, what: str = "--data") -> pq.ParquetFile:
    """The file, or ValueError / FileNotFoundError naming ``what`` and the path (with the fix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such parquet file")
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(
            f"{what} {path}: not a readable parquet file ({err}); it may be truncated: rebuild it with "
            "data_prep.build (or data_prep.to_verl)"
        ) from err


def recorded_model(parquet: pq.ParquetFile) -> str | None:
    """The model name data_prep.to_verl recorded in the file's metadata, or None."""
    raw = (parquet.schema_arrow.metadata or {}).get(METADATA_KEY)
    try:
        return json.loads(raw).get("model") if raw else None
    except (json.JSONDecodeError, AttributeError):
        return None


def model_mismatch(parquet: pq.ParquetFile, spec: ModelSpec) -> str | None:
    """Why the rows were not built for ``spec`` (its per-image pixel bounds, its instruction), or None.

    The first row decides: data_prep.to_verl writes every row of a file with one model. What differs is what
    changes a score: the pixel bounds (the frame of ``abs_resized`` answers) and the instruction (the frame the
    model was told to answer in)."""
    names = parquet.schema_arrow.names
    columns = [c for c in ("images", "prompt") if c in names]
    if not columns or parquet.metadata.num_rows == 0:
        return None
    first = next(parquet.iter_batches(batch_size=1, columns=columns)).to_pylist()[0]
    image = (first.get("images") or [{}])[0] or {}
    for key in ("min_pixels", "max_pixels"):
        if image.get(key) is not None and image[key] != getattr(spec, key):
            return f"its images carry {key}={image[key]} but {spec.model_name} uses {getattr(spec, key)}"
    users = [m.get("content") for m in first.get("prompt") or [] if m.get("role") == "user"]
    if users and users[-1] != _user_content(spec) and users[-1] in _known_user_contents():
        return (
            f"its instruction is another model's, not {spec.model_name}'s (prompt_variant={spec.prompt_variant}, "
            f"coord_mode={spec.coord_mode})"
        )
    return None


def _user_content(spec: ModelSpec) -> str:
    return IMAGE_PLACEHOLDER * 2 + build_instruction(spec)


@functools.cache
def _known_user_contents() -> frozenset[str]:
    """The user message of every built-in model: an instruction outside this set (hand-written data, a custom
    model file) cannot be told apart, and is not refused."""
    return frozenset(_user_content(load_model_spec(name)) for name in model_names())
