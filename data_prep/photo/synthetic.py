"""A small COCO-format instance-segmentation set drawn from scratch, for tests, benchmarks and the docs gallery.

    python -m data_prep.photo.synthetic --out-dir DIR --num-images 24 [--seed 0]   # DIR/annotations.json, DIR/images/

Each image is a generated texture (smooth random waves, a gradient, noise, saved as JPEG like a photo) with a few
textured, saturated shapes. Annotations use all three COCO segmentation encodings: polygons (triangles, stars,
quads), compressed RLE (discs) and uncompressed RLE (rings). Every image also carries annotations the photo source
must never use: a crowd region, a tiny shape and a shape cut by the image border. Not a training data source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dig_common.cli import CliError, cli_main, tool_parser

PROG = "python -m data_prep.photo.synthetic"
MIN_SIZE = 64  # the drawn shapes (radius up to 0.22 of the short side, a 34 px border disc) need room
CATEGORIES = ["disc", "triangle", "star", "block", "ring"]


def texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), dtype=np.float32) + rng.uniform(60, 190, size=3)
    for _ in range(4):
        fx, fy = rng.uniform(0.005, 0.06, size=2)
        phase, amp = rng.uniform(0, 2 * math.pi), rng.uniform(10, 35, size=3)
        img += np.sin(xs * fx * 2 * math.pi + ys * fy * 2 * math.pi + phase)[..., None] * amp
    img += (ys / height)[..., None] * rng.uniform(-40, 40, size=3)
    img += rng.normal(0, 1.5, size=img.shape)
    return np.clip(img, 0, 255)


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        n, radii = 3, [r]
    elif kind == "star":
        n, radii = 10, [r, r * 0.45]
    else:  # block: a rotated quad
        n, radii = 4, [r]
    return [
        (
            cx + radii[i % len(radii)] * math.cos(rot + 2 * math.pi * i / n),
            cy + radii[i % len(radii)] * math.sin(rot + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def shape_mask(kind: str, width: int, height: int, cx, cy, r, rot) -> tuple[np.ndarray, list | None]:
    """(bool mask, polygon or None) of one drawn shape."""
    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    poly = None
    if kind == "disc":
        draw.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=255)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=0)
    else:
        poly = _polygon(kind, cx, cy, r, rot)
        draw.polygon(poly, fill=255)
    return np.asarray(im) > 127, poly


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major flattening, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": [int(v) for v in runs]}


def _paint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    hue = rng.uniform(0, 1)
    base = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (hue + o)) for o in (0, 1 / 3, 2 / 3)]) * 200 + 30
    ys, xs = np.nonzero(mask)
    stripes = np.sin(xs * rng.uniform(0.1, 0.4) + ys * rng.uniform(0.1, 0.4))[:, None] * 18
    img[ys, xs] = np.clip(base[None, :] + stripes + rng.normal(0, 2, size=(len(xs), 3)), 0, 255)


def write_coco_set(out: Path, num_images: int = 24, seed: int = 0, width: int = 200, height: int = 150) -> Path:
    """Write ``out/images/*.jpg`` and ``out/annotations.json``; returns the annotation file."""
    from pycocotools import mask as mask_utils

    check_args(out, num_images, seed, width, height)
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    cat_id = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    ann_id = 1

    def add(image_id, kind, mask, poly, crowd=False, encoding=None):
        nonlocal ann_id
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        if encoding == "polygon" and poly is not None:
            seg = [[round(v, 2) for p in poly for v in p]]
        elif encoding == "uncompressed":
            seg = _uncompressed_rle(mask)
        else:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            seg = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat_id[kind],
                "bbox": bbox,
                "area": float(mask.sum()),
                "segmentation": seg,
                "iscrowd": int(crowd),
            }
        )
        ann_id += 1

    for image_id in range(1, num_images + 1):
        img = texture(rng, width, height)
        taken = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(2, 5))):
            kind = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            r = rng.uniform(0.12, 0.22) * min(width, height)
            cx, cy = rng.uniform(r + 4, width - r - 4), rng.uniform(r + 4, height - r - 4)
            full, poly = shape_mask(kind, width, height, cx, cy, r, rng.uniform(0, math.pi))
            mask = full & ~taken  # drawn later = behind: COCO masks are the visible part
            if mask.sum() < 0.5 * math.pi * r * r * 0.3:
                continue
            _paint(img, mask, rng)
            taken |= mask
            encoding = {"disc": "compressed", "ring": "uncompressed"}.get(kind, "polygon")
            if encoding == "polygon" and mask.sum() < full.sum():
                encoding = "compressed"  # partly covered: the polygon would claim hidden pixels
            add(image_id, kind, mask, poly, encoding=encoding)
        # annotations that must never be used: a crowd region, a tiny shape and one cut by the left border
        crowd, _ = shape_mask("block", width, height, width * 0.8, height * 0.2, 10, 0.3)
        if (crowd & ~taken).any():
            add(image_id, "block", crowd & ~taken, None, crowd=True)
        tiny, _ = shape_mask("disc", width, height, width * 0.15, height * 0.85, 4, 0)
        if (tiny & ~taken).any():
            add(image_id, "disc", tiny & ~taken, None)
        cut, _ = shape_mask("disc", width, height, 8, height * 0.5, 34, 0)
        if (cut & ~taken).any():
            _paint(img, cut & ~taken, rng)
            add(image_id, "disc", cut & ~taken, None)
        name = f"{image_id:06d}.jpg"
        Image.fromarray(img.astype(np.uint8)).save(out / "images" / name, quality=92)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id[n], "name": n, "supercategory": "shape"} for n in CATEGORIES],
    }
    path = out / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def check_args(out: Path, num_images: int, seed: int, width: int, height: int) -> None:
    """A CliError naming the bad flag, before anything is drawn or written."""
    if num_images < 1:
        raise CliError(f"--num-images: expected an integer >= 1, got {num_images}")
    if seed < 0:
        raise CliError(f"--seed: expected an integer >= 0, got {seed}")
    for name, v in (("width", width), ("height", height)):
        if not MIN_SIZE <= v <= 8192:
            raise CliError(f"--{name}: expected an integer in [{MIN_SIZE}, 8192], got {v}")
    if Path(out).exists() and not Path(out).is_dir():
        raise CliError(f"--out-dir: {out} is a file; give a folder")


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    p = tool_parser(PROG, __doc__)
    p.add_argument("--out-dir", type=Path, required=True, help="folder to fill: annotations.json and images/")
    p.add_argument("--num-images", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=200)
    p.add_argument("--height", type=int, default=150)
    args = p.parse_args(argv)
    print(write_coco_set(args.out_dir, args.num_images, args.seed, args.width, args.height))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
