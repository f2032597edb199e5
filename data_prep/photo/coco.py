"""A COCO-format instance-segmentation set as a pair source: loading, checks, eligible instances, masks, images.

Reads the annotation file once (COCO 2017 train: ~450 MB, ~20 s), keeps only what the photo pairs can use and
fails with an error naming the file, the annotation and the key on anything malformed, before any pair is made.
Masks are decoded with pycocotools (polygons, compressed and uncompressed RLE) when an instance is first used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class PhotoDataError(ValueError):
    """The annotation file, the image folder or the category filter is unusable; the message names which."""


@dataclass(frozen=True)
class Instance:
    ann_id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in source pixels (COCO)
    area: float
    segmentation: Any = field(compare=False, repr=False)  # polygons as float arrays (4x smaller than JSON lists)


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    file_name: str
    width: int
    height: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_segmentation(seg, image: ImageInfo, where: str) -> None:
    if isinstance(seg, list):
        if not seg:
            raise PhotoDataError(f"{where}: 'segmentation' is an empty polygon list")
        for j, poly in enumerate(seg):
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(map(_is_number, poly))):
                raise PhotoDataError(
                    f"{where}: segmentation[{j}] is not a polygon [x0, y0, x1, y1, ...] of >= 3 points"
                )
        return
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if size != [image.height, image.width]:
            raise PhotoDataError(
                f"{where}: RLE 'size' {size!r} does not match image {image.image_id} ({image.height} x {image.width})"
            )
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(isinstance(c, int) for c in counts))):
            raise PhotoDataError(f"{where}: RLE 'counts' must be a string (compressed) or a list of integers")
        if isinstance(counts, list) and sum(counts) != image.height * image.width:
            raise PhotoDataError(f"{where}: RLE 'counts' sum to {sum(counts)}, not height x width")
        return
    raise PhotoDataError(f"{where}: 'segmentation' must be a polygon list or an RLE mapping, got {type(seg).__name__}")


class CocoSet:
    """Eligible instances of one COCO-format file, with its images; built by ``load_coco``."""

    def __init__(self, path, images_dir, images, categories, instances, natives, skipped, sha):
        self.path: Path = path
        self.images_dir: Path = images_dir
        self.images: dict[int, ImageInfo] = images
        self.categories: dict[int, str] = categories
        self.instances: list[Instance] = instances  # pasteable (after the category filter)
        self.natives: dict[int, list[Instance]] = natives  # eligible instances per image (colour edits on the photo)
        self.skipped: dict[str, int] = skipped  # why annotations were left out
        self.sha256 = sha
        self.backgrounds: list[int] = sorted(images)
        self.by_category: dict[int, list[int]] = {}
        for i, inst in enumerate(instances):
            self.by_category.setdefault(inst.category_id, []).append(i)

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / self.images[image_id].file_name

    @functools.lru_cache(maxsize=48)  # noqa: B019 - one set per process, a few dozen photos in flight
    def image(self, image_id: int) -> np.ndarray:
        info, path = self.images[image_id], self.image_path(image_id)
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise PhotoDataError(f"image {image_id} ({path}): cannot be read: {err}") from err
        if rgb.shape[:2] != (info.height, info.width):
            raise PhotoDataError(
                f"image {image_id} ({path}) is {rgb.shape[1]} x {rgb.shape[0]}, "
                f"{self.path} says {info.width} x {info.height}"
            )
        return rgb

    @functools.lru_cache(maxsize=256)  # noqa: B019
    def mask(self, inst: Instance) -> np.ndarray:
        """Boolean mask (source height x width) of one instance."""
        from pycocotools import mask as mask_utils

        info = self.images[inst.image_id]
        h, w, seg = info.height, info.width, inst.segmentation
        try:
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = {"size": seg["size"], "counts": seg["counts"].encode()}
            with warnings.catch_warnings():  # pycocotools 2.0.x + numpy 2: a DeprecationWarning per call
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = mask_utils.decode(rle).astype(bool)
        except Exception as err:  # pycocotools raises several types on malformed RLE strings
            raise PhotoDataError(
                f"{self.path}: annotation {inst.ann_id}: segmentation cannot be decoded: {err}"
            ) from err
        if not mask.any():
            raise PhotoDataError(f"{self.path}: annotation {inst.ann_id}: segmentation decodes to an empty mask")
        return mask


def load_coco(path: Path | str, images_dir: Path | str, settings: dict, categories: list[str] | None = None) -> CocoSet:
    """Read and check ``path``; keep non-crowd, large enough, untruncated instances (of ``categories``)."""
    path, images_dir = Path(path), Path(images_dir)
    if not path.is_file():
        raise PhotoDataError(f"--coco: annotation file {path} not found")
    if not images_dir.is_dir():
        raise PhotoDataError(f"--images: {images_dir} is not a directory")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PhotoDataError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise PhotoDataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise PhotoDataError(f"{path}: '{key}' must be a list (COCO instance-segmentation format)")

    cats: dict[int, str] = {}
    for i, cat in enumerate(raw["categories"]):
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int) and isinstance(cat.get("name"), str)):
            raise PhotoDataError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name'")
        cats[cat["id"]] = cat["name"]
    wanted = set(cats)
    if categories:
        by_name = {name: cid for cid, name in cats.items()}
        unknown = [c for c in categories if c not in by_name and not (c.isdigit() and int(c) in cats)]
        if unknown:
            raise PhotoDataError(
                f"--categories: {', '.join(unknown)} not in {path} (it has {len(cats)}: "
                f"{', '.join(sorted(by_name)[:12])}{', ...' if len(cats) > 12 else ''})"
            )
        wanted = {by_name[c] if c in by_name else int(c) for c in categories}

    images: dict[int, ImageInfo] = {}
    for i, im in enumerate(raw["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict):
            raise PhotoDataError(f"{where}: expected an object")
        if "file_name" not in im and isinstance(im.get("coco_url"), str):  # LVIS v1 names images by URL only
            im = {**im, "file_name": im["coco_url"].rsplit("/", 1)[-1]}
        for key, kind in (("id", int), ("file_name", str), ("width", int), ("height", int)):
            if not isinstance(im.get(key), kind):
                raise PhotoDataError(f"{where}: '{key}' missing or not {kind.__name__}")
        images[im["id"]] = ImageInfo(im["id"], im["file_name"], im["width"], im["height"])
    if not images:
        raise PhotoDataError(f"{path}: no images")
    listed = set(os.listdir(images_dir))
    missing = [im for im in images.values() if not (im.file_name in listed or (images_dir / im.file_name).is_file())]
    if missing:
        names = ", ".join(str(images_dir / im.file_name) for im in missing[:3])
        raise PhotoDataError(
            f"--images: {len(missing)} of {len(images)} images listed in {path} are missing: {names}"
            f"{' ...' if len(missing) > 3 else ''}"
        )

    inst_cfg = settings["instances"]
    skipped = {"crowd": 0, "tiny": 0, "too_large": 0, "truncated": 0, "thin": 0, "category": 0}
    instances: list[Instance] = []
    natives: dict[int, list[Instance]] = {}
    for i, ann in enumerate(raw["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise PhotoDataError(f"{where}: expected an object")
        where = f"{where} (id {ann.get('id')!r})"
        for key in ("id", "image_id", "category_id", "bbox", "segmentation"):
            if key not in ann:
                raise PhotoDataError(f"{where}: missing '{key}'")
        if ann["image_id"] not in images:
            raise PhotoDataError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in cats:
            raise PhotoDataError(f"{where}: category_id {ann['category_id']!r} is not in 'categories'")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)) and bbox[2] > 0 < bbox[3]):
            raise PhotoDataError(f"{where}: 'bbox' must be [x, y, w, h] with w, h > 0, got {bbox!r}")
        image = images[ann["image_id"]]
        _check_segmentation(ann["segmentation"], image, where)
        if ann["category_id"] not in wanted:
            skipped["category"] += 1
            continue
        if ann.get("iscrowd", 0):
            skipped["crowd"] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        area = float(ann.get("area", w * h))
        if area < inst_cfg["min_area_px"]:
            skipped["tiny"] += 1
            continue
        if area > inst_cfg["max_area_fraction"] * image.width * image.height:
            skipped["too_large"] += 1
            continue
        b = inst_cfg["border_px"]
        if x <= b or y <= b or x + w >= image.width - b or y + h >= image.height - b:
            skipped["truncated"] += 1
            continue
        if area < inst_cfg["min_fill"] * w * h:
            skipped["thin"] += 1
            continue
        inst = Instance(
            ann["id"], ann["image_id"], ann["category_id"], (x, y, w, h), area, _compact(ann["segmentation"])
        )
        instances.append(inst)
        natives.setdefault(inst.image_id, []).append(inst)
    if not instances:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n) or "no annotations"
        flt = f" with --categories {','.join(categories)}" if categories else ""
        raise PhotoDataError(
            f"{path}{flt}: no usable instance ({len(raw['annotations'])} annotations; left out: {why})"
        )
    return CocoSet(path, images_dir, images, cats, instances, natives, skipped, file_sha256(path))


def _compact(seg):
    """Polygons as float64 arrays (pycocotools takes them as they are); RLE as it is."""
    if isinstance(seg, list):
        return [np.asarray(poly, dtype=np.float64) for poly in seg]
    return seg
