"""data_prep.to_verl: rows per docs/contracts.md, parquet row, loaded by the real verl 0.9.1 RLHFDataset; bad input; atomic writes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import to_verl
from data_prep.synthetic import write_pairs
from dig_common.models import load_model_spec, model_names
from dig_common.prompts import build_prompt

REPO = Path(__file__).resolve().parents[1]


def k_cycle(index: int) -> int:
    return index % 4 + 1


def records_of(pairs_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in pairs_dir.glob("shard_*/*.json")}


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory) -> Path:
    """8 pairs, K = 1..4, two shards, at a size that is not a multiple of either resize factor."""
    return write_pairs(
        tmp_path_factory.mktemp("pairs") / "mixed", num=8, k=k_cycle, seed=7, width=100, height=70, shard_size=5
    )


def test_rows_follow_design_section_5(mixed_pairs, tmp_path):
    out = tmp_path / "stage3" / "train.parquet"
    result = to_verl.convert(mixed_pairs, out, "qwen3_vl_8b_thinking", stage=3, split="train", allowed_k={1, 2, 3, 4})
    spec = load_model_spec("qwen3_vl_8b_thinking")
    table = pq.read_table(out)
    assert table.schema.names == ["data_source", "prompt", "images", "ability", "reward_model", "extra_info"]
    # Plain struct, not an HF Image feature: no "huggingface" features metadata, no extension type.
    assert table.schema.field("images").type == pa.list_(to_verl.IMAGE_TYPE)
    assert b"huggingface" not in (table.schema.metadata or {})
    rows = table.to_pylist()
    records = records_of(mixed_pairs)
    assert result["num_rows"] == len(rows) == 8
    assert [r["extra_info"]["pair_id"] for r in rows] == sorted(records)
    for index, row in enumerate(rows):
        pair_id = row["extra_info"]["pair_id"]
        record = records[pair_id]
        folder = next(mixed_pairs.glob(f"shard_*/{pair_id}.json")).parent
        assert row["data_source"] == "dig" and row["ability"] == "grounding"
        assert row["prompt"] == build_prompt(spec)
        assert row["prompt"][-1]["content"].startswith("<image><image>")
        assert [img["bytes"] for img in row["images"]] == [
            (folder / f"{pair_id}_a.png").read_bytes(),
            (folder / f"{pair_id}_b.png").read_bytes(),
        ]
        assert all(
            (img["min_pixels"], img["max_pixels"]) == (spec.min_pixels, spec.max_pixels) for img in row["images"]
        )
        assert row["reward_model"]["style"] == "rule"
        truth = json.loads(row["reward_model"]["ground_truth"])
        assert truth == {
            "boxes": [d["box"] for d in record["differences"]],
            "width": 100,
            "height": 70,
            "types": [d["type"] for d in record["differences"]],
        }
        assert row["extra_info"] == {
            "split": "train",
            "index": index,
            "pair_id": pair_id,
            "stage": "3",
            "num_differences": record["num_differences"],
            "types": truth["types"],
            "width": 100,
            "height": 70,
            # Synthetic records carry only the pixel counts; the other difficulty fields stay null.
            "difficulty": [{name: d.get(name) for name, _ in to_verl.DIFFICULTY_FIELDS} for d in record["differences"]],
            "num_objects_a": None,
            "num_objects_b": None,
        }
        assert all(x["changed_px"] is not None for x in row["extra_info"]["difficulty"])
    assert sorted(r["extra_info"]["num_differences"] for r in rows) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert to_verl.read_metadata(out)["model"] == "qwen3_vl_8b_thinking"


def test_bounds_come_from_the_model_file(mixed_pairs, tmp_path):
    for name in ("qwen2_5_vl_3b", "qwen3_vl_4b_thinking"):
        spec = load_model_spec(name)
        out = tmp_path / f"{name}.parquet"
        to_verl.convert(mixed_pairs, out, name, stage=3, split="val")
        images = pq.read_table(out, columns=["images"]).column("images").to_pylist()[0]
        assert [(i["min_pixels"], i["max_pixels"]) for i in images] == [(spec.min_pixels, spec.max_pixels)] * 2


def test_datasets_reads_images_as_plain_dicts(mixed_pairs, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "train.parquet"
    to_verl.convert(mixed_pairs, out, "qwen2_5_vl_7b", stage=3, split="train")
    loaded = datasets.load_dataset("parquet", data_files=str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert len(loaded) == 8
    first = loaded[0]
    assert set(first["images"][0]) == {"bytes", "min_pixels", "max_pixels"}  # per-image keys survive
    assert Image.open(io.BytesIO(first["images"][0]["bytes"])).size == (100, 70)
    assert json.loads(first["reward_model"]["ground_truth"])["width"] == 100


def test_rows_stream_in_row_groups(tmp_path):
    pairs = write_pairs(tmp_path / "pairs", num=7, seed=3, width=32, height=32)
    out = tmp_path / "out.parquet"
    to_verl.convert(pairs, out, "qwen2_5_vl_7b", stage=1, split="train", row_group_size=3)
    meta = pq.ParquetFile(out).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 3, 1]


def test_several_pair_dirs_make_one_file(tmp_path):
    first = write_pairs(tmp_path / "k1", num=2, k=1, seed=100, width=32, height=32)
    second = write_pairs(tmp_path / "k2", num=3, k=2, seed=200, width=32, height=32)
    out = tmp_path / "test.parquet"
    to_verl.convert([first, second], out, "qwen2_5_vl_7b", stage="test", split="test", allowed_k={1, 2})
    info = pq.read_table(out, columns=["extra_info"]).column("extra_info").to_pylist()
    assert [i["num_differences"] for i in info] == [1, 1, 2, 2, 2]
    assert [i["index"] for i in info] == list(range(5))


def test_no_difference_pairs_have_empty_ground_truth(tmp_path):
    pairs = write_pairs(tmp_path / "pairs", num=2, k=0, seed=5, width=32, height=32)
    out = tmp_path / "out.parquet"
    to_verl.convert(pairs, out, "qwen3_vl_8b_instruct", stage=1, split="train", allowed_k={0, 1})
    truth = json.loads(pq.read_table(out).to_pylist()[0]["reward_model"]["ground_truth"])
    assert truth == {"boxes": [], "width": 32, "height": 32, "types": []}


# ---------------------------------------------------------------- bad input: clear error, no parquet written


@pytest.fixture
def pairs(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs", num=4, k=1, seed=11, width=32, height=32)


def pair_file(pairs_dir: Path, index: int, suffix: str) -> Path:
    return next(pairs_dir.glob(f"shard_*/s11-{index:07d}{suffix}"))


def convert_fails(pairs_dir: Path, out: Path, match: str, **kwargs):
    """The conversion raises an error matching ``match``; an existing file at ``out`` is left as it was."""
    out.write_bytes(b"previous file")
    kwargs = {"model": "qwen2_5_vl_7b", "stage": 1, "split": "train", "allowed_k": {1}, **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        to_verl.convert(pairs_dir, out, **kwargs)
    assert out.read_bytes() == b"previous file"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_missing_png_names_the_pair(pairs, tmp_path):
    pair_file(pairs, 2, "_b.png").unlink()
    convert_fails(pairs, tmp_path / "out.parquet", r"pair s11-0000002 .*s11-0000002_b\.png missing")


def test_corrupt_png_names_the_pair(pairs, tmp_path):
    png = pair_file(pairs, 3, "_a.png")
    png.write_bytes(png.read_bytes()[:-40])  # truncated: IEND and part of IDAT lost
    convert_fails(pairs, tmp_path / "out.parquet", r"pair s11-0000003: corrupt image .*s11-0000003_a\.png")


def test_png_bytes_that_are_not_png_name_the_pair(pairs, tmp_path):
    pair_file(pairs, 0, "_b.png").write_bytes(b"GIF89a not a png at all")
    convert_fails(pairs, tmp_path / "out.parquet", r"pair s11-0000000: corrupt image .*not a PNG")


def test_image_size_must_match_record(pairs, tmp_path):
    Image.new("RGB", (31, 32)).save(pair_file(pairs, 1, "_a.png"))
    convert_fails(pairs, tmp_path / "out.parquet", r"pair s11-0000001: image .* is 31x32, record says 32x32")


def test_record_k_disagreeing_with_boxes(pairs, tmp_path):
    path = pair_file(pairs, 1, ".json")
    record = json.loads(path.read_text())
    record["num_differences"] = 2
    path.write_text(json.dumps(record))
    convert_fails(pairs, tmp_path / "out.parquet", r"pair s11-0000001 .*record says num_differences=2 but it lists 1")


def test_manifest_k_disagreeing_with_boxes(pairs, tmp_path):
    manifest = pairs / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["num_differences"] = 3
    manifest.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    convert_fails(pairs, tmp_path / "out.parquet", r"pair s11-0000000 .*manifest says num_differences=3 but it lists 1")


def test_box_outside_the_image(pairs, tmp_path):
    path = pair_file(pairs, 2, ".json")
    record = json.loads(path.read_text())
    record["differences"][0]["box"] = [10, 10, 40, 20]
    path.write_text(json.dumps(record))
    convert_fails(pairs, tmp_path / "out.parquet", r"pair s11-0000002 .*outside the 32x32 image")


def test_stage_k_outside_what_it_allows(tmp_path):
    pairs = write_pairs(tmp_path / "pairs", num=3, k=lambda i: 2 if i == 1 else 1, seed=11, width=32, height=32)
    convert_fails(
        pairs, tmp_path / "out.parquet", r"pair s11-0000001 .*K=2 differences, but this stage allows K in \[1\]"
    )


def test_unknown_model_name(pairs, tmp_path):
    convert_fails(pairs, tmp_path / "out.parquet", r"unknown model 'qwen9_vl'.*qwen2_5_vl_7b", model="qwen9_vl")


def test_error_after_rows_were_written_leaves_no_parquet(tmp_path):
    """A corrupt image in the last row group: rows before it were already streamed to the temp file."""
    pairs = write_pairs(tmp_path / "pairs", num=9, seed=11, width=32, height=32)
    png = pair_file(pairs, 8, "_b.png")
    png.write_bytes(png.read_bytes()[:30])
    out = tmp_path / "out" / "train.parquet"
    out.parent.mkdir()
    convert_fails(pairs, out, r"pair s11-0000008: corrupt image", row_group_size=2)


def test_empty_or_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.jsonl not found"):
        to_verl.convert(tmp_path, tmp_path / "o.parquet", "qwen2_5_vl_7b", stage=1, split="train")
    (tmp_path / "manifest.jsonl").write_text("")
    with pytest.raises(ValueError, match="manifests are empty"):
        to_verl.convert(tmp_path, tmp_path / "o.parquet", "qwen2_5_vl_7b", stage=1, split="train")
    assert not (tmp_path / "o.parquet").exists()


# ---------------------------------------------------------------- CLI


def test_cli_writes_the_file_and_reports(pairs, tmp_path, capsys):
    out = tmp_path / "stage1" / "train.parquet"
    argv = ["--pairs", str(pairs), "--out", str(out), "--model", "qwen2_5_vl_7b", "--stage", "1", "--split", "train"]
    assert to_verl.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_rows"] == pq.read_metadata(out).num_rows == 4


def test_cli_rejects_k_the_stage_file_forbids(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs", num=2, k=2, seed=1, width=32, height=32)
    out = tmp_path / "train.parquet"
    argv = ["--pairs", str(pairs), "--out", str(out), "--model", "qwen2_5_vl_7b", "--stage", "1", "--split", "train"]
    assert to_verl.main(argv) == 2
    assert "K=2 differences, but this stage allows K in [1]" in capsys.readouterr().err
    assert not out.exists()
    # The same pairs are fine for stage 2 and stage 3 (K uniform in 1..4).
    for stage in ("2", "stage3"):
        assert to_verl.main([*argv[:7], stage, "--split", "train"]) == 0


def test_cli_module_entry_point_unknown_model(pairs, tmp_path):
    out = tmp_path / "o.parquet"
    argv = ["--pairs", str(pairs), "--out", str(out), "--model", "nope", "--stage", "1", "--split", "train"]
    proc = subprocess.run([sys.executable, "-m", "data_prep.to_verl", *argv], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "unknown model 'nope'" in proc.stderr and "qwen3_vl_8b_thinking" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------- the real verl 0.9.1 RLHFDataset


def smart_resize_tokens(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(tokens, resized h*w) predicted straight from qwen_vl_utils.smart_resize (not via our code)."""
    from qwen_vl_utils import smart_resize

    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor), (h, w)


