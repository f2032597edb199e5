"""DiG reward: format + Hungarian matching + F1 + IoU, exactly per DESIGN §6.

verl loads it through the thin entry file ``reward_fns/dig_reward.py``; every knob is a keyword argument,
settable as ``reward.custom_reward_function.reward_kwargs.<knob>``.

    score = (1 - w_format) * (w_f1 * F1 + w_iou * mIoU) + w_format * format

The function never raises and never evaluates model text; it returns the same nine float keys for
every input, because verl takes the key list of ``reward_extra_info`` from the first sample.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from reward_fns import geometry
from reward_fns.parsing import DEFAULT_MAX_ANSWER_CHARS, ParseError, parse_boxes

RESULT_KEYS = ("score", "acc", "format", "f1", "precision", "recall", "miou", "num_pred", "num_gt")

DEFAULTS = {
    "w_format": 0.1,
    "w_f1": 0.5,
    "w_iou": 0.5,
    "iou_threshold": 0.5,
    "w_l1": 5.0,
    "w_giou": 2.0,
    "max_boxes": 50,
    "coord_mode": "rel1000",
    "require_think": False,
    "min_pixels": geometry.DEFAULT_MIN_PIXELS,
    "max_pixels": geometry.DEFAULT_MAX_PIXELS,
    "resize_factor": geometry.DEFAULT_RESIZE_FACTOR,
    "max_answer_chars": DEFAULT_MAX_ANSWER_CHARS,
}

# Keys verl itself may add to the call (reward-model plumbing); accepted and ignored.
_VERL_INJECTED = {"reward_router_address", "reward_model_tokenizer"}


def check_reward_kwargs(**kwargs) -> dict:
    """Validate reward knobs (unknown name, wrong type, out of range) and return them merged with the
    defaults. ``compute_score`` never raises, so launch dry runs call this to catch a typo'd
    ``reward_kwargs.<knob>`` on the CPU instead of wasting a GPU run on a silently ignored knob."""
    unknown = sorted(set(kwargs) - set(DEFAULTS) - _VERL_INJECTED)
    if unknown:
        raise ValueError(f"unknown reward knob(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
    knobs = {**DEFAULTS, **{k: v for k, v in kwargs.items() if k in DEFAULTS}}
    for name in ("w_format", "w_f1", "w_iou", "iou_threshold"):
        if not 0.0 <= float(knobs[name]) <= 1.0:
            raise ValueError(f"reward knob {name}={knobs[name]!r} must lie in [0, 1]")
    for name in ("max_boxes", "min_pixels", "max_pixels", "resize_factor", "max_answer_chars"):
        if int(knobs[name]) <= 0:
            raise ValueError(f"reward knob {name}={knobs[name]!r} must be a positive integer")
    if int(knobs["min_pixels"]) > int(knobs["max_pixels"]):
        raise ValueError(
            f"reward knobs need min_pixels <= max_pixels, got {knobs['min_pixels']} > {knobs['max_pixels']}"
        )
    if knobs["coord_mode"] not in geometry.COORD_MODES:
        raise ValueError(
            f"reward knob coord_mode={knobs['coord_mode']!r}; expected one of {', '.join(geometry.COORD_MODES)}"
        )
    if not isinstance(knobs["require_think"], bool):
        raise ValueError(f"reward knob require_think={knobs['require_think']!r} must be true or false")
    return knobs


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


def predicted_pixel_boxes(
    solution_str: str,
    width: float,
    height: float,
    *,
    coord_mode: str = "rel1000",
    require_think: bool = False,
    max_boxes: int = 50,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    resize_factor: int = 28,
    min_pixels: int = geometry.DEFAULT_MIN_PIXELS,
    max_pixels: int = geometry.DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Steps 1-3: parse, convert to original pixels, clip, validate. Raises ParseError if format fails."""
    raw = parse_boxes(solution_str, require_think=require_think, max_boxes=max_boxes, max_answer_chars=max_answer_chars)
    try:
        pixels = geometry.to_pixels(
            raw,
            coord_mode,
            width,
            height,
            clip=True,
            factor=resize_factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
    except (ValueError, AssertionError) as err:  # smart_resize refuses extreme aspect ratios
        raise ParseError(f"cannot convert from {coord_mode}: {err}") from err
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


def match(
    pred: np.ndarray, gt: GroundTruth, *, iou_threshold: float = 0.5, w_l1: float = 5.0, w_giou: float = 2.0
) -> Match:
    rows, cols, iou = geometry.match_boxes(pred, gt.boxes, gt.width, gt.height, w_l1=w_l1, w_giou=w_giou)
    return Match(rows, cols, iou, iou >= iou_threshold)


def metrics(
    num_pred: int, num_gt: int, result: Match, *, w_format: float = 0.1, w_f1: float = 0.5, w_iou: float = 0.5
) -> dict[str, float]:
    """Steps 6-8 for a well-formed answer."""
    n = float(result.is_match.sum())
    precision = n / num_pred if num_pred else (1.0 if num_gt == 0 else 0.0)
    recall = n / num_gt if num_gt else (1.0 if num_pred == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    if len(result.iou):
        miou = float(result.iou.sum()) / len(result.iou)
    else:
        miou = 1.0 if num_pred == num_gt == 0 else 0.0
    acc = w_f1 * f1 + w_iou * miou
    return {
        "score": (1.0 - w_format) * acc + w_format * 1.0,
        "acc": acc,
        "format": 1.0,
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "miou": miou,
        "num_pred": float(num_pred),
        "num_gt": float(num_gt),
    }


def _failed(num_gt: float) -> dict[str, float]:
    out = dict.fromkeys(RESULT_KEYS, 0.0)
    out["num_gt"] = float(num_gt)
    return out


def compute_score(
    data_source,
    solution_str,
    ground_truth,
    extra_info=None,
    *,
    w_format: float = 0.1,
    w_f1: float = 0.5,
    w_iou: float = 0.5,
    iou_threshold: float = 0.5,
    w_l1: float = 5.0,
    w_giou: float = 2.0,
    max_boxes: int = 50,
    coord_mode: str = "rel1000",
    require_think: bool = False,
    min_pixels: int = geometry.DEFAULT_MIN_PIXELS,
    max_pixels: int = geometry.DEFAULT_MAX_PIXELS,
    resize_factor: int = geometry.DEFAULT_RESIZE_FACTOR,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    **_ignored,
) -> dict[str, float]:
    """Score one response against ``ground_truth`` (JSON string ``{"boxes", "width", "height"}``)."""
    try:
        gt = load_ground_truth(ground_truth)
    except Exception:  # a broken dataset row: score 0 rather than kill the step (the dry run checks data)
        return _failed(0.0)
    num_gt = len(gt.boxes)
    try:
        pred = predicted_pixel_boxes(
            solution_str,
            gt.width,
            gt.height,
            coord_mode=coord_mode,
            require_think=require_think,
            max_boxes=max_boxes,
            max_answer_chars=max_answer_chars,
            resize_factor=resize_factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        result = match(pred, gt, iou_threshold=iou_threshold, w_l1=w_l1, w_giou=w_giou)
        return metrics(len(pred), num_gt, result, w_format=w_format, w_f1=w_f1, w_iou=w_iou)
    except ParseError:
        return _failed(num_gt)
    except Exception:  # never raise inside a training step
        return _failed(num_gt)
