"""The generation API/CLI end to end at 64x64, 1 spp: output contract, resume, SIGKILL, shards, bad input (the
CLI's error lines: test_cli_generators.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.gallery import draw_pair, make_sheet, pair_boxes
from data_prep.render import scene as S
from data_prep.render.generate import GenerateConfig, RenderEnvError, generate, sample_candidate
from data_prep.runner import pair_id

SMALL = {"width": 64, "height": 64, "samples": 1, "denoise": False, "progress": False, "threads": 1}
DIFF_KEYS = {"type", "object_id", "box", "visible_px_a", "visible_px_b", "changed_px"}


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _check_pair_files(out: Path, rec: dict) -> dict:
    pair = json.loads((out / rec["json"]).read_text())
    for side in ("a", "b"):
        with Image.open((out / rec["json"]).parent / pair["images"][side]) as im:
            im.load()  # decodes fully: a truncated PNG raises
            assert im.size == (pair["width"], pair["height"])
    return pair


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = GenerateConfig(out=out, num=8, k="1-3", seed=7, workers=2, **SMALL)
    stats = generate(cfg)
    return out, cfg, stats


@pytest.mark.render
def test_output_contract(run):
    out, cfg, stats = run
    recs = _manifest(out)
    assert sorted(r["pair_id"] for r in recs) == [pair_id(7, i) for i in range(8)]
    vocab = S.load_vocabulary()
    for rec in recs:
        pair = _check_pair_files(out, rec)
        assert Path(rec["json"]).parent.name == "shard-000-of-001"
        assert pair["pair_id"] == rec["pair_id"]
        assert pair["num_differences"] == len(pair["differences"]) == rec["num_differences"]
        assert 1 <= pair["num_differences"] <= 3
        assert (pair["width"], pair["height"]) == (64, 64)
        assert pair["renderer"]["name"] == "blender-cycles" and pair["renderer"]["version"].startswith("5.0")
        assert pair["renderer"]["settings"]["samples"] == 1
        assert len(pair["edits"]) == pair["num_differences"]
        for d in pair["differences"]:
            assert set(d) >= DIFF_KEYS
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert d["changed_px"] > 0
        # The recorded seed regenerates the pair's scene and edits exactly.
        a, edits, _ = sample_candidate(vocab, pair["seed"], pair["generator"]["k"])
        assert a == pair["scene"] and edits == pair["edits"]
    assert stats["accepted"] == 8
    assert stats["candidates"] == 8 + stats["rejected_total"]
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["accepted"] == 8 and on_disk["rejected"] == stats["rejected"]
    assert sum(on_disk["differences_by_type"].values()) == sum(r["num_differences"] for r in recs)


@pytest.mark.render
def test_rerun_resumes_without_new_work(run):
    out, cfg, _ = run
    before = (out / "manifest.jsonl").read_text()
    stats = generate(GenerateConfig(**{**cfg.__dict__, "out": out}))
    assert stats["this_run"]["pairs"] == 0
    assert (out / "manifest.jsonl").read_text() == before
    with pytest.raises(ValueError, match="different settings"):
        generate(GenerateConfig(**{**cfg.__dict__, "out": out, "width": 80}))


@pytest.mark.render
def test_gallery_sheet(run, tmp_path):
    out, _, _ = run
    sheet = make_sheet(out, limit=4, scale=2.0)
    assert sheet.width > 4 * 64 and sheet.height > 2 * 64
    rec = json.loads((out / _manifest(out)[0]["json"]).read_text())
    on_a, on_b = pair_boxes(rec)
    blank = Image.new("RGB", (64, 64))
    img = np.asarray(draw_pair(blank, blank, on_a, on_b))
    assert img.max() > 0  # boxes drawn on black


@pytest.mark.render
def test_shards_and_no_diff_fraction(tmp_path):
    out = tmp_path / "sharded"
    for i in range(2):
        generate(GenerateConfig(out=out, num=4, k=2, seed=3, shard=(i, 2), no_diff_fraction=1.0, **SMALL))
    recs = _manifest(out)
    assert sorted(r["pair_id"] for r in recs) == [pair_id(3, i) for i in range(4)]
    assert {Path(r["json"]).parent.name for r in recs} == {"shard-000-of-002", "shard-001-of-002"}
    for rec in recs:
        pair = _check_pair_files(out, rec)
        assert pair["num_differences"] == 0 and pair["differences"] == []
        folder = (out / rec["json"]).parent
        a = np.asarray(Image.open(folder / pair["images"]["a"]))
        b = np.asarray(Image.open(folder / pair["images"]["b"]))
        assert np.array_equal(a, b)  # same scene, same Cycles seed: nothing differs
    assert json.loads((out / "stats.json").read_text())["accepted"] == 4


def render_workers_of(pid: int) -> list[int]:
    """Live render workers started by generator ``pid`` (they carry DIG_RENDER_PARENT_PID)."""
    mark = f"DIG_RENDER_PARENT_PID={pid}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def render_cmd(out: Path, num: int) -> list[str]:
    cmd = [sys.executable, "-m", "data_prep.render", "--num", str(num), "--k", "1-4", "--seed", "5"]
    cmd += ["--out-dir", str(out), "--width", "64", "--height", "64", "--samples", "1", "--no-denoise"]
    return cmd + ["--workers", "2", "--threads", "1", "--no-progress"]


def stopped_at(cmd: list[str], crash_at: str) -> subprocess.CompletedProcess:
    """The generator, killed or interrupted by itself at a named point (dig_common.crashpoints), not after a
    sleep; its render workers must not outlive it."""
    env = {**os.environ, "DIG_CRASH_AT": crash_at}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    deadline = time.time() + 10
    while time.time() < deadline and render_workers_of(proc.pid):
        time.sleep(0.05)
    assert not render_workers_of(proc.pid), "render workers outlived the generator"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_run(out: Path, num: int) -> None:
    recs = _manifest(out)
    assert sorted(r["pair_id"] for r in recs) == [pair_id(5, i) for i in range(num)]  # every pair exactly once
    for rec in recs:
        _check_pair_files(out, rec)
    assert [p.name for p in out.rglob("*") if ".tmp-" in p.name] == []
    assert len({p.name for p in (out / "shard-000-of-001").glob("s5-*")}) == 3 * num
    stats = json.loads((out / "stats.json").read_text())
    assert stats["accepted"] == num  # stats count the manifest's pairs, whatever the kill left


@pytest.mark.render
@pytest.mark.parametrize("point", ["pair-listed:3", "pair-committed:3"])
def test_sigkill_at_a_chosen_point_then_resume(tmp_path, point):
    out, num = tmp_path / "killed", 8
    cmd = render_cmd(out, num)
    killed = stopped_at(cmd, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(_manifest(out)) == 3
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["this_run"]["pairs"] == num - 3
    check_run(out, num)


@pytest.mark.render
def test_ctrl_c_keeps_finished_pairs_and_says_how_to_resume(tmp_path):
    out, num = tmp_path / "interrupted", 8
    cmd = render_cmd(out, num)
    stopped = stopped_at(cmd, "pair-committed:2:INT")
    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith("python -m data_prep.render: interrupted: every finished")
    listed = len(_manifest(out))
    assert listed >= 2
    assert json.loads((out / "stats.json").read_text())["accepted"] == listed
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["this_run"]["pairs"] == num - listed  # no finished pair is made again
    check_run(out, num)


def test_missing_render_venv_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIG_RENDER_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(RenderEnvError, match="setup_env.sh"):
        generate(GenerateConfig(out=tmp_path / "o", num=1, **SMALL))


@pytest.mark.render
@pytest.mark.slow
def test_ray_local_matches_local_run(run, tmp_path):
    out, cfg, _ = run
    ray_out = tmp_path / "ray"
    generate(GenerateConfig(**{**cfg.__dict__, "out": ray_out, "ray_address": "local", "num": 4}))
    for rec in _manifest(ray_out):
        mine = json.loads((ray_out / rec["json"]).read_text())
        ref = json.loads((out / rec["json"]).read_text())
        assert (mine["seed"], mine["differences"]) == (ref["seed"], ref["differences"])
    assert len(_manifest(ray_out)) == 4
