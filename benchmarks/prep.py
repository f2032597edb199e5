"""Conversion speed and memory: pairs/s and peak RSS of ``data_prep.to_verl`` for 200 vs 2,000 pairs.

    python benchmarks/prep.py [--sizes 200 2000] [--workdir /tmp/dig-prep-bench] [--width 480 --height 320]

Pairs are synthetic (``data_prep.synthetic``: generator layout, 480x320 PNGs with light noise, ~220 KB each, in
the range of real renders), made once per size and reused. Each conversion runs in a fresh process so its peak
RSS is its own. Prints one JSON line per size, then a summary line; memory must not grow with the pair count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from data_prep.to_verl import DEFAULT_ROW_GROUP
from dig_common.models import DEFAULT_MODEL


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(pairs: Path, out: Path, row_group_size: int) -> None:
    from data_prep import to_verl

    baseline = rss_mb()  # interpreter + pyarrow + PIL imported
    started = time.perf_counter()
    result = to_verl.convert(pairs, out, DEFAULT_MODEL, stage=3, split="train", row_group_size=row_group_size)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "rows": result["num_rows"],
                "seconds": round(seconds, 3),
                "pairs_per_s": round(result["num_rows"] / seconds, 1),
                "peak_rss_mb": round(rss_mb(), 1),
                "rss_before_convert_mb": round(baseline, 1),
                "parquet_mb": round(out.stat().st_size / 2**20, 1),
            }
        )
    )


def ensure_pairs(workdir: Path, num: int, width: int, height: int) -> Path:
    from data_prep.synthetic import write_pairs

    pairs = workdir / f"pairs_{num}_{width}x{height}"
    write_pairs(pairs, num, k=lambda i: i % 4 + 1, seed=0, width=width, height=height, noise=2)  # resumes
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dig-prep-bench"))
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP)
    parser.add_argument("--repeats", type=int, default=2, help="conversions per size; the best is reported")
    parser.add_argument("--child", nargs=2, metavar=("PAIRS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.row_group_size)
        return 0

    results = []
    for num in args.sizes:
        made = time.perf_counter()
        pairs = ensure_pairs(args.workdir, num, args.width, args.height)
        png_kb = sum(p.stat().st_size for p in list(pairs.glob("shard_*/*.png"))[:20]) / 20 / 1024
        runs = []
        for _ in range(args.repeats):
            out = args.workdir / f"out_{num}.parquet"
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(pairs),
                    str(out),
                    "--row-group-size",
                    str(args.row_group_size),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            out.unlink()
        best = max(runs, key=lambda r: r["pairs_per_s"])
        result = {
            "bench": "prep.to_verl",
            "pairs": num,
            "image": f"{args.width}x{args.height}",
            "png_kb_mean": round(png_kb, 1),
            "row_group_size": args.row_group_size,
            **best,
            "peak_rss_mb_all_runs": max(r["peak_rss_mb"] for r in runs),
            "pairs_per_s_all_runs": [r["pairs_per_s"] for r in runs],
            "setup_s": round(time.perf_counter() - made, 1),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    if len(results) >= 2:
        small, large = results[0], results[-1]
        print(
            json.dumps(
                {
                    "bench": "prep.summary",
                    "pairs": [small["pairs"], large["pairs"]],
                    "peak_rss_mb": [small["peak_rss_mb_all_runs"], large["peak_rss_mb_all_runs"]],
                    "rss_growth_mb": round(large["peak_rss_mb_all_runs"] - small["peak_rss_mb_all_runs"], 1),
                    "pairs_per_s": [small["pairs_per_s"], large["pairs_per_s"]],
                    "goal_pairs_per_s": 200,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
