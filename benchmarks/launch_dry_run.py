"""Wall time of the CPU dry run, per stage, as the user runs it: `DRY_RUN=1 bash launch/grpo_stage{k}.sh`.

    .venv/bin/python benchmarks/launch_dry_run.py [--model NAME] [--repeats N]

Prints one JSON line per run: {"bench": "launch_dry_run", "model", "stage", "wall_s", "rc"}. Stages 2 and 3
are planned on the checkpoint the previous stage will produce (DIG_ASSUME_PREVIOUS=1), in an empty curriculum.ckpt_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from dig_common.models import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DRY_RUN="1", DIG_ASSUME_PREVIOUS="1")
        overrides = [f"base_model={args.model}", f"curriculum.ckpt_dir={tmp}/ckpt", f"curriculum.data_dir={tmp}/data"]
        for _ in range(args.repeats):
            for stage in (1, 2, 3):
                start = time.perf_counter()
                result = subprocess.run(
                    ["bash", str(REPO / "launch" / f"grpo_stage{stage}.sh"), *overrides],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                wall = time.perf_counter() - start
                record = {
                    "bench": "launch_dry_run",
                    "model": args.model,
                    "stage": stage,
                    "wall_s": round(wall, 2),
                    "rc": result.returncode,
                    "cpus": os.cpu_count(),
                }
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
