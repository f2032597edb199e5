"""Reward throughput and worst-case cost. Prints one JSON object per line.

    .venv/bin/python benchmarks/reward.py [--repeats 5] [--n 20000]

Figures: scored responses per second on one core for realistic answers (K <= 4 GT boxes, <= 8 predicted,
thinking text before the answer, fenced JSON with labels), per coord_mode; and the time of one call on
adversarial inputs. Medians over --repeats runs (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time

from reward_fns.dig_reward import compute_score
from reward_fns.geometry import from_pixels

W, H = 480, 320
FRAMES = {
    "rel1000": {"coord_mode": "rel1000"},
    "abs_resized": {"coord_mode": "abs_resized", "resize_factor": 28, "min_pixels": 3136, "max_pixels": 1003520},
}


def realistic_batch(rng: random.Random, n: int, frame: dict, group: int = 1) -> list[tuple[str, str]]:
    """(response, ground_truth) pairs: noisy, partly wrong, sometimes malformed, like a real rollout.
    ``group`` responses share one ground truth, as the n rollouts of a GRPO group do."""
    batch = []
    for i in range(n):
        if i % group == 0:
            k = rng.randint(1, 4)
            gt = []
            for _ in range(k):
                x0, y0 = rng.uniform(0, W - 60), rng.uniform(0, H - 60)
                gt.append([x0, y0, x0 + rng.uniform(20, 60), y0 + rng.uniform(20, 60)])
            gt_json = json.dumps({"boxes": gt, "width": W, "height": H})
        k = len(gt)
        n_pred = min(8, max(0, k + rng.randint(-1, 3)))
        pred = []
        for j in range(n_pred):
            base = gt[j % k]
            pred.append([v + rng.gauss(0, 6) for v in base])
        pred_frame = from_pixels(
            pred,
            frame["coord_mode"],
            W,
            H,
            factor=frame.get("resize_factor", 28),
            min_pixels=frame.get("min_pixels", 3136),
            max_pixels=frame.get("max_pixels", 12845056),
        )
        items = [
            {"bbox_2d": [round(v) for v in box], "label": rng.choice(["colour", "shape", "removed object"])}
            for box in pred_frame.tolist()
        ]
        thinking = "Compare the objects one by one. " * rng.randint(10, 60)
        answer = f"```json\n{json.dumps(items)}\n```" if rng.random() > 0.05 else "I cannot find [any]"
        batch.append((f"<think>{thinking}</think>{answer}", gt_json))
    return batch


def throughput(batch, frame, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for response, gt in batch:
            compute_score("dig", response, gt, **frame)
        rates.append(len(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def adversarial_inputs() -> dict[str, str]:
    box = '{"bbox_2d": [10, 10, 50, 50], "label": "x"}'
    return {
        "1MB_text": "The red cube differs. " * 47_663,
        "1MB_after_think": "<think>x</think>" + "[1, 2, 3, 4] " * 80_000,
        "10000_boxes": "[" + ", ".join([box] * 10_000) + "]",
        "deeply_nested_json_10k": "[" * 10_000 + "]" * 10_000,
        "100k_open_brackets": "[" * 100_000,
        "32k_open_brackets_under_the_cap": "[" * 32_000,  # the bracket scanner's worst case within max_answer_chars
        "16k_bracket_pairs_under_the_cap": "[] " * 10_900,
        "100k_bracket_pairs": "[]" * 50_000,
        "100k_quotes_in_list": "[" + '"' * 100_000 + "]",
        "nan_and_huge_numbers": "[[NaN, 1e999, 10" + "0" * 5000 + ", 4]]",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=20_000, help="responses per throughput run")
    args = parser.parse_args()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the figure claims
    rng = random.Random(0)
    gt = json.dumps({"boxes": [[10, 10, 50, 50]], "width": W, "height": H})
    for name, frame in FRAMES.items():
        for group in (1, 8):  # each response with its own GT; GRPO groups of 8 rollouts sharing one GT
            batch = realistic_batch(rng, args.n, frame, group)
            compute_score("dig", *batch[0], **frame)  # warm-up: imports, smart_resize cache
            rate = throughput(batch, frame, args.repeats)
            record = {
                "benchmark": "reward_throughput",
                "coord_mode": name,
                "responses_per_gt": group,
                "responses_per_s_per_core": round(rate),
                "n": args.n,
                "repeats": args.repeats,
            }
            print(json.dumps(record), flush=True)
    for name, text in adversarial_inputs().items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = compute_score("dig", text, gt)
            times.append(time.perf_counter() - start)
        print(
            json.dumps(
                {
                    "benchmark": "reward_adversarial",
                    "input": name,
                    "chars": len(text),
                    "median_ms": round(statistics.median(times) * 1e3, 3),
                    "max_ms": round(max(times) * 1e3, 3),
                    "score": result["score"],
                    "format": result["format"],
                }
            )
        )


if __name__ == "__main__":
    main()
