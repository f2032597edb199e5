"""data_prep.build + stages.yaml: layout, K per stage, resuming, skipping, seed disjointness; one real render."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from data_prep import build as B
from data_prep import synthetic
from data_prep.stages import STAGES_FILE, load_curriculum
from dig_common.models import load_model_spec

MODEL = "qwen3_vl_8b_thinking"
SMALL = B.BuildOptions(width=48, height=32, progress=False)


class CountingGenerator:
    """Blender-free generator (data_prep.synthetic) that records how many pairs each call had to make."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg) -> dict:
        before = B.manifest_size(Path(cfg.out), cfg.num)
        self.calls.append((Path(*Path(cfg.out).parts[-2:]), cfg.num - before, cfg.k))
        return synthetic.generate(cfg)


def small(num_train=3, num_val=2, num_test=2, path=STAGES_FILE):
    return load_curriculum(path).with_sizes(num_train, num_val, num_test)


def rows(path: Path) -> list[dict]:
    return pq.read_table(path, columns=["extra_info", "images"]).to_pylist()


def test_default_stages_follow_design_section_7():
    curriculum = load_curriculum()
    sizes = {
        name: {split: [(r.k, r.num, r.no_diff_fraction) for r in runs] for split, runs in stage.splits.items()}
        for name, stage in curriculum.stages.items()
    }
    assert sizes == {
        "1": {"train": [("1", 1600, 0.0)], "val": [("1", 200, 0.0)]},
        "2": {"train": [("2", 1600, 0.0)], "val": [("2", 200, 0.0)]},
        "3": {"train": [("1-4", 1600, 0.0)], "val": [("1-4", 200, 0.0)]},
        "test": {"test": [(str(k), 300, 0.0) for k in (1, 2, 3, 4)]},
    }
    assert [curriculum.stage(s).allowed_k() for s in ("1", "stage2", 3, "test")] == [{1}, {2}, {1, 2, 3, 4}] + [
        {1, 2, 3, 4}
    ]
    seeds = [run.seed for stage in curriculum.stages.values() for runs in stage.splits.values() for run in runs]
    assert len(seeds) == len(set(seeds))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda raw: raw["stages"]["1"].update(k="1-5"),
            r"stages\.1\.splits\.train\[0\]: k='1-5' asks for K outside 1\.\.4",
        ),
        (lambda raw: raw["stages"]["2"].update(k="0"), r"stages\.2.*: k: expected 1 <= low <= high, got '0'"),
        (lambda raw: raw["stages"]["3"]["splits"]["val"].update(seed=1000000), r"reuses seed 1000000 of stages\.1"),
        (lambda raw: raw["stages"]["1"]["splits"]["train"].update(num=0), r"num must be an integer >= 1 \(the pairs"),
        (lambda raw: raw["stages"]["1"].update(no_diff_fraction=1.0), r"no_diff_fraction must be in \[0, 1\)"),
        (lambda raw: raw["stages"]["1"]["splits"]["train"].update(K=2), r"unknown keys \['K'\]"),
    ],
)
def test_bad_stage_definitions_are_named(tmp_path, edit, message):
    raw = yaml.safe_load(STAGES_FILE.read_text())
    edit(raw)
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load_curriculum(path)


def test_no_diff_fraction_allows_k_zero(tmp_path):
    raw = yaml.safe_load(STAGES_FILE.read_text())
    raw["stages"]["1"]["no_diff_fraction"] = 0.25
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_curriculum(path).stage(1).allowed_k() == {0, 1}


def test_unknown_stage_name():
    with pytest.raises(ValueError, match=r"unknown stage '7'; stages defined: 1, 2, 3, test"):
        load_curriculum().stage("7")


def test_build_all_writes_the_layout_with_k_per_stage(tmp_path):
    generator = CountingGenerator()
    events = B.build(tmp_path, MODEL, ["1", "2", "3", "test"], small(), SMALL, generator, log=lambda e: None)
    assert [(e["stage"], e["split"], e["event"], e["rows"]) for e in events] == [
        ("1", "train", "convert", 3),
        ("1", "val", "convert", 2),
        ("2", "train", "convert", 3),
        ("2", "val", "convert", 2),
        ("3", "train", "convert", 3),
        ("3", "val", "convert", 2),
        ("test", "test", "convert", 8),
    ]
    for stage, ks in (("1", {1}), ("2", {2}), ("3", {1, 2, 3})):  # 3 pairs of stage 3 cycle K = 1, 2, 3
        for split in ("train", "val"):
            info = [r["extra_info"] for r in rows(tmp_path / MODEL / f"stage{stage}" / f"{split}.parquet")]
            assert {i["num_differences"] for i in info} <= ks and {i["split"] for i in info} == {split}
            assert {i["stage"] for i in info} == {stage}
    test_info = [r["extra_info"] for r in rows(tmp_path / MODEL / "test" / "test.parquet")]
    assert sorted(i["num_differences"] for i in test_info) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [i["index"] for i in test_info] == list(range(8))
    assert (tmp_path / "pairs" / "test" / "test" / "3-k4" / "manifest.jsonl").is_file()
    assert len(generator.calls) == 10  # 6 training/val runs + 4 test runs


