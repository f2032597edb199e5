"""Seconds per GRPO update and peak RSS of the CPU train step (tests/test_train_step.py's chain) per tiny model.

    .venv/bin/python benchmarks/train_step.py [--families qwen2_5_vl qwen3_vl] [--updates 3] [--repeats 1]

Each run is a fresh process, so its peak RSS is its own: rows -> RLHFDataset -> HF generate -> reward -> GRPO
advantages -> verl's reference worker and actor worker (FSDP2, one gloo rank) -> ``--updates`` steps (old
log-probs + update_actor). Prints one JSON line per run, then one summary line per family with medians: wall
clock, and CPU seconds of the process (steadier on a shared machine). Figures are for the tiny random models of
tests/tiny_qwen.py on CPU: they size the CI test, not a GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(family: str, updates: int, workdir: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import train_step_support as support

    started = time.perf_counter()
    front = support.front_half(family, workdir)
    front_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = support.train_steps(front, num_updates=updates)
    print(
        json.dumps(
            {
                "family": family,
                "model_file": support.MODELS[family],
                "rows": len(front.samples),
                "updates": updates,
                "front_s": round(front_seconds, 2),
                "workers_and_steps_s": round(time.perf_counter() - started, 2),
                "seconds_per_update": [round(s, 2) for s in result.seconds_per_update],
                "median_s_per_update": round(statistics.median(result.seconds_per_update), 2),
                "cpu_s_per_update": [round(s, 2) for s in result.cpu_seconds_per_update],
                "peak_rss_mb": round(rss_mb(), 1),
            }
        ),
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", metavar="FAMILY", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.updates, args.workdir)
        return 0
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for family in args.families:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix=f"dig-train-step-{family}-") as workdir:
                command = [sys.executable, __file__, "--child", family, "--updates", str(args.updates)]
                command += ["--workdir", workdir]
                proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(run), flush=True)
            runs.append(run)
        per_update = [s for run in runs for s in run["seconds_per_update"]]
        cpu_per_update = [s for run in runs for s in run["cpu_s_per_update"]]
        summary = {
            "summary": family,
            "runs": len(runs),
            "median_s_per_update": round(statistics.median(per_update), 2),
            "median_cpu_s_per_update": round(statistics.median(cpu_per_update), 2),
            "median_peak_rss_mb": round(statistics.median(run["peak_rss_mb"] for run in runs), 1),
            "median_total_s": round(statistics.median(run["front_s"] + run["workers_and_steps_s"] for run in runs), 1),
        }
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
