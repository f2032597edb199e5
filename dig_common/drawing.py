"""Box outlines on images, in the pair-record convention (x1/y1 exclusive)."""

from __future__ import annotations

from PIL import ImageDraw

from dig_common.fileio import atomic_output


def draw_box(
    draw: ImageDraw.ImageDraw, box, color, width: int = 2, scale: float = 1.0, dashed: bool = False, dash: int = 6
) -> tuple[int, int, int, int]:
    """Outline ``box`` = [x0, y0, x1, y1] in pixels with x1/y1 exclusive (the pair-record convention), drawn at
    ``scale``: the outline covers columns x0..x1-1 and rows y0..y1-1, and a thicker line grows inward.
    The one box-drawing function of the repo (data_prep.gallery, data_prep.audit and eval.visualize). Returns the inclusive
    corners drawn."""
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)
    if not dashed:
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        return x0, y0, x1, y1
    for k in range(width):  # inward, as rectangle() does
        left, top, right, bottom = x0 + k, y0 + k, x1 - k, y1 - k
        if left > right or top > bottom:
            break
        for a, b, fixed, horizontal in (
            (left, right, top, True),
            (left, right, bottom, True),
            (top, bottom, left, False),
            (top, bottom, right, False),
        ):
            for pos in range(a, b + 1, 2 * dash):
                end = min(pos + dash - 1, b)
                draw.line((pos, fixed, end, fixed) if horizontal else (fixed, pos, fixed, end), fill=color)
    return x0, y0, x1, y1


def save_png(image, path) -> None:
    """Write a PIL image as PNG atomically (the temp name has no .png suffix, so the format is named)."""
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