def test_rerun_skips_generation_and_conversion(tmp_path):
    generator = CountingGenerator()
    B.build(tmp_path, MODEL, ["1"], small(), SMALL, generator, log=lambda e: None)
    train = tmp_path / MODEL / "stage1" / "train.parquet"
    stamp = train.stat().st_mtime_ns
    generator.calls.clear()
    events = B.build(tmp_path, MODEL, ["1"], small(), SMALL, generator, log=lambda e: None)
    assert [e["event"] for e in events] == ["skip", "skip"]
    assert generator.calls == [] and train.stat().st_mtime_ns == stamp


def test_rerun_remakes_a_listed_pair_that_lost_its_image(tmp_path):
    generator = CountingGenerator()
    B.build(tmp_path, MODEL, ["1"], small(), SMALL, generator, log=lambda e: None)
    pairs = tmp_path / "pairs" / "stage1" / "train"
    lost = json.loads((pairs / "manifest.jsonl").read_text().splitlines()[1])
    (pairs / lost["image_b"]).unlink()
    generator.calls.clear()
    events = B.build(tmp_path, MODEL, ["1"], small(), SMALL, generator, log=lambda e: None)
    assert generator.calls == [(Path("stage1/train"), 1, "1")]  # not trusted because it is listed
    assert (pairs / lost["image_b"]).is_file()
    assert [e["event"] for e in events] == ["skip", "skip"]  # the same pairs: the parquets stand


def test_rerun_with_more_pairs_generates_only_the_missing_ones(tmp_path):
    generator = CountingGenerator()
    B.build(tmp_path, MODEL, ["1"], small(num_train=2, num_val=1), SMALL, generator, log=lambda e: None)
    generator.calls.clear()
    B.build(tmp_path, MODEL, ["1"], small(num_train=5, num_val=1), SMALL, generator, log=lambda e: None)
    assert generator.calls == [(Path("stage1/train"), 3, "1")]
    assert len(rows(tmp_path / MODEL / "stage1" / "train.parquet")) == 5


def test_fewer_pairs_than_on_disk_takes_the_first_indices(tmp_path):
    generator = CountingGenerator()
    B.build(tmp_path, MODEL, ["1"], small(num_train=4, num_val=1), SMALL, generator, log=lambda e: None)
    B.build(tmp_path, MODEL, ["1"], small(num_train=2, num_val=1), SMALL, generator, log=lambda e: None)
    info = [r["extra_info"] for r in rows(tmp_path / MODEL / "stage1" / "train.parquet")]
    assert [i["pair_id"] for i in info] == ["s1000000-0000000", "s1000000-0000001"]


def test_switching_model_reconverts_without_regenerating(tmp_path):
    generator = CountingGenerator()
    B.build(tmp_path, MODEL, ["1"], small(), SMALL, generator, log=lambda e: None)
    generator.calls.clear()
    events = B.build(tmp_path, "qwen2_5_vl_7b", ["1"], small(), SMALL, generator, log=lambda e: None)
    assert generator.calls == [] and [e["event"] for e in events] == ["convert", "convert"]
    image = rows(tmp_path / "qwen2_5_vl_7b" / "stage1" / "val.parquet")[0]["images"][0]
    qwen25 = load_model_spec("qwen2_5_vl_7b")
    assert (image["min_pixels"], image["max_pixels"]) == (qwen25.min_pixels, qwen25.max_pixels)
    assert qwen25.max_pixels != load_model_spec(MODEL).max_pixels  # the switch is visible in the rows
    first = rows(tmp_path / MODEL / "stage1" / "val.parquet")[0]["images"][0]  # the first model's files stay
    assert first["max_pixels"] == load_model_spec(MODEL).max_pixels


