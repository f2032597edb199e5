"""Real Blender renders (bpy 5.0.1 in .venv-render) at 64x64, 1 spp: determinism, box rule, quality gates."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.render import scene as S
from data_prep.render.generate import GenerateConfig, RenderWorker, sample_candidate

pytestmark = pytest.mark.render

W = H = 64


@pytest.fixture(scope="module")
def vocab():
    return S.load_vocabulary()


@pytest.fixture(scope="module")
def worker():
    with RenderWorker() as w:
        yield w


def _settings(seed=0, width=W, height=H, prepass=True):
    cfg = GenerateConfig(out=Path("."), num=1, width=width, height=height, samples=1, denoise=False, threads=1)
    return dict(cfg.render_settings(), seed=seed, mask_prepass=prepass)


def _job(vocab, tmp_path, scene_a, scene_b, differences, name="p", width=W, height=H, seed=0, prepass=True):
    return {
        "scene_a": scene_a,
        "scene_b": scene_b,
        "differences": differences,
        "render": _settings(seed, width, height, prepass),
        "gates": vocab.gate_thresholds(width, height),
        "out_a": str(tmp_path / f"{name}_a.png"),
        "out_b": str(tmp_path / f"{name}_b.png"),
        "save_masks": str(tmp_path / name),
    }


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _mask_box(mask, oid):
    ys, xs = np.nonzero(mask == oid)
    if xs.size == 0:
        return None, 0
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], int(xs.size)


def _union(*boxes):
    boxes = [b for b in boxes if b]
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def test_render_pixels_are_deterministic(vocab, worker, tmp_path):
    a, edits, b = sample_candidate(vocab, 3, 2)
    diffs = [{"type": e["type"], "object_id": e["object_id"]} for e in edits]
    r1 = worker.request(_job(vocab, tmp_path, a, b, diffs, "one"))
    r2 = worker.request(_job(vocab, tmp_path, a, b, diffs, "two"))
    with RenderWorker() as fresh:  # and in another process
        r3 = fresh.request(_job(vocab, tmp_path, a, b, diffs, "three"))
    assert r1["renderer"]["version"].startswith("5.0")
    for side in ("a", "b"):
        ref = _pixels(tmp_path / f"one_{side}.png")
        assert ref.shape == (H, W, 3) and ref.std() > 5  # a real image, not blank
        for other in ("two", "three"):
            assert np.array_equal(ref, _pixels(tmp_path / f"{other}_{side}.png")), (side, other)
            assert np.array_equal(
                np.load(tmp_path / f"one_mask_{side}.npy"), np.load(tmp_path / f"{other}_mask_{side}.npy")
            )
    assert r1["differences"] == r2["differences"] == r3["differences"]
    # A different Cycles seed changes the noise, so the comparison above is not vacuous.
    other_seed = dict(_job(vocab, tmp_path, a, b, diffs, "four"), render=_settings(seed=99))
    worker.request(other_seed)
    assert not np.array_equal(_pixels(tmp_path / "one_a.png"), _pixels(tmp_path / "four_a.png"))


def _accepted_single_change(vocab, worker, tmp_path, change_type):
    """First candidate with one change of the given type that passes the gates (at 128x128 for visibility)."""
    for seed in range(40):
        a = S.sample_scene(vocab, seed)
        edits = S.sample_edits(vocab, a, 1, seed, weights={change_type: 1.0})
        b = S.apply_edits(vocab, a, edits)
        if S.interpenetrating_pairs(b):
            continue
        diffs = [{"type": change_type, "object_id": edits[0]["object_id"]}]
        ans = worker.request(_job(vocab, tmp_path, a, b, diffs, change_type, width=128, height=128, seed=seed))
        if ans["accepted"]:
            return ans, edits[0]
    pytest.fail(f"no accepted {change_type} candidate in 40 seeds")


@pytest.mark.parametrize("change_type", S.CHANGE_TYPES)
def test_box_rule_matches_masks(vocab, worker, tmp_path, change_type):
    ans, edit = _accepted_single_change(vocab, worker, tmp_path, change_type)
    mask_a = np.load(tmp_path / f"{change_type}_mask_a.npy")
    mask_b = np.load(tmp_path / f"{change_type}_mask_b.npy")
    assert mask_a.shape == (128, 128)
    (d,) = ans["differences"]
    oid = edit["object_id"]
    box_a, px_a = _mask_box(mask_a, oid)
    box_b, px_b = _mask_box(mask_b, oid)
    assert (d["visible_px_a"], d["visible_px_b"]) == (px_a, px_b)
    expected = {
        "addition": box_b,
        "removal": box_a,
        "color": box_b,
        "material": box_b,
        "size": _union(box_a, box_b),
        "shape": _union(box_a, box_b),
        "move": _union(box_a, box_b),
    }[change_type]
    assert d["box"] == expected
    if change_type == "addition":
        assert px_a == 0 and px_b > 0
    elif change_type == "removal":
        assert px_a > 0 and px_b == 0
    elif change_type in ("color", "material"):
        assert box_a == box_b and px_a == px_b  # silhouette unchanged
    else:
        assert box_a != box_b  # silhouette changed
    # The rendered pixels changed inside the box, and the box is tight: it is the mask's own extent.
    img_a, img_b = _pixels(tmp_path / f"{change_type}_a.png"), _pixels(tmp_path / f"{change_type}_b.png")
    x0, y0, x1, y1 = d["box"]
    changed = (np.abs(img_a - img_b).max(-1) > vocab.gates["changed_intensity"])[y0:y1, x0:x1].sum()
    assert d["changed_px"] == changed >= vocab.gate_thresholds(128, 128)["min_changed_px"]


def _manual_scene(vocab, objects, camera_location=(7.4, -7.4, 1.0)):
    spec = S.sample_scene(vocab, 0)
    spec["camera"]["location"] = list(camera_location)
    spec["camera"]["look_at"] = [0.0, 0.0, 0.5]
    spec["objects"] = [
        S.resolve_object(
            vocab,
            {"id": i, "shape": sh, "color": c, "material": "rubber", "size": sz, "x": x, "y": y, "rotation_deg": 45.0},
        )
        for i, (sh, c, sz, x, y) in enumerate(objects, 1)
    ]
    return spec


@pytest.mark.parametrize("prepass", [True, False], ids=["mask-prepass", "final-render"])
def test_gate_rejects_addition_hidden_behind_object(vocab, worker, tmp_path, prepass):
    # Low camera: a large cube close to it hides a small sphere placed right behind it.
    a = _manual_scene(vocab, [("cube", "red", "large", 2.0, -2.0), ("cylinder", "blue", "large", -2.0, 1.5)])
    hidden = {
        "type": "addition",
        "object_id": 3,
        "object": {
            "shape": "sphere",
            "color": "yellow",
            "material": "rubber",
            "size": "small",
            "x": 0.8,
            "y": -0.8,
            "rotation_deg": 0.0,
        },
    }
    b = S.apply_edits(vocab, a, [hidden])
    ans = worker.request(_job(vocab, tmp_path, a, b, [{"type": "addition", "object_id": 3}], "hidden", prepass=prepass))
    assert ("pre-pass" in ans["detail"]) == prepass
    assert not ans["accepted"] and ans["reason"] == "difference_too_small"
    assert ans["differences"][0]["visible_px_b"] < vocab.gate_thresholds(W, H)["min_visible_px"]
    # Control: the same addition out in the open passes.
    visible = copy.deepcopy(hidden)
    visible["object"].update(size="large", x=1.5, y=1.0)
    b2 = S.apply_edits(vocab, a, [visible])
    ans2 = worker.request(_job(vocab, tmp_path, a, b2, [{"type": "addition", "object_id": 3}], "open", prepass=prepass))
    assert ans2["accepted"], ans2


@pytest.mark.parametrize("prepass", [True, False], ids=["mask-prepass", "final-render"])
def test_gate_rejects_revealed_untouched_object(vocab, worker, tmp_path, prepass):
    # Removing the front cube reveals the sphere behind it: an unlabeled change of an untouched object.
    a = _manual_scene(vocab, [("cube", "red", "large", 2.0, -2.0), ("sphere", "yellow", "small", 0.8, -0.8)])
    b = S.apply_edits(vocab, a, [{"type": "removal", "object_id": 1}])
    ans = worker.request(_job(vocab, tmp_path, a, b, [{"type": "removal", "object_id": 1}], "reveal", prepass=prepass))
    assert not ans["accepted"] and ans["reason"] == "untouched_visibility_changed"
    assert not (tmp_path / "reveal_a.png").exists() if prepass else (tmp_path / "reveal_a.png").exists()


def test_gate_rejects_claimed_change_that_did_not_render(vocab, worker, tmp_path):
    a = _manual_scene(vocab, [("cube", "red", "large", 0.0, 0.0)])
    ans = worker.request(_job(vocab, tmp_path, a, a, [{"type": "color", "object_id": 1}], "same"))
    assert not ans["accepted"] and ans["reason"] == "difference_unchanged"
    assert ans["differences"][0]["changed_px"] == 0


def test_gate_rejects_object_outside_frame(vocab, worker, tmp_path):
    a = _manual_scene(vocab, [("cube", "red", "large", 0.0, 0.0), ("sphere", "blue", "large", -1.0, -7.0)])
    b = S.apply_edits(vocab, a, [{"type": "removal", "object_id": 1}])
    ans = worker.request(_job(vocab, tmp_path, a, b, [{"type": "removal", "object_id": 1}], "frame"))
    assert not ans["accepted"] and ans["reason"] == "out_of_frame"
    assert not Path(tmp_path / "frame_a.png").exists()  # rejected before rendering


def tiny_run_args(out: Path, num: int, device: str) -> list[str]:
    """data_prep.render's flags for a quick 64x64, 1 spp run."""
    size = ["--width", "64", "--height", "64", "--samples", "1", "--no-denoise"]
    return ["--num", str(num), "--out-dir", str(out), *size, "--no-progress", "--device", device]


