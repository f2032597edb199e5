"""Box geometry and coordinate frames (docs/contracts.md, coordinate frames): hand-checked values and round trips through the reward."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qwen_vl_utils import smart_resize

from dig_common.models import load_model_spec, model_names
from reward_fns import geometry
from reward_fns.dig_reward import compute_score


def cost_terms(pred, gt, width, height):
    """(L1, GIoU, IoU) matrices of match_boxes' cost, one term at a time."""
    pred, gt = geometry.as_boxes(pred), geometry.as_boxes(gt)
    l1, iou = geometry.cost_matrix(pred, gt, width, height, 1.0, 0.0)
    neg_giou, _ = geometry.cost_matrix(pred, gt, width, height, 0.0, 1.0)
    return l1, -neg_giou, iou


def test_iou_giou_l1_by_hand():
    a = [[0, 0, 100, 100]]
    b = [[50, 0, 150, 100], [200, 200, 300, 300], [0, 0, 100, 100]]
    l1, giou, iou = cost_terms(a, b, 200, 400)
    # IoU: 5000 / 15000; disjoint -> 0; identical -> 1
    np.testing.assert_allclose(iou, [[1 / 3, 0.0, 1.0]])
    np.testing.assert_allclose(geometry.pairwise_iou(a, b), iou)
    # GIoU of the disjoint pair: 0 - (hull 300*300 - union 20000) / 90000
    np.testing.assert_allclose(giou, [[1 / 3, -(90000 - 20000) / 90000, 1.0]])
    # L1 on a 200 x 400 image: x-terms over W, y-terms over H: |50|/200 + 0 + |50|/200 + 0, then 4 * 200/200 + ...
    np.testing.assert_allclose(l1, [[0.5, 200 / 200 + 200 / 400 + 200 / 200 + 200 / 400, 0.0]])
    assert geometry.pairwise_iou(a, np.zeros((0, 4))).shape == (1, 0)
    # continuous areas, no +1: a box covering pixel columns 10..19 is [10, 20], 10 wide
    np.testing.assert_allclose(geometry.box_area([[10, 10, 20, 30]]), [200.0])


def test_degenerate_boxes_do_not_divide_by_zero():
    point = [[5, 5, 5, 5]]
    assert geometry.pairwise_iou(point, point)[0, 0] == 0.0
    assert all(np.isfinite(term).all() for term in cost_terms(point, point, 480, 320))


def test_match_boxes_is_the_minimum_cost_assignment():
    # p0 sits between g0 and g1; p1 is g0. Greedy in prediction order (p0 -> g0) leaves p1 with g1;
    # the minimum total cost pairs p1 -> g0 and p0 -> g1.
    gt = [[0, 0, 100, 100], [100, 0, 200, 100]]
    rows, cols, iou = geometry.match_boxes([[50, 0, 150, 100], [0, 0, 100, 100]], gt, 480, 320, w_l1=5.0, w_giou=2.0)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 0}
    np.testing.assert_allclose(sorted(iou), [1 / 3, 1.0])
    for empty in (np.zeros((0, 4)), []):
        rows, cols, iou = geometry.match_boxes(empty, gt, 480, 320, w_l1=5.0, w_giou=2.0)
        assert len(rows) == len(cols) == len(iou) == 0


@pytest.mark.parametrize(
    ("height", "width", "factor", "min_pixels", "max_pixels"),
    [
        (320, 480, 28, 3136, 12845056),
        (320, 480, 32, 4096, 1310720),
        (720, 1280, 28, 3136, 448 * 448),  # downscaled by max_pixels
        (64, 64, 28, 256 * 28 * 28, 12845056),  # upscaled by min_pixels
        (517, 333, 28, 3136, 1003520),
        (1080, 1920, 32, 4096, 1310720),
    ],
)
def test_resized_size_is_smart_resize(height, width, factor, min_pixels, max_pixels):
    assert geometry.resized_size(height, width, factor, min_pixels, max_pixels) == smart_resize(
        height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
    )


def test_known_resizes():
    assert geometry.resized_size(320, 480, 28, 3136, 12845056) == (308, 476)
    assert geometry.resized_size(720, 1280, 28, 3136, 448 * 448) == (336, 588)


def test_frame_conversions_by_hand():
    box = [[100, 50, 300, 250]]
    np.testing.assert_allclose(geometry.to_pixels([[250, 250, 750, 750]], "rel1000", 400, 200), [[100, 50, 300, 150]])
    np.testing.assert_allclose(geometry.to_pixels([[0.25, 0.25, 0.75, 0.75]], "rel1", 400, 200), [[100, 50, 300, 150]])
    np.testing.assert_allclose(geometry.to_pixels(box, "abs", 400, 200), box)
    # Qwen2.5-VL on 480 x 320: the model saw 476 x 308, so its x = 476 is pixel 480
    frame = {"factor": 28, "min_pixels": 3136, "max_pixels": 12845056}
    np.testing.assert_allclose(
        geometry.to_pixels([[0, 0, 476, 308]], "abs_resized", 480, 320, **frame), [[0, 0, 480, 320]]
    )
    with pytest.raises(ValueError, match="coord_mode"):
        geometry.to_pixels(box, "pixels", 400, 200)
    with pytest.raises(ValueError, match="abs_resized needs"):  # no silent default bounds for a model frame
        geometry.to_pixels(box, "abs_resized", 400, 200, factor=28)


SIZES = [(480, 320), (640, 480), (1280, 720), (333, 517), (64, 64), (1920, 1080)]
BOUNDS = [(3136, 12845056), (3136, 448 * 448), (256 * 28 * 28, 1280 * 28 * 28)]


