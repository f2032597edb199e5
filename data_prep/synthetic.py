"""Synthetic generator-style output (docs/contracts.md, pair record) without Blender, for tests and benchmarks of the conversion.

The layout and records match what ``data_prep.render`` writes (shard folders with ``<id>_a.png``, ``<id>_b.png``,
``<id>.json``; ``manifest.jsonl``; ``stats.json``). Images are a soft gradient with coloured rectangles and a
little noise (so PNG sizes are in the range of real renders); B repaints one rectangle per difference, so A and B
differ exactly inside the boxes. Not a training data source.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.manifest import append_entry, manifest_entry, read_manifest
from data_prep.runner import parse_k

RENDERER = {"name": "synthetic", "version": "1", "samples": 0}


def _background(rng: np.random.Generator, width: int, height: int, noise: int) -> np.ndarray:
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top, bottom, side = (rng.uniform(40, 215, size=3).astype(np.float32) for _ in range(3))
    image = top * (1 - ys) + bottom * ys + (side - 128) * 0.3 * xs
    if noise:
        image = image + rng.normal(0.0, noise, size=(height, width, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _box(rng: np.random.Generator, width: int, height: int) -> list[int]:
    w = int(rng.integers(max(2, width // 10), max(3, width // 4)))
    h = int(rng.integers(max(2, height // 10), max(3, height // 4)))
    x0 = int(rng.integers(0, width - w))
    y0 = int(rng.integers(0, height - h))
    return [x0, y0, x0 + w, y0 + h]


def write_pair(folder: Path, pair_id: str, seed: int, k: int, width: int, height: int, noise: int = 3) -> dict:
    """Write one pair's two PNGs and record; returns the record."""
    rng = np.random.default_rng(seed)
    image_a = _background(rng, width, height, noise)
    for _ in range(3):  # unchanged distractor objects
        x0, y0, x1, y1 = _box(rng, width, height)
        image_a[y0:y1, x0:x1] = rng.integers(0, 256, size=3, dtype=np.uint8)
    image_b = image_a.copy()
    differences = []
    for object_id in range(k):
        box = _box(rng, width, height)
        x0, y0, x1, y1 = box
        colour_a, colour_b = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
        colour_b[0] = (int(colour_a[0]) + 128) % 256  # guaranteed different
        image_a[y0:y1, x0:x1] = colour_a
        image_b[y0:y1, x0:x1] = colour_b
        area = (x1 - x0) * (y1 - y0)
        differences.append(
            {
                "type": "color",
                "object_id": object_id,
                "box": box,
                "visible_px_a": area,
                "visible_px_b": area,
                "changed_px": area,
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_a).save(folder / f"{pair_id}_a.png", compress_level=1)
    Image.fromarray(image_b).save(folder / f"{pair_id}_b.png", compress_level=1)
    record = {
        "pair_id": pair_id,
        "seed": seed,
        "width": width,
        "height": height,
        "renderer": RENDERER,
        "scene": {"objects": []},
        "edits": [{"type": d["type"], "object_id": d["object_id"]} for d in differences],
        "differences": differences,
        "num_differences": len(differences),
    }
    (folder / f"{pair_id}.json").write_text(json.dumps(record))
    return record


def write_pairs(
    out: Path,
    num: int,
    k: int | Callable[[int], int] = 1,
    seed: int = 0,
    width: int = 64,
    height: int = 64,
    shard_size: int = 1000,
    noise: int = 3,
) -> Path:
    """A generator-style output directory of ``num`` pairs; ``k`` is a count or a function of the pair index.

    Resumes like the generator: indices already in the manifest are skipped. Pair ``index`` has seed
    ``seed + index``, so runs with overlapping seed ranges share pair seeds (tests of the disjointness check).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out, required=False)
    done = {e.index for e in manifest.entries if manifest.complete(e)}  # as the generators: all files, or made again
    for index in range(num):
        if index in done:
            continue
        pair_id = f"s{seed}-{index:07d}"
        shard = f"shard_{index // shard_size:03d}"
        count = k(index) if callable(k) else k
        record = write_pair(out / shard, pair_id, seed + index, count, width, height, noise)
        append_entry(out, manifest_entry(out / shard, pair_id, index, record["differences"]))
    accepted = len(done) + sum(1 for i in range(num) if i not in done)
    (out / "stats.json").write_text(json.dumps({"accepted": accepted, "rejected": {}}))
    return out


def generate(cfg) -> dict:
    """Stand-in for ``data_prep.render.generate.generate`` (same config object, same layout, resumes) without Blender.

    K of pair ``index`` cycles through the run's K range (0 for a ``no_diff_fraction`` share), deterministically.
    """
    low, high = parse_k(cfg.k)
    period = round(1 / cfg.no_diff_fraction) if cfg.no_diff_fraction > 0 else 0

    def k_of(index: int) -> int:
        if period and index % period == period - 1:
            return 0
        return low + index % (high - low + 1)

    write_pairs(Path(cfg.out), cfg.num, k_of, cfg.seed, cfg.width, cfg.height)
    return {"accepted": cfg.num, "rejected": {}}