def tight_model_file(tmp_path: Path, name: str, max_tokens: int) -> Path:
    """A copy of model file ``name`` with max_pixels lowered below the test images' area, so per-image bounds bind."""
    import yaml

    raw = yaml.safe_load((REPO / "dig_common/base_model" / f"{name}.yaml").read_text())
    factor = raw["dig"]["resize_factor"]
    raw["dig"]["max_pixels"] = max_tokens * factor * factor
    raw["dig"]["min_pixels"] = factor * factor
    path = tmp_path / f"{name}_tight.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def load_with_verl(parquet: Path, processor, patch_size: int, max_prompt_length: int, cache: Path):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "image_key": "images",
            "max_prompt_length": max_prompt_length,
            "filter_overlong_prompts": True,
            # None: filter in this process. datasets 5 forks a Pool even for num_proc=1, and a fork after torch has
            # run its thread pool (an earlier test) deadlocks; verl's doc2len code path is the same either way.
            "filter_overlong_prompts_workers": None,
            "image_patch_size": patch_size,
            "return_raw_chat": True,
            "truncation": "error",
            "cache_dir": str(cache),
        }
    )
    return RLHFDataset(data_files=[str(parquet)], tokenizer=processor.tokenizer, config=config, processor=processor)


@pytest.mark.verl
@pytest.mark.parametrize(
    ("model", "bounds"),
    [
        ("qwen2_5_vl_7b", "model file"),
        ("qwen3_vl_8b_thinking", "model file"),
        ("qwen2_5_vl_7b", "tight"),
        ("qwen3_vl_8b_instruct", "tight"),
    ],
)
def test_verl_rlhf_dataset_keeps_every_row_and_sees_a_then_b(model, bounds, tmp_path):
    """verl filters nothing, both images reach the messages in order A, B, image tokens = smart_resize's count.

    "model file": 480x320 pairs (the rendered size) with the model file's bounds and data.max_prompt_length.
    "tight": 100x70 pairs with max_pixels lowered below the image area, which proves the per-image min/max_pixels
    in the parquet are what qwen_vl_utils resizes with (qwen_vl_utils' own default would keep 100x70 as is).
    """
    from tiny_qwen import build_tiny_processor

    from data_prep.budget import max_prompt_length_of

    spec = load_model_spec(model)
    width, height = (480, 320) if bounds == "model file" else (100, 70)
    model_arg = model if bounds == "model file" else tight_model_file(tmp_path, model, max_tokens=4)
    spec = load_model_spec(model_arg)
    pairs = write_pairs(tmp_path / "pairs", num=3, k=k_cycle, seed=21, width=width, height=height)
    out = tmp_path / "train.parquet"
    to_verl.convert(pairs, out, model_arg, stage=3, split="train")

    processor = build_tiny_processor(spec.family, spec.prompt_variant)
    dataset = load_with_verl(out, processor, spec.patch_size, max_prompt_length_of(model), tmp_path / "cache")
    assert len(dataset) == 3, "verl's length filter dropped rows (a broken qwen_vl_utils/torchvision drops all)"

    from verl.utils.dataset.rl_dataset import RLHFDataset

    expected_tokens, expected_hw = smart_resize_tokens(
        height, width, spec.resize_factor, spec.min_pixels, spec.max_pixels
    )
    if bounds == "tight":
        assert expected_hw != smart_resize_tokens(height, width, spec.resize_factor, 1, 16384 * 32 * 32)[1]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    records = records_of(pairs)
    for item in range(len(dataset)):
        row = dataset[item]
        pair_id = row["extra_info"]["pair_id"]
        folder = next(pairs.glob(f"shard_*/{pair_id}.json")).parent
        user = row["raw_prompt"][-1]
        assert user["role"] == "user"
        kinds = [part["type"] for part in user["content"]]
        assert kinds == ["image", "image", "text"]
        for part, suffix in zip(user["content"][:2], ("_a.png", "_b.png"), strict=True):
            expected = np.asarray(Image.open(folder / f"{pair_id}{suffix}").convert("RGB"))
            assert np.array_equal(np.asarray(part["image"].convert("RGB")), expected), f"{pair_id}{suffix} order"
            assert (part["min_pixels"], part["max_pixels"]) == (spec.min_pixels, spec.max_pixels)
        # What the agent loop does next: resize via qwen_vl_utils, template, processor.
        images, _, _ = RLHFDataset._process_multi_modal_info(row["raw_prompt"], spec.patch_size, dataset.config)
        assert [im.size for im in images] == [(expected_hw[1], expected_hw[0])] * 2
        text = processor.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=False)
        input_ids = processor(text=[text], images=images, return_tensors="np")["input_ids"][0]
        assert int((input_ids == image_pad).sum()) == 2 * expected_tokens
        assert json.loads(row["reward_model"]["ground_truth"])["boxes"] == [
            d["box"] for d in records[pair_id]["differences"]
        ]


