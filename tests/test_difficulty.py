"""Difficulty per difference: colour distance, silhouettes, stage filters, eval bins; and on real renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_prep import stages
from data_prep.render import scene as S
from data_prep.render.generate import GenerateConfig, generate, main
from data_prep.render.ground_truth import delta_e_ciede2000, hull_area, srgb8_to_lab
from dig_common.models import load_model_spec
from eval import dig
from eval.scoring import reward_knobs
from reward_fns import geometry

# Sharma, Wu & Dalal (2005), test data for CIEDE2000: (Lab 1, Lab 2, dE00).
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 3.1571, -77.2803), (50.0, 0.0, -82.7485), 2.8615),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((50.0, 2.5, 0.0), (61.0, -5.0, 29.0), 22.8977),
]


def test_ciede2000_matches_published_values_and_lab_of_srgb():
    got = delta_e_ciede2000(np.array([p[0] for p in SHARMA]), np.array([p[1] for p in SHARMA]))
    assert got == pytest.approx([p[2] for p in SHARMA], abs=1e-4)
    assert srgb8_to_lab(np.array([255, 255, 255])) == pytest.approx([100, 0, 0], abs=1e-3)
    assert srgb8_to_lab(np.array([255, 0, 0])) == pytest.approx([53.24, 80.09, 67.20], abs=0.01)


def test_hull_area():
    square_with_inner_points = np.array([[0, 0], [4, 0], [4, 3], [0, 3], [2, 1], [1, 2]])
    assert hull_area(square_with_inner_points) == 12.0
    assert hull_area(np.array([[0, 0], [1, 1], [2, 2]])) == 0.0  # collinear


def test_stage_filters_parse_validate_and_apply(tmp_path):
    raw = yaml.safe_load(stages.STAGES_FILE.read_text())
    assert all("difficulty" not in body for body in raw["stages"].values())  # off by default
    raw["stages"]["1"]["difficulty"] = {"min_visible_px": 800}
    raw["stages"]["1"]["splits"]["val"]["difficulty"] = {"min_visible_px": 0, "max_occluded_fraction": 0.5}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw))
    cur = stages.load_curriculum(path)
    assert cur.stage(1).splits["train"][0].difficulty == {"min_visible_px": 800}
    assert cur.stage(1).splits["val"][0].difficulty == {"min_visible_px": 0, "max_occluded_fraction": 0.5}
    assert cur.stage(2).splits["train"][0].difficulty == {}
    raw["stages"]["2"]["difficulty"] = {"min_visibility": 3}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"stages\.2\.splits\.train\[0\]\.difficulty\.min_visibility: unknown filter"):
        stages.load_curriculum(path)
    d = {
        "type": "color",
        "object_id": 3,
        "changed_px": 50,
        "difficulty": {"visible_px": 700, "occluded_fraction": 0.2, "delta_e00": None},
    }
    assert stages.difficulty_failure({"min_visible_px": 800}, [d]).startswith("color of object 3: visible_px 700")
    assert stages.difficulty_failure({"min_visible_px": 600, "max_occluded_fraction": 0.3}, [d]) is None
    assert stages.difficulty_failure({"min_delta_e00": 10}, [d]) is None  # null fields are not filtered
    assert stages.difficulty_failure({"min_changed_px": 51}, [d]) is not None


def test_eval_reports_metrics_by_visible_pixel_tercile():
    spec = load_model_spec("qwen3_vl_8b_thinking")
    w, h = 480, 320
    boxes = [[10 + 40 * i, 10, 40 + 40 * i, 60] for i in range(6)]
    visible = [100, 200, 300, 400, 500, 600]
    gt = {"boxes": boxes, "width": w, "height": h, "types": ["color"] * 6}
    row = {
        "reward_model": {"ground_truth": json.dumps(gt)},
        "extra_info": {"pair_id": "p", "difficulty": [{"visible_px": v} for v in visible]},
    }
    found = boxes[2:]  # the two least visible differences are missed
    frame = dict(factor=spec.resize_factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    model_boxes = geometry.from_pixels(found, spec.coord_mode, w, h, **frame).round(2).tolist()
    body = json.dumps([{"bbox_2d": b, "label": "diff"} for b in model_boxes])
    answer = ("<think>looked</think>" if spec.require_think else "") + f"```json\n{body}\n```"
    samples = dig.score_rows([row], {"p": answer}, reward_knobs(spec))
    bins = dig.aggregate(samples)["per_difficulty"]
    assert list(bins) == ["visible_px_bin1", "visible_px_bin2", "visible_px_bin3"]
    assert [b["n"] for b in bins.values()] == [2, 2, 2]
    assert [b["recall"] for b in bins.values()] == [0.0, 1.0, 1.0]
    assert bins["visible_px_bin1"]["visible_px"][0] == 100 and bins["visible_px_bin3"]["visible_px"][1] == 600
    assert (
        dig.aggregate(dig.score_rows([dict(row, extra_info={"pair_id": "p"})], {"p": ""}, reward_knobs(spec)))[
            "per_difficulty"
        ]
        == {}
    )  # rows without difficulty: no bins


SMALL = {"width": 96, "height": 96, "samples": 1, "denoise": False, "progress": False, "threads": 1}


@pytest.mark.render
def test_generated_records_carry_difficulty_and_filters_hold(tmp_path):
    out = tmp_path / "run"
    stats = generate(
        GenerateConfig(
            out=out, num=4, k="1-2", seed=21, save_masks=True, **SMALL, difficulty_filters={"min_visible_px": 60}
        )
    )

    for p in sorted(out.glob("shard-*/s*-*.json")):
        rec = json.loads(p.read_text())
        assert rec["num_objects_a"] == len(rec["scene"]["objects"]) and rec["num_objects_b"] == len(
            rec["scene_b"]["objects"]
        )
        mask_a = np.load(p.with_name(rec["pair_id"] + "_mask_a.npy"))
        for d in rec["differences"]:
            x = d["difficulty"]
            assert x["visible_px"] >= 60  # the filter
            side = {"removal": "a", "addition": "b", "color": "b", "material": "b"}.get(d["type"])
            want = d[f"visible_px_{side}"] if side else max(d["visible_px_a"], d["visible_px_b"])
            assert x["visible_px"] == want
            x0, y0, x1, y1 = d["box"]
            assert x["border_px"] == min(x0, y0, 96 - x1, 96 - y1) >= 0
            assert x["box_fraction"] == pytest.approx((x1 - x0) * (y1 - y0) / 96**2, abs=1e-6)
            assert 0.0 <= x["occluded_fraction"] <= 1.0
            assert (x["delta_e00"] is not None) == (d["type"] == "color")
            if d["type"] == "color":
                assert x["delta_e00"] > 1.0  # a visible colour change
            if d["type"] in ("addition", "removal"):
                assert x["size_ratio"] is None
            assert mask_a.shape == (96, 96)
    assert stats["accepted"] == 4
    assert set(stats["rejected"]) <= {
        "difference_too_small",
        "untouched_visibility_changed",
        "difficulty_filter",
        "unlabeled_change",
        "difference_unchanged",
        "interpenetration",
        "out_of_frame",
    }


@pytest.mark.render
def test_occluded_fraction_of_a_half_hidden_object(tmp_path):
    """A sphere behind a cube: the recorded occluded fraction is large; alone it is ~0."""
    from data_prep.render.generate import RenderWorker

    vocab = S.load_vocabulary()
    spec = S.sample_scene(vocab, 0)
    spec["camera"]["location"] = [7.4, -7.4, 1.0]
    spec["camera"]["look_at"] = [0.0, 0.0, 0.5]

    def obj(i, shape, color, size, x, y):
        return S.resolve_object(
            vocab,
            {
                "id": i,
                "shape": shape,
                "color": color,
                "material": "rubber",
                "size": size,
                "x": x,
                "y": y,
                "rotation_deg": 45.0,
            },
        )

    config = GenerateConfig(out=tmp_path, num=1, width=128, height=128, samples=1, denoise=False, threads=1)
    settings = dict(config.render_settings(), seed=0)
    res = {}
    with RenderWorker() as worker:
        for name, objects in (("hidden", [obj(1, "cube", "red", "large", 2.0, -2.0)]), ("alone", [])):
            a = dict(spec, objects=[*objects, obj(2, "sphere", "blue", "large", 0.9, -0.6)])
            b = S.apply_edits(
                vocab, a, [{"type": "color", "object_id": 2, "attribute": "color", "from": "blue", "to": "yellow"}]
            )
            gates = dict(vocab.gate_thresholds(128, 128), min_visible_px=1)
            job = {
                "scene_a": a,
                "scene_b": b,
                "differences": [{"type": "color", "object_id": 2}],
                "render": settings,
                "gates": gates,
                "out_a": str(tmp_path / f"{name}_a.png"),
                "out_b": str(tmp_path / f"{name}_b.png"),
            }
            res[name] = worker.request(job)["differences"][0]["difficulty"]
    assert res["alone"]["occluded_fraction"] < 0.1
    assert res["hidden"]["occluded_fraction"] > 0.3
    assert res["hidden"]["visible_px"] < res["alone"]["visible_px"]


def test_difficulty_flag_is_checked(tmp_path, capsys):
    assert main(["--num", "1", "--out-dir", str(tmp_path / "x"), "--difficulty", "min_visible=3"]) == 2
    assert "--difficulty.min_visible: unknown filter" in capsys.readouterr().err
    assert not Path(tmp_path / "x").exists()