def _gt_boxes(width, height):
    return [
        [0.1 * width, 0.2 * height, 0.4 * width, 0.6 * height],
        [0.55 * width, 0.05 * height, 0.95 * width, 0.5 * height],
    ]


@pytest.mark.parametrize(("width", "height"), SIZES)
@pytest.mark.parametrize(("min_pixels", "max_pixels"), BOUNDS)
def test_abs_resized_round_trip_scores_one(width, height, min_pixels, max_pixels):
    frame = {"factor": 28, "min_pixels": min_pixels, "max_pixels": max_pixels}
    gt = _gt_boxes(width, height)
    answer = geometry.from_pixels(gt, "abs_resized", width, height, **frame)
    np.testing.assert_allclose(geometry.to_pixels(answer, "abs_resized", width, height, **frame), gt)
    result = compute_score(
        "dig",
        json.dumps([{"bbox_2d": b.tolist()} for b in answer]),
        json.dumps({"boxes": gt, "width": width, "height": height}),
        coord_mode="abs_resized",
        resize_factor=28,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    assert result["score"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("coord_mode", ["rel1000", "rel1", "abs"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_other_frames_round_trip_scores_one(coord_mode, width, height):
    gt = _gt_boxes(width, height)
    answer = geometry.from_pixels(gt, coord_mode, width, height)
    result = compute_score(
        "dig",
        json.dumps(answer.tolist()),
        json.dumps({"boxes": gt, "width": width, "height": height}),
        coord_mode=coord_mode,
    )
    assert result["score"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("model", model_names())
def test_every_base_model_frame_round_trips(model):
    """GT converted into the frame each model config declares, rounded to integers as models print
    them, is scored back with that config's reward kwargs: all matched, IoU within rounding."""
    spec = load_model_spec(model)
    kwargs = spec.reward_kwargs()
    width, height = 480, 320
    gt = _gt_boxes(width, height)
    answer = np.rint(
        geometry.from_pixels(
            gt,
            spec.coord_mode,
            width,
            height,
            factor=spec.resize_factor,
            min_pixels=spec.min_pixels,
            max_pixels=spec.max_pixels,
        )
    )
    response = json.dumps([{"bbox_2d": [int(v) for v in b], "label": "x"} for b in answer])
    if spec.require_think:
        response = "<think>compare</think>" + response
    result = compute_score("dig", response, json.dumps({"boxes": gt, "width": width, "height": height}), **kwargs)
    assert result["f1"] == 1.0
    assert result["miou"] > 0.97


def test_rel1000_is_not_abs_resized():
    """Scoring a Qwen2.5-VL answer as if it were Qwen3-VL's must not pass silently."""
    gt = _gt_boxes(480, 320)
    answer = geometry.from_pixels(gt, "abs_resized", 480, 320, factor=28, min_pixels=3136, max_pixels=12845056)
    result = compute_score(
        "dig", json.dumps(answer.tolist()), json.dumps({"boxes": gt, "width": 480, "height": 320}), coord_mode="rel1000"
    )
    assert result["f1"] < 1.0


def test_clip_bounds_x_by_width_and_y_by_height():
    # 480 x 320: a box over the whole canvas and beyond clips to the image, not to a square
    over = [[-10, -20, 600, 500]]
    np.testing.assert_allclose(geometry.to_pixels(over, "abs", 480, 320, clip=True), [[0, 0, 480, 320]])
    np.testing.assert_allclose(geometry.to_pixels(over, "abs", 320, 480, clip=True), [[0, 0, 320, 480]])
    np.testing.assert_allclose(geometry.to_pixels(over, "abs", 480, 320), over)  # no clip unless asked
    # rel1000 on 480 x 320: (1100, 1100) is (528, 352) before clipping
    np.testing.assert_allclose(
        geometry.to_pixels([[500, 500, 1100, 1100]], "rel1000", 480, 320, clip=True), [[240, 160, 480, 320]]
    )


@pytest.mark.parametrize("extra_gt", [0, 47], ids=["two_gt", "many_gt"])
def test_matching_l1_normalises_x_by_width_and_y_by_height(extra_gt):
    """Pure-L1 matching on 480 x 320: p moved 40 px in x costs 80/480 = 1/6, moved 30 px in y 60/320 = 3/16,
    so p pairs with the x-shifted box. Dividing y by W would make the y-shifted one cheaper (60/480).
    ``extra_gt`` far boxes must not change the choice."""
    pred = [[100, 100, 200, 200]]
    gt = [[140, 100, 240, 200], [100, 130, 200, 230]] + [[400, 280, 410, 290]] * extra_gt
    rows, cols, iou = geometry.match_boxes(pred, gt, 480, 320, w_l1=1.0, w_giou=0.0)
    assert (rows.tolist(), cols.tolist()) == ([0], [0])
    np.testing.assert_allclose(iou, [3 / 7])
    # the tall image swaps the preference: 40 px in y over H = 480 is now cheaper than 30 px in x over W = 320
    gt_tall = [[130, 100, 230, 200], [100, 140, 200, 240]] + [[280, 400, 290, 410]] * extra_gt
    _, cols, _ = geometry.match_boxes(pred, gt_tall, 320, 480, w_l1=1.0, w_giou=0.0)
    assert cols.tolist() == [1]


def test_model_files_know_the_same_coordinate_frames_as_the_geometry():
    """dig_common/models.py repeats the frame names (it must import without numpy): they must not drift."""
    from dig_common import models

    assert models.COORD_MODES == geometry.COORD_MODES
