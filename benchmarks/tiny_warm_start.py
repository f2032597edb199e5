"""Within-group reward spread of a tiny rehearsal policy before and after its warm start, sampled by vLLM on CPU.

    .venv/bin/python benchmarks/tiny_warm_start.py --model tiny_qwen3_vl_thinking --data TRAIN.parquet
        [--eval-data VAL.parquet] [--prompts 8] [--n 8] [--steps 300] [--seed 0] [--out-dir DIR]

Builds the model file's tiny checkpoint twice with ``recipes.dig.rehearsal.tiny_models.build_checkpoint``: random
(before) and warm-started on ``--data`` (after). For each, a fresh process starts vLLM's offline ``LLM`` on CPU
from the checkpoint and samples ``--n`` answers per prompt for the first ``--prompts`` rows of ``--eval-data``
(default ``--data``) with verl's rollout sampling (temperature 1, top_p 1, no top_k) and the model file's
``data.max_response_length``; the prompts are built as verl builds them (``RLHFDataset`` -> vision info -> chat
template) and vLLM's prompt length and image-token count are checked against the HF processor's for every row.
Answers are scored by ``reward_fns.dig_reward.compute_score`` with the model file's reward kwargs.

Prints JSON lines: the warm start's own line (rows, steps, loss before/after, seconds), then one line per
checkpoint: mean within-group std of the score, the share of groups whose scores are not all equal (where GRPO
has a non-zero advantage), the format rate, the mean score, engine start and generate seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def response_length(model: str) -> int:
    import yaml

    from dig_common.models import model_file

    return int(yaml.safe_load(model_file(model).read_text())["data"]["max_response_length"])


def measure(model: str, checkpoint: Path, data: Path, prompts: int, n: int, seed: int, dtype: str) -> dict:
    """Sample ``n`` answers per prompt with vLLM from ``checkpoint`` and score them (runs in its own process)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from dig_common.models import load_model_spec
    from recipes.dig.rehearsal.warm_start import load_rows
    from reward_fns.dig_reward import compute_score

    spec = load_model_spec(model)
    processor = AutoProcessor.from_pretrained(checkpoint)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows = load_rows(data, spec, processor)[:prompts]
    requests, hf_counts = [], []
    for messages, images, _ in rows:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
        hf_counts.append((len(ids), ids.count(image_pad)))
        requests.append({"prompt": text, "multi_modal_data": {"image": images}})
    started = time.perf_counter()
    llm = LLM(
        model=str(checkpoint),
        dtype=dtype,
        enforce_eager=True,
        max_model_len=4096,
        max_num_seqs=n,
        limit_mm_per_prompt={"image": 2, "video": 0},
        seed=seed,
    )
    engine_s = time.perf_counter() - started
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, n=n, seed=seed, max_tokens=response_length(model))
    started = time.perf_counter()
    outputs = llm.generate(requests, sampling)
    generate_s = time.perf_counter() - started
    vllm_counts = [(len(o.prompt_token_ids), list(o.prompt_token_ids).count(image_pad)) for o in outputs]
    if vllm_counts != hf_counts:
        raise AssertionError(f"vLLM prompt/image tokens {vllm_counts} != HF processor's {hf_counts}")
    stds, formats, scores, example = [], [], [], None
    for (_, _, ground_truth), output in zip(rows, outputs, strict=True):
        results = [compute_score("dig", c.text, ground_truth, **spec.reward_kwargs()) for c in output.outputs]
        group = [r["score"] for r in results]
        stds.append(statistics.pstdev(group))
        scores += group
        formats += [r["format"] for r in results]
        if example is None and any(r["format"] for r in results):
            example = next(c.text for c, r in zip(output.outputs, results, strict=True) if r["format"])
    return {
        "checkpoint": str(checkpoint),
        "prompts": len(rows),
        "n": n,
        "prompt_tokens": sorted({c[0] for c in hf_counts}),
        "image_tokens": sorted({c[1] for c in hf_counts}),
        "vllm_counts_equal_hf": True,
        "mean_group_std": round(statistics.mean(stds), 4),
        "groups_with_spread": round(sum(s > 0 for s in stds) / len(stds), 3),
        "format_rate": round(statistics.mean(formats), 3),
        "mean_score": round(statistics.mean(scores), 4),
        "engine_start_s": round(engine_s, 1),
        "generate_s": round(generate_s, 2),
        "dtype": dtype,
        "parseable_example": example,
        "first_answers": [c.text for c in outputs[0].outputs[:2]],
    }


def run_measure(args, phase: str, checkpoint: Path, data: Path) -> None:
    command = [sys.executable, __file__, "--measure", str(checkpoint), "--model", args.model, "--data", str(data)]
    command += ["--prompts", str(args.prompts), "--n", str(args.n), "--seed", str(args.seed), "--dtype", args.dtype]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"measuring {checkpoint} failed (exit {result.returncode})")
    print(json.dumps({"phase": phase, **json.loads(lines[-1])}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="tiny_qwen3_vl_thinking")
    parser.add_argument("--data", type=Path, required=True, help="parquet to warm-start on")
    parser.add_argument("--eval-data", type=Path, default=None, help="parquet to sample prompts from (default --data)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (bfloat16 blurs a model this small)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the two checkpoints go (default: a temp dir)")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(
            json.dumps(measure(args.model, args.measure, args.data, args.prompts, args.n, args.seed, args.dtype)),
            flush=True,
        )
        return 0
    from dig_common.models import load_model_spec
    from recipes.dig.rehearsal.tiny_models import build_checkpoint

    spec = load_model_spec(args.model)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="tiny_warm_start_"))
    eval_data = args.eval_data or args.data
    before = build_checkpoint(spec, out_dir / f"{spec.model_name}_random", args.seed)
    after = build_checkpoint(spec, out_dir / f"{spec.model_name}_warm", args.seed, args.data, args.steps)
    print(json.dumps({"phase": "warm_start", "model": spec.model_name, **after.get("warm_start", {})}), flush=True)
    run_measure(args, "before", Path(before["out"]), eval_data)
    run_measure(args, "after", Path(after["out"]), eval_data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