def test_every_model_file_converts(tmp_path):
    pairs = write_pairs(tmp_path / "pairs", num=1, seed=2, width=32, height=32)
    for name in model_names():
        to_verl.convert(pairs, tmp_path / f"{name}.parquet", name, stage=1, split="train")
        assert pq.read_metadata(tmp_path / f"{name}.parquet").num_rows == 1


def test_torn_manifest_line_of_a_killed_run_is_skipped(pairs, tmp_path, capsys):
    """The generator leaves a torn last line when killed mid-append; it re-makes that pair on resume."""
    manifest = pairs / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '{"pair_id": "s11-00000\n')
    out = tmp_path / "out.parquet"
    assert to_verl.convert(pairs, out, "qwen2_5_vl_7b", stage=1, split="train")["num_rows"] == 4
    assert "skipped 1 torn line" in capsys.readouterr().err


@pytest.mark.parametrize("bound", ["min_pixels", "max_pixels"])
def test_changing_one_pixel_bound_forces_reconversion(pairs, tmp_path, bound):
    """data_prep.build skips a parquet whose recorded metadata equals the new plan's; a model file that
    changes only one pixel bound must therefore change the metadata, under that bound's own name."""
    import yaml

    out = tmp_path / "train.parquet"
    to_verl.convert(pairs, out, "qwen2_5_vl_7b", stage=1, split="train")
    same = to_verl.plan_conversion(pairs, "qwen2_5_vl_7b", 1, "train")
    assert to_verl.read_metadata(out) == same.metadata  # an unchanged model: skipped

    raw = yaml.safe_load((REPO / "dig_common/base_model/qwen2_5_vl_7b.yaml").read_text())
    spec = load_model_spec("qwen2_5_vl_7b")
    raw["dig"][bound] = {"min_pixels": spec.min_pixels * 2, "max_pixels": spec.max_pixels // 2}[bound]
    changed_file = tmp_path / "qwen2_5_vl_7b.yaml"  # same name: only the bound differs
    changed_file.write_text(yaml.safe_dump(raw))
    changed = to_verl.plan_conversion(pairs, changed_file, 1, "train")
    assert changed.metadata[bound] == raw["dig"][bound] != same.metadata[bound]
    other = "max_pixels" if bound == "min_pixels" else "min_pixels"
    assert changed.metadata[other] == same.metadata[other] == getattr(spec, other)
    assert to_verl.read_metadata(out) != changed.metadata  # reconverted
