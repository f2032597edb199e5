"""Photo pair throughput on one core: pairs/s of ``data_prep.photo`` (JSON lines).

    python benchmarks/photo_pairs.py [--pairs 60] [--repeats 3] [--k 1-4] [--width 480 --height 320]
                                     [--coco ANN.json --images DIR] [--workdir /tmp/dig-photo-bench]

Without ``--coco``, a COCO-format set is drawn first (``data_prep.photo.synthetic``: 40 images at 640x480, COCO's
usual size, JPEG). Each repeat is a fresh run (new output folder) in a child process with one worker and BLAS
limited to one thread, so the figures are single-core: wall-clock pairs/s, CPU-seconds per accepted pair (rejected candidates
included) and what one free core makes (1 / CPU-s per pair; the wall clock only matches it on an idle machine).
One JSON line per repeat, then a summary line with medians and the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def child(args) -> None:
    from data_prep.photo.pairs import PhotoConfig, generate

    cfg = PhotoConfig(
        out=Path(args.out),
        num=args.pairs,
        coco=args.coco,
        images=args.images,
        k=args.k,
        seed=args.seed,
        width=args.width,
        height=args.height,
        progress=False,
    )
    cpu0, wall0 = time.process_time(), time.perf_counter()
    stats = generate(cfg)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(
        json.dumps(
            {
                "pairs": stats["accepted"],
                "k": args.k,
                "size": f"{args.width}x{args.height}",
                "wall_s": round(wall, 2),
                "pairs_per_s": round(stats["accepted"] / wall, 2),
                "cpu_s_per_pair": round(cpu / stats["accepted"], 4),
                "acceptance_rate": stats["acceptance_rate"],
                "rejected": stats["rejected"],
                "differences_by_type": stats["differences_by_type"],
            }
        )
    )


def proc_status_mb(key: str) -> float:
    """VmHWM (peak RSS) or VmRSS of this process (ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def index_child(path: Path, images: Path, mode: str) -> None:
    """``parse``: load the JSON as a local run does (and write the Ray index cache); ``cache``: load that cache as a
    Ray worker does."""
    from data_prep.photo.pairs import INDEX_CACHE, PhotoConfig, _load, write_index_cache

    cfg = PhotoConfig(out=path.parent / "index-cache", num=1, coco=path, images=images)
    before = proc_status_mb("VmHWM")
    t0 = time.perf_counter()
    coco, _ = _load(cfg, cfg.out / INDEX_CACHE if mode == "cache" else None)
    seconds = time.perf_counter() - t0
    peak, rss = proc_status_mb("VmHWM"), proc_status_mb("VmRSS")
    if mode == "parse":
        write_index_cache(cfg)
    print(
        json.dumps(
            {
                "index": mode,
                "annotation_mb": round(path.stat().st_size / 2**20, 1),
                "load_s": round(seconds, 2),
                "usable_instances": len(coco.instances),
                "peak_rss_mb": round(peak, 1),
                "rss_after_load_mb": round(rss, 1),
                "rss_before_mb": round(before, 1),
            }
        )
    )


def write_large_index(drawn: Path, num_annotations: int, out: Path) -> Path:
    """A COCO-train-like annotation file: the drawn photos listed many times, one 40-point polygon per
    annotation and 7 annotations per image (COCO 2017 train: 860k annotations on 118k images)."""
    import random

    base = json.loads((drawn / "annotations.json").read_text())
    rng = random.Random(0)
    photos = base["images"]
    images, annotations = [], []
    for i in range(num_annotations // 7):
        src = photos[i % len(photos)]
        images.append({**src, "id": i + 1})
    for j in range(num_annotations):
        image = images[j % len(images)]
        cx, cy, r = rng.uniform(150, 490), rng.uniform(150, 330), rng.uniform(40, 120)
        poly = []
        for t in range(40):
            a = 2 * 3.14159 * t / 40
            poly += [
                round(cx + r * rng.uniform(0.7, 1.0) * math.cos(a), 2),
                round(cy + r * rng.uniform(0.7, 1.0) * math.sin(a), 2),
            ]
        annotations.append(
            {
                "id": j + 1,
                "image_id": image["id"],
                "category_id": 1 + j % 5,
                "iscrowd": 0,
                "bbox": [cx - r, cy - r, 2 * r, 2 * r],
                "area": 2.5 * r * r,
                "segmentation": [poly],
            }
        )
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": base["categories"]}))
    return out


def run_child(flags: dict) -> dict:
    """This script in a fresh single-threaded process (its peak RSS is its own); its last line is JSON."""
    cmd = [sys.executable, __file__, *(part for flag, value in flags.items() for part in (flag, str(value)))]
    done = subprocess.run(cmd, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", default="1-4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--coco", type=Path, default=None, help="a COCO-format annotation file (default: a drawn set)")
    p.add_argument("--images", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dig-photo-bench"))
    p.add_argument(
        "--index-annotations",
        type=int,
        default=0,
        help="also time loading a COCO-train-like file of this many annotations (COCO 2017 train: 860k)",
    )
    p.add_argument("--child-out", dest="out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-index", default=None, help=argparse.SUPPRESS)
    p.add_argument("--index-mode", default="parse", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.out:
        child(args)
        return 0
    if args.child_index:
        index_child(Path(args.child_index), args.images, args.index_mode)
        return 0
    if args.coco is None:
        from data_prep.photo.synthetic import write_coco_set

        drawn = args.workdir / "coco"
        if not (drawn / "annotations.json").exists():
            write_coco_set(drawn, num_images=40, seed=3, width=640, height=480)
        args.coco, args.images = drawn / "annotations.json", drawn / "images"
    if args.index_annotations:
        big = write_large_index(args.coco.parent, args.index_annotations, args.workdir / "large.json")
        for mode in ("parse", "cache"):
            index = run_child({"--child-index": big, "--images": args.images, "--index-mode": mode})
            print(json.dumps({**index, "annotations": args.index_annotations}))
        big.unlink()
        shutil.rmtree(args.workdir / "index-cache", ignore_errors=True)
    results = []
    for repeat in range(args.repeats):
        out = args.workdir / f"run-{repeat}"
        shutil.rmtree(out, ignore_errors=True)
        flags = {"--child-out": out, "--pairs": args.pairs, "--k": args.k, "--seed": args.seed + repeat}
        flags |= {"--width": args.width, "--height": args.height, "--coco": args.coco, "--images": args.images}
        result = run_child(flags)
        print(json.dumps({"repeat": repeat, **result}), flush=True)
        results.append(result)
    if not results:
        return 0
    print(
        json.dumps(
            {
                "summary": True,
                "repeats": len(results),
                "pairs_per_run": args.pairs,
                "k": args.k,
                "size": f"{args.width}x{args.height}",
                "coco": str(args.coco),
                "median_wall_pairs_per_s": statistics.median(r["pairs_per_s"] for r in results),
                "median_cpu_s_per_pair": statistics.median(r["cpu_s_per_pair"] for r in results),
                "pairs_per_s_one_free_core": round(1 / statistics.median(r["cpu_s_per_pair"] for r in results), 1),
                "median_acceptance_rate": statistics.median(r["acceptance_rate"] for r in results),
                "load_average": os.getloadavg()[0],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
