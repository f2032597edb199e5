"""Box geometry and coordinate frames: the one home for both (docs/contracts.md, coordinate frames).

Boxes are float arrays ``[x0, y0, x1, y1]`` with continuous edges (x1, y1 exclusive), so a box covering
pixel columns 10..19 is ``[10, 20]`` and its width is ``x1 - x0`` (no +1). Ground truth is stored in
pixels of the original rendered image; every model frame converts to and from it here. The reward,
data_prep and eval all import this module, so what the reward scores is what eval reports.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.optimize import linear_sum_assignment

COORD_MODES = ("rel1000", "abs_resized", "abs", "rel1")


def as_boxes(boxes) -> np.ndarray:
    """Any (N, 4)-shaped sequence (N may be 0) as a float64 array of shape (N, 4)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {arr.shape}")
    return arr


def box_area(boxes) -> np.ndarray:
    b = as_boxes(boxes)
    return np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0 (an empty union or hull)."""
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _pair_terms(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Intersection, union and enclosing-hull areas for every pair, each (N, M), plus the (N, M, 4) absolute
    corner differences. One fused pass with few numpy calls: the reward runs this once per response on a
    handful of boxes, where per-call overhead, not arithmetic, is the cost."""
    pa, gb = a[:, None, :], b[None, :, :]
    hi, lo = np.maximum(pa, gb), np.minimum(pa, gb)  # elementwise max / min of the corners
    inter = np.maximum(lo[..., 2:] - hi[..., :2], 0.0).prod(-1)
    hull = np.maximum(hi[..., 2:] - lo[..., :2], 0.0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union, hull, hi - lo


def pairwise_iou(a, b) -> np.ndarray:
    """IoU matrix (N, M). A pair whose union is empty has IoU 0."""
    inter, union, _, _ = _pair_terms(as_boxes(a), as_boxes(b))
    return _safe_divide(inter, union)


def match_boxes(pred, gt, width: float, height: float, *, w_l1: float, w_giou: float):
    """Hungarian matching on ``w_l1 * L1 - w_giou * GIoU`` (docs/contracts.md, reward step 5).

    Returns ``(pred_idx, gt_idx, iou)`` for the min(N, M) assigned pairs, IoU per pair.
    """
    pred, gt = as_boxes(pred), as_boxes(gt)
    if not len(pred) or not len(gt):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    cost, iou = cost_matrix(pred, gt, width, height, w_l1, w_giou)
    rows, cols = linear_sum_assignment(cost)
    return rows, cols, iou[rows, cols]


def cost_matrix(pred: np.ndarray, gt: np.ndarray, width: float, height: float, w_l1: float, w_giou: float):
    """(cost, IoU), each (N, M): ``w_l1 * L1 - w_giou * GIoU``, L1 over the four corners normalised by the image size."""
    inter, union, hull, corner_gap = _pair_terms(pred, gt)
    iou = _safe_divide(inter, union)
    giou = iou - _safe_divide(hull - union, hull)
    l1 = (corner_gap / np.array([width, height, width, height])).sum(-1)
    return w_l1 * l1 - w_giou * giou, iou


@lru_cache(maxsize=4096)
def resized_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W') the Qwen-VL processors resize an image to: ``qwen_vl_utils.smart_resize``, cached."""
    from qwen_vl_utils import smart_resize  # imports torch/torchvision: only when a model frame needs it

    return tuple(
        smart_resize(
            int(height), int(width), factor=int(factor), min_pixels=int(min_pixels), max_pixels=int(max_pixels)
        )
    )


def frame_scale(
    coord_mode: str,
    width: float,
    height: float,
    *,
    factor: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[float, float]:
    """(sx, sy) such that original pixel = model value * (sx, sy) for ``coord_mode`` (docs/contracts.md, coordinate frames).
    ``abs_resized`` needs the model's resize factor and pixel bounds; the other frames ignore them."""
    if coord_mode == "rel1000":
        return width / 1000.0, height / 1000.0
    if coord_mode == "rel1":
        return float(width), float(height)
    if coord_mode == "abs":
        return 1.0, 1.0
    if coord_mode == "abs_resized":
        if factor is None or min_pixels is None or max_pixels is None:
            raise ValueError("coord_mode abs_resized needs the model's factor, min_pixels and max_pixels")
        h_resized, w_resized = resized_size(int(height), int(width), factor, min_pixels, max_pixels)
        return width / w_resized, height / h_resized
    raise ValueError(f"unknown coord_mode {coord_mode!r}; expected one of {', '.join(COORD_MODES)}")


def to_pixels(boxes, coord_mode: str, width: float, height: float, *, clip: bool = False, **frame) -> np.ndarray:
    """Model-frame boxes -> original pixels, optionally clipped to [0, W] x [0, H].
    ``frame``: factor, min_pixels, max_pixels (abs_resized)."""
    sx, sy = frame_scale(coord_mode, width, height, **frame)
    out = as_boxes(boxes) * np.array([sx, sy, sx, sy])
    if clip:
        np.minimum(np.maximum(out, 0.0, out=out), np.array([width, height, width, height], dtype=np.float64), out=out)
    return out


def from_pixels(boxes, coord_mode: str, width: float, height: float, **frame) -> np.ndarray:
    """Original pixels -> model frame (prompts, tests, eval fixtures): the inverse of ``to_pixels``."""
    sx, sy = frame_scale(coord_mode, width, height, **frame)
    return as_boxes(boxes) / np.array([sx, sy, sx, sy])
