"""The pair generators' command lines refuse bad input the one way docs/cli.md says: exit 2, one
``<prog>: error: <what, and the fix>`` line on stderr, no traceback, nothing rendered or written.

Each CLI runs once as a real subprocess (nothing escapes ``cli_main``); the other cases call ``main(argv)``.
No case renders: every refusal comes before a render worker starts (runs of ``--num 0`` only write config.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_prep import runner as R
from data_prep.manifest import append_entry, manifest_entry
from data_prep.photo import pairs as P
from data_prep.photo import synthetic as PS
from data_prep.render import generate as G
from data_prep.render import scene as S

REPO = Path(__file__).resolve().parents[1]


def refused(module, argv, capsys) -> str:
    """Run ``module.main(argv)`` in-process; it must refuse with exit 2 and one error line, which is returned."""
    assert module.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith(f"{module.PROG}: error: ")
    return line


def refused_in_subprocess(module_name: str, argv, env: dict | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module_name, *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"python -m {module_name}: error: ")
    return line


# ------------------------------------------------------------------------------------------- generate


@pytest.fixture
def fake_render_python(monkeypatch):
    """A render interpreter that exists, for runs that must stop before any worker starts (or make no pair)."""
    monkeypatch.setenv("DIG_RENDER_PYTHON", sys.executable)


@pytest.mark.parametrize(
    ("tool", "extra", "message"),
    [
        ("generate", ["--k", "0"], "--k: expected 1 <= low <= high, got '0'"),
        ("generate", ["--k", "3-1"], "--k: expected 1 <= low <= high"),
        ("generate", ["--k", "x"], "--k: expected an integer or a range like '1-4'"),
        ("generate", ["--shard", "2/2"], "--shard: expected i/N with 0 <= i < N, got '2/2'"),
        ("generate", ["--shard", "a"], "--shard: expected i/N such as 0/4"),
        ("generate", ["--no-diff-fraction", "1.5"], "--no-diff-fraction: expected a number in [0, 1]"),
        ("generate", ["--workers", "0"], "--workers: expected an integer >= 1"),
        ("generate", ["--width", "3"], "--width: expected an integer in [16, 8192]"),
        ("generate", ["--samples", "0"], "--samples: expected an integer in [1, 65536]"),
        ("generate", ["--threads", "0"], "--threads: expected an integer >= 1"),
        (
            "generate",
            ["--difficulty", "min_visible_px=lots"],
            "--difficulty: expected KEY=NUMBER, got 'min_visible_px=lots'",
        ),
        ("generate", ["--difficulty", "min_visible=3"], "--difficulty.min_visible: unknown filter"),
        ("photo_pairs", ["--k", "1-0"], "--k: expected 1 <= low <= high, got '1-0'"),
        ("photo_pairs", ["--shard", "3/2"], "--shard: expected i/N with 0 <= i < N, got '3/2'"),
        ("photo_pairs", ["--width", "16"], "--width: expected an integer in [32, 8192], got 16"),
        ("photo_pairs", ["--categories", "unicorn"], "--categories: unicorn not in"),
    ],
)
def test_bad_flag_values_are_refused_before_writing(
    tmp_path, capsys, fake_render_python, request, tool, extra, message
):
    out = tmp_path / "run"
    if tool == "generate":
        line = refused(G, ["--num", 2, "--out-dir", out, *extra], capsys)
    else:
        line = refused(P, photo_args(request.getfixturevalue("coco_dir"), out, *extra), capsys)
    assert message in line
    assert not out.exists()


def test_generate_names_the_bad_vocabulary_key_or_file(tmp_path, capsys, fake_render_python):
    raw = yaml.safe_load(S.DEFAULT_VOCAB_PATH.read_text())
    raw["materials"]["metal"] = {"Metallic": "shiny"}
    vocab = tmp_path / "v.yaml"
    vocab.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert "materials.metal.Metallic" in refused(G, ["--num", 1, "--out-dir", out, "--vocab", vocab], capsys)
    (tmp_path / "torn.yaml").write_text("shapes: [cube\n")
    assert "torn.yaml: not valid YAML: line 2, column 1: expected ',' or ']'" in refused(
        G, ["--num", 1, "--out-dir", out, "--vocab", tmp_path / "torn.yaml"], capsys
    )
    line = refused(G, ["--num", 1, "--out-dir", out, "--vocab", tmp_path / "none.yaml"], capsys)
    assert "none.yaml: vocabulary file not found" in line
    assert not out.exists()


def test_generate_without_the_render_venv_says_how_to_build_it(tmp_path):
    """A real process: the missing interpreter is reported in one line (the fix included), not as a traceback."""
    out = tmp_path / "run"
    env = {**_env(), "DIG_RENDER_PYTHON": str(tmp_path / "nope" / "python")}
    line = refused_in_subprocess("data_prep.render", ["--num", 1, "--out-dir", out], env=env)
    assert f"render Python not found at {tmp_path / 'nope' / 'python'} (DIG_RENDER_PYTHON)" in line
    assert "bash scripts/setup_env.sh" in line
    assert not out.exists()


def test_generate_refuses_to_resume_with_other_settings(tmp_path, capsys, fake_render_python):
    out = tmp_path / "run"
    cfg = G.GenerateConfig(out=out, num=1, seed=1, progress=False)
    state = R.RunState(cfg, cfg.resume_settings(S.load_vocabulary(None)))  # what a first run writes first ...
    append_entry(out, manifest_entry(state.shard_dir, cfg.pair_id(0), 0, []))  # ... and once a pair is listed
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    line = refused(G, ["--num", 1, "--out-dir", out, "--seed", 2, "--samples", 4, "--no-progress"], capsys)
    assert f"{out} holds a run with different settings (seed: 1 -> 2, samples: 16 -> 4)" in line
    assert "use a new --out-dir or the same settings to resume" in line


@pytest.mark.parametrize("tool", ["generate", "photo_pairs"])
def test_num_zero_is_refused(tmp_path, capsys, fake_render_python, request, tool):
    out = tmp_path / "run"
    if tool == "generate":
        line = refused(G, ["--num", 0, "--out-dir", out], capsys)
    else:
        argv = photo_args(request.getfixturevalue("coco_dir"), out)
        argv[argv.index("--num") + 1] = 0
        line = refused(P, argv, capsys)
    assert "--num: expected an integer >= 1 (the pairs of the whole run), got 0" in line
    assert not out.exists()


def test_generate_refuses_a_k_no_scene_can_hold_before_writing(tmp_path, capsys, fake_render_python):
    out = tmp_path / "run"
    line = refused(G, ["--num", 1, "--k", 99, "--out-dir", out], capsys)
    assert "--k 99: no scene of " in line and "can hold 99 differences" in line and "lower --k" in line
    assert not out.exists()
    # the largest K of a range is what must fit; a K the scenes hold passes the check
    assert "--k 2-99: " in refused(G, ["--num", 1, "--k", "2-99", "--out-dir", out], capsys)
    G.check_k_possible(G.GenerateConfig(out=out, num=1, k="1-4"), S.load_vocabulary(None))


def test_photo_pairs_k_too_large_is_one_line_and_does_not_block_the_folder(coco_dir, tmp_path, capsys):
    """No candidate of the first pair can pass the gates with 99 differences: one line naming the pair and the fix;
    the folder holds no pair, so a rerun with another --k uses it."""
    out = tmp_path / "run"
    line = refused(P, photo_args(coco_dir, out, "--k", 99), capsys)
    assert "pair p0-0000000: no candidate passed the quality gates" in line and "lower --k" in line
    assert P.main([str(a) for a in photo_args(coco_dir, out, "--k", 1)]) == 0
    assert json.loads((out / "config.json").read_text())["k"] == "1"


def test_generate_refuses_a_file_as_output_folder(tmp_path, capsys, fake_render_python):
    out = tmp_path / "run.txt"
    out.write_text("not a folder")
    assert f"--out-dir: {out} is a file" in refused(G, ["--num", 1, "--out-dir", out], capsys)


def test_flag_syntax_errors_stay_with_argparse(tmp_path, capsys):
    for module, argv, message in [
        (G, ["--num", "1", "--out-dir", str(tmp_path), "--device", "tpu"], "argument --device: invalid choice"),
        (G, ["--num", "1"], "the following arguments are required: --out-dir"),
        (G, ["--num", "1", "--out", str(tmp_path)], "the following arguments are required: --out-dir"),
        (P, ["--num", "1", "--out-dir", str(tmp_path)], "the following arguments are required: --coco, --images"),
        (PS, ["--num-images", "two", "--out-dir", str(tmp_path)], "argument --num-images: invalid int value"),
    ]:
        with pytest.raises(SystemExit) as exc:
            module.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: ") and f"{module.PROG}: error: {message}" in err, err


# ---------------------------------------------------------------------------------------- photo_pairs


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coco")
    PS.write_coco_set(out, num_images=4, seed=5)
    return out


def photo_args(coco_dir: Path, out: Path, *extra) -> list:
    coco = ["--coco", coco_dir / "annotations.json", "--images", coco_dir / "images"]
    return [*coco, "--num", 1, "--out-dir", out, "--width", 64, "--height", 48, "--no-progress", *extra]


def test_photo_pairs_names_a_missing_annotation_file_or_image_folder(coco_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = photo_args(coco_dir, out)
    argv[1] = tmp_path / "gone.json"
    assert f"--coco: annotation file {tmp_path / 'gone.json'} not found" in refused(P, argv, capsys)
    argv = photo_args(coco_dir, out)
    argv[3] = tmp_path / "no-images"
    assert f"--images: {tmp_path / 'no-images'} is not a directory" in refused(P, argv, capsys)
    assert not out.exists()


def test_photo_pairs_names_the_bad_settings_file_and_key(coco_dir, tmp_path):
    """A real process: a settings file that is not YAML, then one with an unknown key, each one line."""
    out = tmp_path / "run"
    torn = tmp_path / "torn.yaml"
    torn.write_text("pastes: {untouched: [1, 2\n")
    line = refused_in_subprocess("data_prep.photo", photo_args(coco_dir, out, "--settings", torn), env=_env())
    assert f"{torn}: not valid YAML: line 2, column 1: expected ',' or ']'" in line
    odd = tmp_path / "odd.yaml"
    odd.write_text(yaml.safe_dump({"pastes": {"glue": 1}}))
    line = refused_in_subprocess("data_prep.photo", photo_args(coco_dir, out, "--settings", odd), env=_env())
    assert f"{odd}: unknown key(s) ['glue'] under 'pastes'" in line
    assert not out.exists()


def test_photo_pairs_refuses_to_resume_with_other_settings(coco_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = photo_args(coco_dir, out)
    assert P.main([str(a) for a in argv]) == 0  # one pair made: the folder is bound to its settings
    capsys.readouterr()
    line = refused(P, [*argv, "--seed", 7, "--k", "2"], capsys)
    assert f"{out} holds a run with different settings (seed: 0 -> 7, k: '1' -> '2')" in line
    assert "use a new --out-dir or the same settings to resume" in line


# ------------------------------------------------------------------------------------ photo_synthetic


def test_photo_synthetic_refuses_bad_values(tmp_path, capsys):
    out = tmp_path / "coco"
    assert "--num-images: expected an integer >= 1, got 0" in refused(PS, ["--out-dir", out, "--num-images", 0], capsys)
    assert "--width: expected an integer in [64, 8192], got 20" in refused(
        PS, ["--out-dir", out, "--width", 20], capsys
    )
    assert not out.exists()
    # the smallest allowed set is drawn and named on stdout
    assert PS.main(["--out-dir", str(out), "--num-images", "1", "--width", "64", "--height", "64"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "annotations.json")
    assert len(json.loads((out / "annotations.json").read_text())["images"]) == 1


def test_photo_synthetic_refuses_a_file_as_output_folder(tmp_path):
    out = tmp_path / "coco.json"
    out.write_text("{}")
    line = refused_in_subprocess("data_prep.photo.synthetic", ["--out-dir", out], env=_env())
    assert f"--out-dir: {out} is a file; give a folder" in line


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
