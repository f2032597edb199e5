"""The reward's knobs: names, defaults and valid ranges, written once.

``compute_score``, ``check_reward_kwargs`` (the launch dry run), eval and the README table all read this class;
tests check the recipe YAML's ``reward.custom_reward_function.reward_kwargs`` and the README against it.
A knob set is a configuration: a wrong name, type or range raises ``ValueError`` naming the knob.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

from reward_fns import geometry

# Keys verl itself adds to the call when a reward model is configured; accepted and ignored.
VERL_INJECTED = frozenset({"reward_router_address", "reward_model_tokenizer"})

_UNIT_INTERVAL = ("w_format", "w_f1", "w_iou", "iou_threshold")
_NON_NEGATIVE = ("w_l1", "w_giou")
_POSITIVE_INT = ("max_boxes", "min_pixels", "max_pixels", "resize_factor", "max_answer_chars")


def _number(name: str, value) -> float:
    if not isinstance(value, bool) and isinstance(value, numbers.Real):  # numpy scalars too
        try:
            if math.isfinite(value := float(value)):
                return value
        except OverflowError:
            pass
    raise ValueError(f"reward knob {name}={value!r} must be a finite number")


@dataclass(frozen=True, slots=True)
class RewardKnobs:
    """score = (1 - w_format) * (w_f1 * F1 + w_iou * mIoU) + w_format * format."""

    w_format: float = 0.1  # weight of the format term
    w_f1: float = 0.5  # weight of F1 inside acc
    w_iou: float = 0.5  # weight of mIoU inside acc
    iou_threshold: float = 0.5  # IoU a matched pair needs to count for F1
    w_l1: float = 5.0  # matching cost weights (DETR's): w_l1 * L1 - w_giou * GIoU
    w_giou: float = 2.0
    max_boxes: int = 50  # more boxes than this fails format
    coord_mode: str = "rel1000"  # frame of the model's numbers (geometry.COORD_MODES)
    require_think: bool = False  # thinking models: the answer must follow </think>
    # Resize bounds for coord_mode=abs_resized (each model file sets its own): qwen-vl-utils' defaults for
    # Qwen2.5-VL, 4..16384 tokens of 28 x 28 pixels
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    resize_factor: int = 28
    max_answer_chars: int = 32768  # longer answers fail format before parsing

    def __post_init__(self) -> None:
        for name in _UNIT_INTERVAL + _NON_NEGATIVE:
            value = _number(name, getattr(self, name))
            if name in _UNIT_INTERVAL and not 0.0 <= value <= 1.0:
                raise ValueError(f"reward knob {name}={value!r} must lie in [0, 1]")
            if value < 0.0:
                raise ValueError(f"reward knob {name}={value!r} must be >= 0")
            object.__setattr__(self, name, value)
        for name in _POSITIVE_INT:
            value = _number(name, getattr(self, name))
            if value <= 0 or not value.is_integer():
                raise ValueError(f"reward knob {name}={getattr(self, name)!r} must be a positive integer")
            object.__setattr__(self, name, int(value))
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"reward knobs need min_pixels <= max_pixels, got {self.min_pixels} > {self.max_pixels}")
        if self.coord_mode not in geometry.COORD_MODES:
            raise ValueError(
                f"reward knob coord_mode={self.coord_mode!r}; expected one of {', '.join(geometry.COORD_MODES)}"
            )
        if not isinstance(self.require_think, bool):
            raise ValueError(f"reward knob require_think={self.require_think!r} must be true or false")

    @classmethod
    def from_kwargs(cls, **kwargs) -> RewardKnobs:
        """Knobs from ``reward_kwargs``-style keywords: unknown names are an error (verl's own keys excepted)."""
        unknown = sorted(set(kwargs) - KNOB_NAMES - VERL_INJECTED)
        if unknown:
            raise ValueError(f"unknown reward knob(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOB_NAMES))}")
        return cls(**{k: v for k, v in kwargs.items() if k in KNOB_NAMES})

    @classmethod
    def of(cls, knobs: RewardKnobs | Mapping) -> RewardKnobs:
        """An instance as is; a mapping (e.g. ``check_reward_kwargs``' dict) validated."""
        return knobs if isinstance(knobs, cls) else knobs_from_call(dict(knobs))

    def as_dict(self) -> dict:
        return asdict(self)


KNOB_NAMES = frozenset(f.name for f in fields(RewardKnobs))


@lru_cache(maxsize=64)
def _cached(items: tuple) -> RewardKnobs:
    return RewardKnobs.from_kwargs(**dict(items))


def knobs_from_call(kwargs: dict) -> RewardKnobs:
    """``compute_score``'s keyword arguments as knobs, validated once per distinct set (verl passes the same
    kwargs on every call)."""
    try:
        return _cached(tuple(sorted(kwargs.items())))
    except TypeError:  # an unhashable value: validate without the cache (and name the knob if it is wrong)
        return RewardKnobs.from_kwargs(**kwargs)


def check_reward_kwargs(**kwargs) -> dict:
    """Validate reward knobs and return them merged with the defaults. ``compute_score`` raises the same errors
    at its first call; the launch dry run calls this to catch a typo'd ``reward_kwargs.<knob>`` on the CPU,
    before a GPU is requested."""
    return RewardKnobs.from_kwargs(**kwargs).as_dict()
