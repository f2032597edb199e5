"""The dataset tools' one error style (docs/cli.md, errors): bad input ends with one ``<prog>: error: ...`` line that
names the thing and the fix, exit 2, no traceback, before any work. One case per tool runs as a real subprocess
(nothing escapes ``cli_main``); the rest call ``main(argv)`` in-process. Flag syntax stays with argparse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_prep import audit, budget, build, gallery, to_verl
from data_prep.stages import STAGES_FILE
from data_prep.synthetic import write_pairs
from dig_common.fileio import TMP_MARK

REPO = Path(__file__).resolve().parents[1]
MODEL = "qwen2_5_vl_7b"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("DIG_DEBUG", raising=False)  # DIG_DEBUG=1 re-raises: the tracebacks these tests refuse


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """4 Blender-free pairs (data_prep.synthetic), K = 1."""
    return write_pairs(tmp_path_factory.mktemp("pairs") / "run", num=4, k=1, seed=5, width=48, height=32)


def error_line(err: str, prog: str, *names: str) -> str:
    """The one error line of ``err``; it starts with ``prog: error:`` and holds every one of ``names``."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    for name in names:
        assert name in lines[0], (name, err)
    return lines[0]


def run_module(module: str, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def fails(main, argv: list, capsys, prog: str, *names: str) -> str:
    """``main(argv)`` returns 2 and prints one error line with ``names``; returns the line."""
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return error_line(captured.err, prog, *names)


# ---------------------------------------------------------------- data_prep.build


def build_argv(out_dir: Path, *extra: object) -> list:
    return ["--out-dir", out_dir, "--model", MODEL, "--stage", "1", "--num-train", "2", "--num-val", "1", *extra]


def test_build_unknown_model_subprocess(tmp_path):
    proc = run_module("data_prep.build", "--out-dir", tmp_path / "data", "--model", "nope", "--stage", "1")
    assert proc.returncode == 2
    line = error_line(proc.stderr, build.PROG, "unknown model 'nope'", "qwen3_vl_8b_thinking", "YAML file")
    assert "known models" in line
    assert not (tmp_path / "data").exists()


def test_build_bad_stage_and_stages_file(tmp_path, capsys):
    data = tmp_path / "data"
    fails(build.main, build_argv(data)[:5] + ["9"], capsys, build.PROG, "unknown stage '9'", "1, 2, 3, test")
    missing = tmp_path / "none.yaml"
    fails(build.main, build_argv(data, "--stages-file", missing), capsys, build.PROG, str(missing), "--stages-file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: {a: 1: 2}\n")
    fails(
        build.main, build_argv(data, "--stages-file", broken), capsys, build.PROG, f"{broken}: not valid YAML: line 1,"
    )
    assert not data.exists()


def test_build_out_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "data"
    path.write_text("not a folder")
    fails(build.main, build_argv(path), capsys, build.PROG, f"--out-dir {path} is a file")


def test_build_parquet_path_that_is_a_folder_fails_before_generating(tmp_path, capsys):
    data = tmp_path / "data"
    (data / MODEL / "stage1" / "val.parquet").mkdir(parents=True)
    fails(build.main, build_argv(data), capsys, build.PROG, f"{data / MODEL / 'stage1' / 'val.parquet'} is a folder")
    assert not (data / "pairs").exists()


def test_build_photo_mix_needs_the_coco_set_on_disk(tmp_path, capsys):
    raw = yaml.safe_load(STAGES_FILE.read_text())
    raw["stages"]["1"]["sources"] = {"rendered": 0.5, "photo": 0.5}
    stages = tmp_path / "stages.yaml"
    stages.write_text(yaml.safe_dump(raw))
    data = tmp_path / "data"
    argv = build_argv(data, "--stages-file", stages)
    fails(build.main, argv, capsys, build.PROG, "stage 1 mixes 50 % rendered, 50 % photo", "--coco FILE --images DIR")
    coco = tmp_path / "annotations.json"
    fails(build.main, [*argv, "--coco", coco, "--images", tmp_path], capsys, build.PROG, str(coco), "--coco FILE")
    coco.write_text("{}")
    images = tmp_path / "images"
    fails(build.main, [*argv, "--coco", coco, "--images", images], capsys, build.PROG, str(images), "--images DIR")
    assert not data.exists()


def test_build_flag_syntax_stays_with_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        build.main(["--data-dir", str(tmp_path), "--model", MODEL, "--stage", "1"])  # the old name is gone
    assert exit_.value.code == 2
    assert "the following arguments are required: --out-dir" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num-train", "--num-val", "--num-test"])
def test_build_zero_pairs_is_a_flag_error_naming_the_flag(tmp_path, capsys, flag):
    argv = [str(a) for a in build_argv(tmp_path / "data")]
    if flag in argv:
        argv[argv.index(flag) + 1] = "0"
    else:
        argv += [flag, "0"]
    with pytest.raises(SystemExit) as exit_:
        build.main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, got '0'" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "data").exists()


def test_to_verl_with_no_pair_set_names_the_flag():
    with pytest.raises(ValueError, match=r"no pair set to convert: give --pairs DIR"):
        to_verl.plan_conversion([], MODEL, "1", "train")


# ---------------------------------------------------------------- data_prep.to_verl


def to_verl_argv(pairs_dir: Path, out: Path, *, model: str = MODEL, stage: str = "1") -> list:
    return ["--pairs", pairs_dir, "--out", out, "--model", model, "--stage", stage, "--split", "train"]


def test_to_verl_missing_pairs_folder_subprocess(tmp_path):
    missing = tmp_path / "nope"
    proc = run_module("data_prep.to_verl", *to_verl_argv(missing, tmp_path / "o.parquet"))
    assert proc.returncode == 2
    error_line(proc.stderr, to_verl.PROG, f"--pairs {missing}: no such folder", "output folder of a generation run")
    assert not (tmp_path / "o.parquet").exists()


def test_to_verl_bad_model_stage_manifest(pairs, tmp_path, capsys):
    out = tmp_path / "o.parquet"
    fails(to_verl.main, to_verl_argv(pairs, out, model="qwen0"), capsys, to_verl.PROG, "unknown model 'qwen0'")
    fails(to_verl.main, to_verl_argv(pairs, out, stage="7"), capsys, to_verl.PROG, "unknown stage '7'")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(to_verl.main, to_verl_argv(empty, out), capsys, to_verl.PROG, "manifest.jsonl not found", "--pairs must be")
    assert not out.exists()


def test_to_verl_out_that_is_a_folder_fails_before_reading_pairs(pairs, tmp_path, capsys):
    folder = tmp_path / "train.parquet"
    folder.mkdir()
    fails(to_verl.main, to_verl_argv(pairs, folder), capsys, to_verl.PROG, f"{folder} is a folder", "file name")
    assert list(folder.iterdir()) == []


def test_to_verl_bad_pair_names_the_pair_and_writes_nothing(tmp_path, capsys):
    bad = write_pairs(tmp_path / "bad", num=2, k=1, seed=9, width=32, height=32)
    next(bad.glob("shard_*/s9-0000001_b.png")).unlink()
    out = tmp_path / "o.parquet"
    fails(to_verl.main, to_verl_argv(bad, out), capsys, to_verl.PROG, "pair s9-0000001", "_b.png missing")
    assert not out.exists() and not list(tmp_path.glob(f"*{TMP_MARK}*"))


def test_to_verl_writes_through_a_temp_name(pairs, tmp_path, capsys):
    out = tmp_path / "o.parquet"
    assert to_verl.main([str(a) for a in to_verl_argv(pairs, out)]) == 0
    assert json.loads(capsys.readouterr().out)["num_rows"] == 4
    assert out.read_bytes()[:4] == b"PAR1" and [p.name for p in tmp_path.iterdir()] == ["o.parquet"]


def test_to_verl_row_group_size_is_a_flag_error(pairs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        to_verl.main([*map(str, to_verl_argv(pairs, tmp_path / "o.parquet")), "--row-group-size", "0"])
    assert exit_.value.code == 2
    assert "argument --row-group-size: expected an integer >= 1, got '0'" in capsys.readouterr().err


# ---------------------------------------------------------------- data_prep.gallery


def test_gallery_missing_pairs_folder_subprocess(tmp_path):
    missing = tmp_path / "nope"
    proc = run_module("data_prep.gallery", "--pairs", missing, "--out", tmp_path / "sheet.png")
    assert proc.returncode == 2
    error_line(proc.stderr, gallery.PROG, f"--pairs {missing}: no such folder", "output folder of a generation run")


def test_gallery_empty_folder_broken_record_and_folder_out(pairs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    sheet = tmp_path / "sheet.png"
    argv = ["--pairs", empty, "--out", sheet]
    fails(gallery.main, argv, capsys, gallery.PROG, f"--pairs {empty}: no pair records found")
    fails(gallery.main, ["--pairs", pairs, "--out", tmp_path], capsys, gallery.PROG, f"--out {tmp_path} is a folder")
    (empty / "s1-0000000.json").write_text("{not json")
    fails(gallery.main, argv, capsys, gallery.PROG, f"pair record {empty / 's1-0000000.json'}: not valid JSON")
    assert not sheet.exists()
    with pytest.raises(SystemExit) as exit_:
        gallery.main(["--pairs", str(pairs), "--out", str(sheet), "--max", "3"])  # renamed: --limit
    assert exit_.value.code == 2 and "unrecognized arguments: --max" in capsys.readouterr().err


def test_gallery_limit_and_a_png_without_the_suffix(pairs, tmp_path, capsys):
    sheet = tmp_path / "sheet"  # no .png: the format is named, not guessed from the (temp) file name
    assert gallery.main(["--pairs", str(pairs), "--out", str(sheet), "--limit", "3", "--columns", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sheet.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["sheet"]
    from PIL import Image

    with Image.open(sheet) as image:
        assert image.height == 3 * (32 + 16 + 8)  # three pairs: one row each, title bar and gap


# ---------------------------------------------------------------- data_prep.audit


def test_audit_missing_pairs_folder_subprocess(tmp_path):
    missing = tmp_path / "nope"
    proc = run_module("data_prep.audit", "--pairs", missing)
    assert proc.returncode == 2 and proc.stdout == ""
    error_line(proc.stderr, audit.PROG, f"--pairs {missing}: no such folder")


def test_audit_bad_paths(pairs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(audit.main, ["--pairs", empty], capsys, audit.PROG, f"--pairs {empty}: no pair records found")
    out_dir = tmp_path / "report.json"
    out_dir.mkdir()
    fails(audit.main, ["--pairs", pairs, "--out", out_dir], capsys, audit.PROG, f"--out {out_dir} is a folder")
    fails(audit.main, ["--pairs", pairs, "--gallery", out_dir], capsys, audit.PROG, f"--gallery {out_dir} is a folder")
    with pytest.raises(SystemExit) as exit_:
        audit.main(["--pairs", str(pairs), "--gallery-max", "3"])  # renamed: --gallery-limit
    assert exit_.value.code == 2 and "unrecognized arguments: --gallery-max" in capsys.readouterr().err


def test_audit_gallery_limit_and_atomic_files(tmp_path, capsys):
    # --box-min-px beyond any box: no box counts as visibly changed, every pair is flagged, the gallery stops at 2.
    run = write_pairs(tmp_path / "run", num=3, k=1, seed=3, width=48, height=32)
    report, sheet = tmp_path / "out" / "audit.json", tmp_path / "out" / "flagged"
    argv = ["--pairs", run, "--out", report, "--gallery", sheet, "--gallery-limit", "2", "--box-min-px", "100000"]
    assert audit.main([str(a) for a in argv]) == 1  # it ran and flagged: exit 1, not an input error
    captured = capsys.readouterr()
    assert captured.err == f"{audit.PROG}: {run}: boxes not visibly changed: 3 (of 3 pairs)\n"
    shown = json.loads(captured.out)
    assert shown == json.loads(report.read_text())
    assert shown["boxes"]["visibly_changed"] == 0 and shown["gallery"]["pairs_drawn"] == 2
    assert sheet.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in report.parent.iterdir()) == ["audit.json", "flagged"]


def test_gallery_and_audit_pictures_default_to_the_pair_set_not_the_working_directory(tmp_path, monkeypatch):
    run = write_pairs(tmp_path / "run", num=2, k=1, seed=3, width=48, height=32)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert gallery.main(["--pairs", str(run)]) == 0
    assert (run / gallery.GALLERY_NAME).read_bytes()[:8] == PNG_SIGNATURE
    assert audit.main(["--pairs", str(run), "--gallery", "--brief"]) == 0  # --gallery without a file
    assert (run / "audit_flagged.png").read_bytes()[:8] == PNG_SIGNATURE
    assert list(cwd.iterdir()) == []  # nothing lands where the command was typed
    # the pair set is still what the readers expect: the pictures are not pairs
    assert len(to_verl.read_manifest(run)) == 2


# ---------------------------------------------------------------- data_prep.budget


def test_budget_missing_processor_subprocess_is_one_fast_line(tmp_path):
    """The README command without the processor: one line with the three fixes, and transformers never imported
    (the cache is checked first, so the answer takes a second, not half a minute)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "import sys; from data_prep import budget; rc = budget.main(['--model', 'qwen3_vl_8b_thinking']); "
        "print('transformers' in sys.modules); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout.strip() == "False"
    line = error_line(proc.stderr, budget.PROG, "no processor for qwen3_vl_8b_thinking", "Qwen/Qwen3-VL-8B-Thinking")
    assert (
        "`hf download Qwen/Qwen3-VL-8B-Thinking --include 'config.json' --include 'preprocessor_config.json' --include"
        in line
    )
    assert "--processor PATH" in line and "--estimate" in line
    proc = run_module("data_prep.budget", "--model", "qwen3_vl_8b_thinking", env=env)  # the entry point itself
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_line(proc.stderr, budget.PROG) == line


def test_budget_unknown_model_and_missing_processor_folder(tmp_path, capsys):
    fails(budget.main, ["--model", "qwen9"], capsys, budget.PROG, "unknown model 'qwen9'", "known models")
    missing = tmp_path / "proc"
    argv = ["--model", MODEL, "--processor", missing]
    line = fails(budget.main, argv, capsys, budget.PROG, f"--processor {missing}: no such folder")
    assert "hf download Qwen/Qwen2.5-VL-7B-Instruct" in line and "--estimate" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--model", MODEL, "--processor", empty]
    fails(budget.main, argv, capsys, budget.PROG, f"folder {empty}", "--processor PATH")


def test_budget_image_size_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        budget.main(["--model", MODEL, "--estimate", "--image-size", "480"])
    assert exit_.value.code == 2 and "expected WIDTHxHEIGHT, got '480'" in capsys.readouterr().err
