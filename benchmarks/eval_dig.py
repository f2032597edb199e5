"""Scoring throughput of ``python -m eval.dig`` on a synthetic test parquet. Prints one JSON object per line.

    .venv/bin/python benchmarks/eval_dig.py [--pairs 1200] [--repeats 3]

Figures: wall seconds and pairs/second for the whole CLI (parquet read, scoring with details through the
reward's code, aggregation, writing results/markdown/samples) on the paper-sized test set (1,200 pairs,
K = 1..4, realistic answers: thinking text, fenced JSON with labels, one box jittered, some misses), and the
peak RSS. Medians over --repeats runs (the machine is shared and noisy). Generation time is not included:
it is the backend's (vLLM / HF) and depends on the GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dig_common.models import DEFAULT_MODEL, load_model_spec  # noqa: E402
from eval import dig  # noqa: E402
from reward_fns import geometry  # noqa: E402

TYPES = ("color", "material", "size", "shape", "addition", "removal", "move")


def build(tmp: Path, pairs: int, spec) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rows, answers = [], []
    width, height = 480, 320
    for i in range(pairs):
        k = 1 + i % 4
        x0 = rng.uniform(0, 400, k)
        y0 = rng.uniform(0, 250, k)
        boxes = np.stack([x0, y0, x0 + rng.uniform(20, 80, k), y0 + rng.uniform(20, 70, k)], 1).round(1)
        types = [str(t) for t in rng.choice(TYPES, k)]
        gt = json.dumps({"boxes": boxes.tolist(), "width": width, "height": height, "types": types})
        extra = {"split": "test", "index": i, "pair_id": f"p{i:05d}", "stage": "test", "num_differences": k}
        extra.update(types=types, width=width, height=height)
        rows.append({"data_source": "dig", "reward_model": {"style": "rule", "ground_truth": gt}, "extra_info": extra})
        n_pred = max(1, k - int(rng.integers(0, 2)))  # sometimes one difference is missed
        pred = boxes[:n_pred] + rng.normal(0, 3, (n_pred, 4))
        frame = dict(factor=spec.resize_factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
        clipped = np.clip(pred, 0, [width, height, width, height])
        model = geometry.from_pixels(clipped, spec.coord_mode, width, height, **frame).round().astype(int)
        body = json.dumps([{"bbox_2d": b, "label": t} for b, t in zip(model.tolist(), types, strict=False)])
        thought = "<think>" + "compare A and B. " * 40 + "</think>\n"
        answers.append({"pair_id": f"p{i:05d}", "response": f"{thought}```json\n{body}\n```"})
    data = tmp / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    preds = tmp / "answers.jsonl"
    preds.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return data, preds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"base-model name or YAML path (default {DEFAULT_MODEL})"
    )
    args = parser.parse_args()
    spec = load_model_spec(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        data, preds = build(Path(tmp), args.pairs, spec)
        times = []
        for r in range(args.repeats):
            out = Path(tmp) / f"r{r}" / "results.json"
            start = time.perf_counter()
            argv = ["--data", str(data), "--predictions", str(preds), "--model", spec.model_name, "--out", str(out)]
            if dig.main(argv) != 0:
                return 2  # eval.dig printed why
            times.append(time.perf_counter() - start)
        f1 = json.loads(out.read_text())["overall"]["f1"]
    wall = statistics.median(times)
    figures = {
        "benchmark": "eval_dig_scoring",
        "pairs": args.pairs,
        "model": spec.model_name,
        "wall_s": round(wall, 3),
        "pairs_per_s": round(args.pairs / wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "overall_f1_of_synthetic_answers": round(f1, 3),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