def test_device_selection_and_a_missing_gpu_stops_before_rendering(worker, tmp_path, capsys):
    from data_prep.render.generate import RenderDeviceError, main

    assert worker.select_device("cpu")["device"] == "CPU"
    auto = worker.select_device("auto")  # the best GPU backend present, else the CPU
    assert auto["device"] in ("OPTIX", "CUDA", "HIP", "CPU")
    missing = []
    for backend in ("hip", "cuda", "optix"):
        try:
            worker.select_device(backend)
        except RenderDeviceError as exc:
            assert f"--device {backend}: Cycles finds no {backend.upper()} device" in str(exc)
            missing.append(backend)
    worker.select_device("cpu")
    assert missing, "no machine has HIP and CUDA GPUs at once"
    out = tmp_path / "gpu-run"
    assert main(tiny_run_args(out, 2, missing[0])) == 2
    assert f"no {missing[0].upper()} device" in capsys.readouterr().err
    assert not list(out.rglob("*.png")) and not (out / "manifest.jsonl").exists()  # nothing was rendered
    # auto falls back to (or finds) a device and the records say which one rendered them.
    main(tiny_run_args(tmp_path / "auto", 1, "auto"))
    (rec,) = [p for p in (tmp_path / "auto").glob("shard-*/s*-*.json")]
    import json

    assert json.loads(rec.read_text())["renderer"]["device"] == auto["device"]
