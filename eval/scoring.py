"""Per-answer scoring with the details eval needs: the reward's own pipeline, nothing re-implemented.

``score_response`` runs ``reward_fns.scoring.score_answer`` (parse -> frame conversion -> clip/validate ->
Hungarian matching -> metrics), the function ``compute_score`` calls, and keeps what the reward throws away:
the predicted boxes in original pixels and the matched pairs, so eval can count recall per change type and
draw galleries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from dig_common.models import ModelSpec
from reward_fns import scoring
from reward_fns.knobs import RewardKnobs, check_reward_kwargs


def reward_knobs(spec: ModelSpec | None = None, **overrides) -> dict:
    """The reward knobs for a model: defaults, then the model's frame/bounds, then overrides; validated."""
    knobs = dict(spec.reward_kwargs()) if spec is not None else {}
    knobs.update(overrides)
    return check_reward_kwargs(**knobs)


@dataclass
class ScoredAnswer:
    metrics: dict[str, float]  # the reward's nine keys, identical to compute_score's output but its reward_error
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
        return asdict(self)


def score_response(response: str, ground_truth, knobs: RewardKnobs | Mapping) -> ScoredAnswer:
    """Score one response against a ground truth (JSON string or dict). ``knobs``: ``reward_knobs()``."""
    gt = scoring.load_ground_truth(ground_truth)  # bad ground truth is a data error: raise, eval stops
    scored = scoring.score_answer(response, gt, RewardKnobs.of(knobs))
    pairs = []
    if scored.match is not None:
        result = scored.match
        pairs = [
            {"pred": int(i), "gt": int(j), "iou": float(iou), "match": bool(ok)}
            for i, j, iou, ok in zip(result.pred_idx, result.gt_idx, result.iou, result.is_match, strict=True)
        ]
    return ScoredAnswer(
        metrics=scored.metrics,
        pred_boxes=[] if scored.pred is None else scored.pred.tolist(),
        gt_boxes=gt.boxes.tolist(),
        width=gt.width,
        height=gt.height,
        pairs=pairs,
        error=scored.error,
    )
