"""Convert generator output (docs/contracts.md, pair record) into one verl parquet file (docs/contracts.md, parquet row).

    python -m data_prep.to_verl --pairs DIR [DIR ...] --out FILE.parquet --model NAME --stage N --split NAME

Two passes: the first reads every pair record (cheap JSON) and rejects bad input before any image is touched;
the second streams PNG bytes into a pyarrow ParquetWriter one row group at a time, so memory does not grow with
the number of pairs. The file is written under a temporary name and renamed at the end (dig_common.fileio): an
error leaves no half-written parquet behind. Images are stored as plain ``{bytes, min_pixels, max_pixels}``
structs (not an HF ``Image`` feature), so verl's RLHFDataset hands the per-image bounds to ``qwen_vl_utils``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_prep import manifest as manifest_mod
from data_prep.stages import STAGES_FILE, load_curriculum
from dig_common.argtypes import positive_int
from dig_common.cli import CliError, cli_main, tool_parser
from dig_common.fileio import atomic_output
from dig_common.models import ModelSpec, load_model_spec
from dig_common.parquet import METADATA_KEY
from dig_common.prompts import build_prompt

PROG = "python -m data_prep.to_verl"
DATA_SOURCE = "dig"
ABILITY = "grounding"
FORMAT_VERSION = 2  # 2: extra_info carries difficulty and num_objects_a/b
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_ROW_GROUP = 16  # rows per row group (~7 MB of PNGs at 480x320): peak RSS flat from 200 to 2,000 pairs
PNG_COLUMN = "images.list.element.bytes"
# PNG bytes are already compressed: skip compression, dictionaries and min/max statistics on them (all three
# cost time and buy nothing); the small text columns keep the defaults.
WRITER_OPTIONS = {
    "compression": {PNG_COLUMN: "none"},
    "use_dictionary": [
        "data_source",
        "ability",
        "prompt.list.element.role",
        "prompt.list.element.content",
        "extra_info.split",
        "extra_info.stage",
        "extra_info.types.list.element",
    ],
    "write_statistics": ["extra_info.index", "extra_info.num_differences"],
}

# Per difference, aligned with the boxes: how hard it is to see (data_prep/README.md, "Difficulty").
DIFFICULTY_FIELDS = (
    ("visible_px", pa.int64()),
    ("visible_px_a", pa.int64()),
    ("visible_px_b", pa.int64()),
    ("occluded_fraction", pa.float64()),
    ("changed_px", pa.int64()),
    ("delta_e00", pa.float64()),
    ("size_ratio", pa.float64()),
    ("box_fraction", pa.float64()),
    ("border_px", pa.int64()),
)
DIFFICULTY_TYPE = pa.struct(list(DIFFICULTY_FIELDS))
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("min_pixels", pa.int64()), ("max_pixels", pa.int64())])
SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(IMAGE_TYPE)),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("pair_id", pa.string()),
                    ("stage", pa.string()),
                    ("num_differences", pa.int64()),
                    ("types", pa.list_(pa.string())),
                    ("width", pa.int64()),
                    ("height", pa.int64()),
                    ("difficulty", pa.list_(DIFFICULTY_TYPE)),
                    ("num_objects_a", pa.int64()),
                    ("num_objects_b", pa.int64()),
                ]
            ),
        ),
    ]
)


class PairError(ValueError):
    """A pair record or its images are unusable; the message names the pair and the file."""


@dataclass(frozen=True)
class PairRef:
    pairs_dir: Path
    pair_id: str
    json_path: Path
    manifest_k: int | None


@dataclass(frozen=True)
class PairRecord:
    pair_id: str
    png_a: Path
    png_b: Path
    width: int
    height: int
    boxes: list[list[float]]
    types: list[str]
    difficulty: tuple[dict, ...] = ()  # per box; fields the generator did not record are None
    num_objects: tuple[int | None, int | None] = (None, None)  # objects in A and in B


def read_manifest(pairs_dir: Path, limit: int | None = None) -> list[PairRef]:
    """The pairs of a pair set, sorted by pair_id so the row order does not depend on workers.

    ``limit``: keep only pairs whose generator ``index`` is below it (a run asked for fewer pairs than the folder
    holds). Torn lines (data_prep.manifest) are skipped and counted on stderr.
    """
    manifest = manifest_mod.read_manifest(pairs_dir)
    if manifest.torn:
        skipped = f"skipped {manifest.torn} torn line(s) (pairs a killed run did not finish)"
        print(f"warning: {manifest.path}: {skipped}", file=sys.stderr)
    refs = [
        PairRef(pairs_dir, e.pair_id, manifest.record_path(e), e.num_differences)
        for e in manifest.entries
        if limit is None or e.index is None or e.index < limit
    ]
    return sorted(refs, key=lambda ref: ref.pair_id)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_pair(ref: PairRef, allowed_k: set[int] | None = None) -> PairRecord:
    """Read and check one pair record (docs/contracts.md, pair record). Raises PairError naming the pair."""
    where = f"pair {ref.pair_id} ({ref.json_path})"
    try:
        record = json.loads(ref.json_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PairError(f"{where}: record file missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PairError(f"{where}: not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise PairError(f"{where}: record is not a JSON object")
    if str(record.get("pair_id")) != ref.pair_id:
        raise PairError(f"{where}: record says pair_id={record.get('pair_id')!r}")
    width, height = record.get("width"), record.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise PairError(f"{where}: width/height must be positive integers, got {width!r}, {height!r}")
    differences = record.get("differences")
    if not isinstance(differences, list):
        raise PairError(f"{where}: 'differences' must be a list")
    boxes, types = [], []
    for i, diff in enumerate(differences):
        box = diff.get("box") if isinstance(diff, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
            raise PairError(f"{where}: differences[{i}] has no box of 4 finite numbers: {box!r}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise PairError(f"{where}: differences[{i}].box {box} is empty or outside the {width}x{height} image")
        boxes.append(box)
        types.append(str(diff.get("type", "")))
    k = len(boxes)
    for source, claimed in (("record", record.get("num_differences")), ("manifest", ref.manifest_k)):
        if claimed is not None and claimed != k:
            raise PairError(f"{where}: {source} says num_differences={claimed} but it lists {k} boxes")
    if allowed_k is not None and k not in allowed_k:
        raise PairError(f"{where}: K={k} differences, but this stage allows K in {sorted(allowed_k)}")
    folder = ref.json_path.parent
    png_a, png_b = folder / f"{ref.pair_id}_a.png", folder / f"{ref.pair_id}_b.png"
    for png in (png_a, png_b):
        if not png.is_file():
            raise PairError(f"{where}: image {png} missing")
    difficulty = tuple(
        {name: ({**d, **(d.get("difficulty") or {})}).get(name) for name, _ in DIFFICULTY_FIELDS} for d in differences
    )
    num_objects = (record.get("num_objects_a"), record.get("num_objects_b"))
    return PairRecord(ref.pair_id, png_a, png_b, width, height, boxes, types, difficulty, num_objects)


def read_png(record: PairRecord, path: Path) -> bytes:
    """PNG bytes, checked: signature, chunk CRCs (catches truncation/corruption) and size = the record's."""
    data = path.read_bytes()
    try:
        if not data.startswith(PNG_SIGNATURE):
            raise ValueError("not a PNG file")
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.verify()
    except Exception as err:  # PIL raises many types for broken files
        raise PairError(f"pair {record.pair_id}: corrupt image {path}: {err}") from err
    if size != (record.width, record.height):
        raise PairError(
            f"pair {record.pair_id}: image {path} is {size[0]}x{size[1]}, record says {record.width}x{record.height}"
        )
    return data


