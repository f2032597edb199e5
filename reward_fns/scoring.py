"""DiG reward: format + Hungarian matching + F1 + IoU, exactly per docs/contracts.md (reward).

verl loads it through the thin entry file ``reward_fns/dig_reward.py``; every knob (``reward_fns.knobs``) is a
keyword argument, settable as ``reward.custom_reward_function.reward_kwargs.<knob>``.

    score = (1 - w_format) * (w_f1 * F1 + w_iou * mIoU) + w_format * format

The function never raises on a response or a ground truth and never evaluates model text; it returns the same
nine float keys for every input, because verl takes the key list of ``reward_extra_info`` from the first sample.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from reward_fns import geometry
from reward_fns.knobs import RewardKnobs, check_reward_kwargs, knobs_from_call
from reward_fns.parsing import ParseError, parse_boxes

__all__ = ["RESULT_KEYS", "RewardKnobs", "check_reward_kwargs", "compute_score", "score_answer"]

RESULT_KEYS = ("score", "acc", "format", "f1", "precision", "recall", "miou", "num_pred", "num_gt")


@dataclass(frozen=True)
class GroundTruth:
    boxes: np.ndarray  # (M, 4) original pixels
    width: float
    height: float


@lru_cache(maxsize=8192)  # a GRPO group scores n responses against the same ground-truth string
def _parse_ground_truth(ground_truth: str) -> GroundTruth:
    gt = json.loads(ground_truth)
    width, height = float(gt["width"]), float(gt["height"])
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise ValueError(f"ground truth width/height must be positive, got {width}, {height}")
    boxes = geometry.as_boxes(gt["boxes"])
    boxes.setflags(write=False)
    return GroundTruth(boxes, width, height)


def load_ground_truth(ground_truth) -> GroundTruth:
    if isinstance(ground_truth, str):
        return _parse_ground_truth(ground_truth)
    return _parse_ground_truth(json.dumps(ground_truth))  # a dict (e.g. from a JSON-lines file)


def predicted_pixel_boxes(solution_str: str, width: float, height: float, knobs: RewardKnobs) -> np.ndarray:
    """Steps 1-3: parse, convert to original pixels, clip, validate. Raises ParseError if format fails."""
    raw = parse_boxes(
        solution_str,
        require_think=knobs.require_think,
        max_boxes=knobs.max_boxes,
        max_answer_chars=knobs.max_answer_chars,
    )
    try:
        pixels = geometry.to_pixels(
            raw,
            knobs.coord_mode,
            width,
            height,
            clip=True,
            factor=knobs.resize_factor,
            min_pixels=knobs.min_pixels,
            max_pixels=knobs.max_pixels,
        )
    except (ValueError, AssertionError) as err:  # smart_resize refuses extreme aspect ratios
        raise ParseError(f"cannot convert from {knobs.coord_mode}: {err}") from err
    if len(pixels) and not (pixels[:, 2:] > pixels[:, :2]).all():
        raise ParseError("a box is empty after clipping to the image (inverted, degenerate or outside)")
    return pixels


@dataclass(frozen=True)
class Match:
    """Matching outcome, for eval's per-type statistics."""

    pred_idx: np.ndarray
    gt_idx: np.ndarray
    iou: np.ndarray
    is_match: np.ndarray  # iou >= iou_threshold, per assigned pair


def match(pred: np.ndarray, gt: GroundTruth, knobs: RewardKnobs) -> Match:
    """Step 4-5: Hungarian assignment on the matching cost, a pair counts when IoU >= iou_threshold."""
    rows, cols, iou = geometry.match_boxes(pred, gt.boxes, gt.width, gt.height, w_l1=knobs.w_l1, w_giou=knobs.w_giou)
    return Match(rows, cols, iou, iou >= knobs.iou_threshold)


def metrics(num_pred: int, num_gt: int, result: Match, knobs: RewardKnobs) -> dict[str, float]:
    """Steps 6-8 for a well-formed answer."""
    n = float(result.is_match.sum())
    precision = n / num_pred if num_pred else (1.0 if num_gt == 0 else 0.0)
    recall = n / num_gt if num_gt else (1.0 if num_pred == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    if len(result.iou):
        miou = float(result.iou.sum()) / len(result.iou)
    else:
        miou = 1.0 if num_pred == num_gt == 0 else 0.0
    acc = knobs.w_f1 * f1 + knobs.w_iou * miou
    return {
        "score": (1.0 - knobs.w_format) * acc + knobs.w_format * 1.0,
        "acc": acc,
        "format": 1.0,
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "miou": miou,
        "num_pred": float(num_pred),
        "num_gt": float(num_gt),
    }


def failed_metrics(num_gt: float) -> dict[str, float]:
    """The result of an answer whose format failed: every metric 0, the GT count kept."""
    out = dict.fromkeys(RESULT_KEYS, 0.0)
    out["num_gt"] = float(num_gt)
    return out


class Scored(NamedTuple):
    """One answer through the whole pipeline: the reward's metrics plus what eval reports and draws."""

    metrics: dict[str, float]  # the nine RESULT_KEYS
    pred: np.ndarray | None  # (N, 4) original pixels; None when format failed
    match: Match | None  # None when format failed
    error: str | None  # why format failed; None when it did not


def score_answer(solution_str: str, gt: GroundTruth, knobs: RewardKnobs) -> Scored:
    """Steps 1-8: the one scoring pipeline. compute_score and eval.scoring (eval.dig, eval.visualize) call it;
    eval.refcoco, which scores only the first box, calls its steps 1-3 (``predicted_pixel_boxes``)."""
    try:
        pred = predicted_pixel_boxes(solution_str, gt.width, gt.height, knobs)
    except ParseError as err:
        return Scored(failed_metrics(len(gt.boxes)), None, None, str(err))
    result = match(pred, gt, knobs)
    return Scored(metrics(len(pred), len(gt.boxes), result, knobs), pred, result, None)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **knobs) -> dict[str, float]:
    """Score one response against ``ground_truth`` (JSON string ``{"boxes", "width", "height"}``).

    ``knobs``: ``RewardKnobs`` fields (``reward_kwargs``). A wrong knob is a configuration error and raises
    ``ValueError``; nothing in a response or a ground truth does."""
    settings = knobs_from_call(knobs)
    try:
        gt = load_ground_truth(ground_truth)
    except Exception:  # a broken dataset row: score 0 rather than kill the step (the dry run checks data)
        return failed_metrics(0.0)
    try:
        return score_answer(solution_str, gt, settings).metrics
    except Exception:  # a bad answer is a format failure already; anything else must not kill the step either
        return failed_metrics(len(gt.boxes))