def test_test_seeds_overlapping_training_are_rejected_before_conversion(tmp_path):
    raw = yaml.safe_load(STAGES_FILE.read_text())
    raw["stages"]["test"]["splits"]["test"][0]["seed"] = 1000001  # synthetic pair seeds: run seed + index
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw))
    curriculum = small(path=path)
    data = tmp_path / "data"
    with pytest.raises(
        ValueError, match=r"test pair s1000001-0000000 and pairs/stage1/train pair s1000000-0000001 share"
    ):
        B.build(data, MODEL, ["1", "test"], curriculum, SMALL, CountingGenerator(), log=lambda e: None)
    assert (
        not (data / MODEL / "test" / "test.parquet").exists()
        and not (data / MODEL / "stage1" / "train.parquet").exists()
    )


def test_unknown_model_fails_before_generating(tmp_path):
    generator = CountingGenerator()
    with pytest.raises(ValueError, match="unknown model 'qwen0'"):
        B.build(tmp_path, "qwen0", ["1"], small(), SMALL, generator, log=lambda e: None)
    assert generator.calls == [] and not (tmp_path / "pairs").exists()


def test_cli_errors_name_the_flag(tmp_path, capsys):
    assert B.main(["--out-dir", str(tmp_path), "--model", MODEL, "--stage", "9"]) == 2
    assert "unknown stage '9'" in capsys.readouterr().err
    assert B.main(["--out-dir", str(tmp_path), "--model", "nope", "--stage", "1", "--num-train", "1"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.render
def test_real_generator_64px_1spp_into_verl_rows(tmp_path, capsys):
    """The real Blender generator (render venv) at 64x64, 1 spp, through the CLI; rows carry its boxes."""
    size = ["--width", "64", "--height", "64", "--samples", "1", "--no-denoise", "--no-progress"]
    argv = [
        "--out-dir",
        str(tmp_path),
        "--model",
        "qwen2_5_vl_3b",
        "--stage",
        "2",
        "--num-train",
        "2",
        "--num-val",
        "1",
    ]
    argv += size
    assert B.main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e.get("event") != "generate"] == ["convert", "convert"]
    table = pq.read_table(tmp_path / "qwen2_5_vl_3b" / "stage2" / "train.parquet").to_pylist()
    assert len(table) == 2
    for row in table:
        info = row["extra_info"]
        record = json.loads(
            next((tmp_path / "pairs" / "stage2" / "train").glob(f"*/{info['pair_id']}.json")).read_text()
        )
        truth = json.loads(row["reward_model"]["ground_truth"])
        assert info["num_differences"] == 2 == len(truth["boxes"])
        assert truth["boxes"] == [d["box"] for d in record["differences"]]
        assert (truth["width"], truth["height"]) == (64, 64)
    assert B.main(argv) == 0  # rerun: nothing to do
    assert [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()] == ["skip", "skip"]


def test_stage_difficulty_filters_and_device_reach_the_generator(tmp_path):
    """A stage's `difficulty:` bounds and --device go into every generator run of that stage (and only it)."""
    stages = yaml.safe_load(STAGES_FILE.read_text())
    stages["stages"]["1"]["difficulty"] = {"min_visible_px": 800, "max_occluded_fraction": 0.5}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(stages))
    seen = []

    def generator(cfg):
        seen.append((Path(cfg.out).parts[-2], cfg.difficulty_filters, cfg.device))
        return synthetic.generate(cfg)

    options = B.BuildOptions(width=48, height=32, progress=False, device="cuda")
    B.build(tmp_path / "data", MODEL, ["1", "2"], small(path=path), options, generator, log=lambda e: None)
    assert seen == [
        ("stage1", {"min_visible_px": 800, "max_occluded_fraction": 0.5}, "cuda"),
        ("stage1", {"min_visible_px": 800, "max_occluded_fraction": 0.5}, "cuda"),
        ("stage2", {}, "cuda"),
        ("stage2", {}, "cuda"),
    ]


def test_render_size_and_samples_have_one_default(tmp_path):
    """The flag wins, then the stages file's render: block, then the generators' own defaults (RunConfig,
    GenerateConfig): the shipped stages file sets none of them, so the CLIs and the build agree."""
    from data_prep.render.generate import GenerateConfig

    generator = {"width": GenerateConfig.width, "height": GenerateConfig.height, "samples": GenerateConfig.samples}
    assert generator == {"width": 480, "height": 320, "samples": 16}
    assert B.render_settings(load_curriculum(STAGES_FILE)) == generator
    assert B.BuildOptions().width == 480 and B.BuildOptions().samples == 16
    raw = yaml.safe_load(STAGES_FILE.read_text())
    raw["render"] = {"width": 640, "samples": 4}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw))
    curriculum = load_curriculum(path)
    assert B.render_settings(curriculum) == {"width": 640, "height": 320, "samples": 4}
    assert B.render_settings(curriculum, width=64, samples=1) == {"width": 64, "height": 320, "samples": 1}