def ground_truth(record: PairRecord) -> str:
    """docs/contracts.md, reward: original pixels, complete on its own."""
    return json.dumps({"boxes": record.boxes, "width": record.width, "height": record.height, "types": record.types})


def make_row(record: PairRecord, index: int, prompt: list[dict], spec: ModelSpec, stage: str, split: str) -> dict:
    images = [
        {"bytes": read_png(record, png), "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
        for png in (record.png_a, record.png_b)  # A first: matches the first <image>
    ]
    return {
        "data_source": DATA_SOURCE,
        "prompt": prompt,
        "images": images,
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": ground_truth(record)},
        "extra_info": {
            "split": split,
            "index": index,
            "pair_id": record.pair_id,
            "stage": stage,
            "num_differences": len(record.boxes),
            "types": record.types,
            "width": record.width,
            "height": record.height,
            "difficulty": list(record.difficulty),
            "num_objects_a": record.num_objects[0],
            "num_objects_b": record.num_objects[1],
        },
    }


def conversion_metadata(refs: list[PairRef], spec: ModelSpec, stage: str, split: str, prompt: list[dict]) -> dict:
    """What a parquet was built from; data_prep.build skips a conversion whose metadata already matches."""
    digest = hashlib.sha256()
    for ref in refs:
        digest.update(ref.pair_id.encode() + b"\n")
    return {
        "format_version": FORMAT_VERSION,
        "model": spec.model_name,
        "stage": stage,
        "split": split,
        "num_rows": len(refs),
        "pair_ids_sha256": digest.hexdigest(),
        "prompt_sha256": hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest(),
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
    }


def read_metadata(path: Path) -> dict | None:
    """The conversion metadata of an existing parquet, or None (absent, unreadable, or not ours)."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    try:
        return json.loads(raw[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        return None


def _row_groups(records: Iterator[PairRecord], prompt, spec, stage, split, size) -> Iterator[pa.Table]:
    rows = []
    for index, record in enumerate(records):
        rows.append(make_row(record, index, prompt, spec, stage, split))
        if len(rows) == size:
            yield pa.Table.from_pylist(rows, schema=SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=SCHEMA)


@dataclass(frozen=True)
class ConversionPlan:
    """Everything a conversion needs except the images; cheap to compute (manifests only)."""

    refs: list[PairRef]
    spec: ModelSpec
    prompt: list[dict]
    stage: str
    split: str
    metadata: dict


def plan_conversion(
    pairs_dirs: list[Path] | Path,
    model: str | Path,
    stage: str | int,
    split: str,
    system_prompt: str | None = None,
    limits: list[int | None] | None = None,
) -> ConversionPlan:
    """Read the manifests and the model file; ``limits[i]`` caps the generator index taken from ``pairs_dirs[i]``."""
    spec = load_model_spec(model)  # unknown model name -> ValueError listing the known ones
    pairs_dirs = [Path(pairs_dirs)] if isinstance(pairs_dirs, str | Path) else [Path(d) for d in pairs_dirs]
    limits = limits or [None] * len(pairs_dirs)
    stage = str(stage)
    refs: list[PairRef] = []
    seen: dict[str, Path] = {}
    for pairs_dir, limit in zip(pairs_dirs, limits, strict=True):
        for ref in read_manifest(pairs_dir, limit):
            if ref.pair_id in seen:
                raise ValueError(f"pair {ref.pair_id} appears in both {seen[ref.pair_id]} and {pairs_dir}")
            seen[ref.pair_id] = pairs_dir
            refs.append(ref)
    if not pairs_dirs:
        raise ValueError("no pair set to convert: give --pairs DIR (the output folder of a generation run)")
    if not refs:
        raise ValueError(f"no pairs in {', '.join(map(str, pairs_dirs))}: the manifests are empty")
    prompt = build_prompt(spec, system_prompt)
    return ConversionPlan(refs, spec, prompt, stage, split, conversion_metadata(refs, spec, stage, split, prompt))


def check_parquet_path(out: Path) -> None:
    """The parquet to write must not be a folder (checked before any work, not at the final rename)."""
    if Path(out).is_dir():
        raise IsADirectoryError(
            f"parquet path {out} is a folder: give a file name (e.g. {out}/train.parquet) or move the folder away"
        )


def write_parquet(
    plan: ConversionPlan, out: Path, allowed_k: set[int] | None = None, row_group_size: int = DEFAULT_ROW_GROUP
) -> dict:
    """Check every record, then stream the rows into ``out`` (temp file + rename). Returns metadata + timing."""
    started = time.perf_counter()
    check_parquet_path(out)
    for ref in plan.refs:  # pass 1: every record checked before any image is read
        load_pair(ref, allowed_k)
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(plan.metadata).encode()})
    out = Path(out)
    with atomic_output(out) as tmp, pq.ParquetWriter(tmp, schema, **WRITER_OPTIONS) as writer:
        records = (load_pair(ref, allowed_k) for ref in plan.refs)
        for table in _row_groups(records, plan.prompt, plan.spec, plan.stage, plan.split, row_group_size):
            writer.write_table(table)
    seconds = time.perf_counter() - started
    return {
        **plan.metadata,
        "out": str(out),
        "seconds": round(seconds, 3),
        "pairs_per_s": round(len(plan.refs) / seconds, 1) if seconds > 0 else None,
    }


def convert(
    pairs_dirs: list[Path] | Path,
    out: Path,
    model: str | Path,
    stage: str | int,
    split: str,
    allowed_k: set[int] | None = None,
    system_prompt: str | None = None,
    row_group_size: int = DEFAULT_ROW_GROUP,
    limits: list[int | None] | None = None,
) -> dict:
    """Write ``out`` from the pairs in ``pairs_dirs``; returns the conversion metadata plus timing.

    ``allowed_k``: K values the stage permits (None: no check). The CLI takes them from stages.yaml.
    """
    plan = plan_conversion(pairs_dirs, model, stage, split, system_prompt, limits)
    return write_parquet(plan, out, allowed_k, row_group_size)


def stage_allowed_k(stage: str | int, stages_file: Path | str = STAGES_FILE) -> set[int]:
    return load_curriculum(stages_file).stage(stage).allowed_k()


def check_pairs_dirs(pairs_dirs: list[Path]) -> None:
    for pairs_dir in pairs_dirs:
        if not pairs_dir.is_dir():
            raise CliError(f"--pairs {pairs_dir}: no such folder (give the output folder of a generation run)")


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(PROG, __doc__)
    parser.add_argument("--pairs", type=Path, nargs="+", required=True, help="generator output directories")
    parser.add_argument("--out", type=Path, required=True, help="parquet file to write")
    parser.add_argument(
        "--model",
        required=True,
        help="base model name (dig_common/base_model/NAME.yaml) "
        "or path to such a YAML file: its min/max_pixels and prompt variant are used",
    )
    parser.add_argument("--stage", required=True, help="1, 2, 3 or test (K allowed per stages file)")
    parser.add_argument("--split", required=True, help="split name written to extra_info (train, val, test)")
    parser.add_argument("--stages-file", type=Path, default=STAGES_FILE)
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="system message: 'default' for dig_common/prompt_templates/system.txt, or literal text",
    )
    parser.add_argument("--row-group-size", type=positive_int, default=DEFAULT_ROW_GROUP)
    args = parser.parse_args(argv)
    load_model_spec(args.model)  # fail on a bad name before reading any pair
    allowed = stage_allowed_k(args.stage, args.stages_file)
    check_pairs_dirs(args.pairs)
    check_parquet_path(args.out)
    result = convert(
        args.pairs,
        args.out,
        args.model,
        str(args.stage).removeprefix("stage"),
        args.split,
        allowed_k=allowed,
        system_prompt=args.system_prompt,
        row_group_size=args.row_group_size,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
