"""Per-answer scoring with the details eval needs, built on the reward's own functions (one implementation).

``score_response`` runs exactly the reward's steps (``reward_fns.scoring``: parse -> frame conversion ->
clip/validate -> Hungarian matching -> metrics) and also returns what the reward throws away: the predicted
boxes in original pixels and the matched pairs, so eval can count recall per change type and draw galleries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recipes.dig.models import ModelSpec
from reward_fns import scoring as dig_reward
from reward_fns.parsing import ParseError


def reward_knobs(spec: ModelSpec | None = None, **overrides) -> dict:
    """The reward knobs for a model: defaults, then the model's frame/bounds, then overrides; validated."""
    knobs = dict(spec.reward_kwargs()) if spec is not None else {}
    knobs.update(overrides)
    return dig_reward.check_reward_kwargs(**knobs)


@dataclass
class ScoredAnswer:
    metrics: dict[str, float]  # the reward's nine keys, identical to compute_score's output
    pred_boxes: list[list[float]] = field(default_factory=list)  # original pixels; [] when format failed
    gt_boxes: list[list[float]] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0
    # one entry per Hungarian pair: {"pred": i, "gt": j, "iou": float, "match": bool (iou >= threshold)}
    pairs: list[dict] = field(default_factory=list)
    error: str | None = None  # why format failed, None when it did not

    @property
    def format_ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {
            "metrics": self.metrics,
            "pred_boxes": self.pred_boxes,
            "gt_boxes": self.gt_boxes,
            "width": self.width,
            "height": self.height,
            "pairs": self.pairs,
            "error": self.error,
        }


def score_response(response: str, ground_truth, knobs: dict) -> ScoredAnswer:
    """Score one response against a DESIGN §6 ground truth (JSON string or dict). ``knobs``: ``reward_knobs()``."""
    gt = dig_reward.load_ground_truth(ground_truth)  # bad ground truth is a data error: raise, eval stops
    gt_boxes = gt.boxes.tolist()
    base = {"gt_boxes": gt_boxes, "width": gt.width, "height": gt.height}
    try:
        pred = dig_reward.predicted_pixel_boxes(
            response,
            gt.width,
            gt.height,
            coord_mode=knobs["coord_mode"],
            require_think=knobs["require_think"],
            max_boxes=knobs["max_boxes"],
            max_answer_chars=knobs["max_answer_chars"],
            resize_factor=knobs["resize_factor"],
            min_pixels=knobs["min_pixels"],
            max_pixels=knobs["max_pixels"],
        )
    except ParseError as err:
        failed = dict.fromkeys(dig_reward.RESULT_KEYS, 0.0)
        failed["num_gt"] = float(len(gt_boxes))
        return ScoredAnswer(metrics=failed, error=str(err), **base)
    result = dig_reward.match(
        pred, gt, iou_threshold=knobs["iou_threshold"], w_l1=knobs["w_l1"], w_giou=knobs["w_giou"]
    )
    metrics = dig_reward.metrics(
        len(pred), len(gt_boxes), result, w_format=knobs["w_format"], w_f1=knobs["w_f1"], w_iou=knobs["w_iou"]
    )
    pairs = [
        {"pred": int(i), "gt": int(j), "iou": float(iou), "match": bool(ok)}
        for i, j, iou, ok in zip(result.pred_idx, result.gt_idx, result.iou, result.is_match, strict=True)
    ]
    return ScoredAnswer(metrics=metrics, pred_boxes=pred.tolist(), pairs=pairs, **base)
