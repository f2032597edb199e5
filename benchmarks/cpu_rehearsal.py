"""What the CPU rehearsal costs: wall time per stage and per training step, split as verl times a step, vLLM's
engine start, and the peak memory of the whole process tree (JSON lines).

    .venv/bin/python benchmarks/cpu_rehearsal.py [--model tiny_qwen3_vl_thinking] [--stages "1 2 3"] [--out-dir DIR]
    .venv/bin/python benchmarks/cpu_rehearsal.py --from DIR [--model ...] [--stages ...]   (an earlier run's
        per-step timings only: wall times, engine start and memory need a live run)

Runs ``bash launch/cpu_rehearsal.sh --no-eval`` (a fresh ``--out-dir``, default a temp folder, so data and the tiny
model are built too), reads its output line by line as it comes (each line timestamped here) and samples the
resident memory of every process in its process group (Ray's daemons and workers, vLLM's engine) every 0.5 s.
Lines:
  {"event": "phase", "phase": "data"|"tiny_model"|"curriculum", "seconds": ...}
  {"event": "stage", "stage": k, "wall_s", "engine_start_s", "steps", "step_s", "rollout_s", "old_log_prob_s",
   "ref_s", "update_s", "sync_s", "validation_s", "checkpoint_s"}   (per-step medians of verl's timing_s/*; the
   reward runs inside the rollout, in verl's reward loop, so it is part of rollout_s: benchmarks/reward.py
   measures it alone)
  {"event": "run", "wall_s", "peak_rss_gb", "peak_processes"}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

TIMINGS = {
    "step_s": "timing_s/step",
    "rollout_s": "timing_s/gen",
    "old_log_prob_s": "timing_s/old_log_prob",
    "ref_s": "timing_s/ref",
    "update_s": "timing_s/update_actor",
    "sync_s": "timing_s/update_weights",
    "validation_s": "timing_s/testing",
    "checkpoint_s": "timing_s/save_checkpoint",
}


def sample_memory(pgid: int, stop: threading.Event, peak: dict) -> None:
    import psutil

    while not stop.is_set():
        total, count = 0, 0
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == pgid:
                    total += proc.memory_info().rss
                    count += 1
            except (psutil.Error, ProcessLookupError):
                continue
        if total > peak["rss"]:
            peak.update(rss=total, processes=count)
        stop.wait(0.5)


def stage_record(out: Path, model: str, stage: int) -> dict:
    """Per-step medians of verl's own timings for one stage (its TensorBoard events)."""
    import rehearsal_support as rs

    metrics = rs.scalars(out, model, stage)
    record = {"event": "stage", "stage": stage, "steps": len(metrics.get("training/global_step", {}))}
    for key, tag in TIMINGS.items():
        values = list(metrics.get(tag, {}).values())
        record[key] = round(statistics.median(values), 3) if values else None
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_qwen3_vl_thinking")
    parser.add_argument("--stages", default="1 2 3")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--from", dest="from_dir", type=Path, default=None, help="read an earlier run's --out-dir")
    args = parser.parse_args()
    if args.from_dir:
        for stage in (int(s) for s in args.stages.split()):
            print(json.dumps(stage_record(args.from_dir, args.model, stage)))
        return 0
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="dig_rehearsal_bench_")) / "run"

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(STAGES=args.stages, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = ["bash", str(REPO / "launch" / "cpu_rehearsal.sh"), "--out-dir", str(out), "--no-eval"]
    start = time.monotonic()
    proc = subprocess.Popen(
        [*command, f"base_model={args.model}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    peak = {"rss": 0, "processes": 0}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, stop, peak), daemon=True)
    sampler.start()
    marks: dict[str, float] = {}
    stage_start: dict[int, float] = {}
    stage_end: dict[int, float] = {}
    server_seen: dict[int, float] = {}
    server_ready: dict[int, float] = {}
    current = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.monotonic() - start
        if "cpu_rehearsal: tiny model" in line:
            marks["data_done"] = now
        elif "cpu_rehearsal: curriculum" in line:
            marks.setdefault("data_done", now)
            marks["model_done"] = now
        elif m := re.match(r"\[dig\] curriculum: stage (\d)$", line.strip()):
            current = int(m.group(1))
            stage_start[current] = now
        elif m := re.search(r"\[dig\] stage (\d) finished", line):
            stage_end[int(m.group(1))] = now
        elif "vLLMHttpServer" in line and current and current not in server_seen:
            server_seen[current] = now
        elif "LLMServerManager:" in line and current and current not in server_ready:
            server_ready[current] = now
    rc = proc.wait()
    stop.set()
    sampler.join()
    total = time.monotonic() - start
    if rc != 0:
        print(json.dumps({"event": "error", "rc": rc, "out_dir": str(out)}))
        return 1

    print(json.dumps({"event": "phase", "phase": "data", "seconds": round(marks.get("data_done", 0), 1)}))
    tiny = marks.get("model_done", 0) - marks.get("data_done", 0)
    print(json.dumps({"event": "phase", "phase": "tiny_model", "seconds": round(tiny, 1)}))
    print(
        json.dumps({"event": "phase", "phase": "curriculum", "seconds": round(total - marks.get("model_done", 0), 1)})
    )
    for stage in sorted(stage_start):
        record = stage_record(out, args.model, stage)
        record["wall_s"] = round(stage_end.get(stage, total) - stage_start[stage], 1)
        record["engine_start_s"] = round(server_ready[stage] - server_seen[stage], 1) if stage in server_ready else None
        print(json.dumps(record))
    print(
        json.dumps(
            {
                "event": "run",
                "model": args.model,
                "stages": args.stages,
                "wall_s": round(total, 1),
                "peak_rss_gb": round(peak["rss"] / 2**30, 2),
                "peak_processes": peak["processes"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
