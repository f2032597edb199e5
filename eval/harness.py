"""Perception benchmarks through the standard harnesses (lmms-eval or VLMEvalKit), collected into one table.

    python -m eval.harness run --harness lmms_eval --model-path CKPT --model qwen3_vl_8b_thinking \
        --out-dir runs/perception [--benchmarks-only mmstar,pope] [--dry-run]
    python -m eval.harness collect --harness lmms_eval --out-dir runs/perception --out table.json

The benchmark list and each harness's task / dataset / metric names are data (``eval/benchmarks.yaml``).
``run`` builds one harness command (printed, and executed unless ``--dry-run``), then ``collect`` reads
the harness's own result files: lmms-eval's ``<output_path>/<model>/<date>_results.json`` and
VLMEvalKit's ``<work_dir>/<model>/[<run id>/]<model>_<dataset>_{acc,score}.csv``. Neither harness is a
dependency of this repo: install it in the eval environment (``pip install lmms-eval`` or a VLMEvalKit
checkout given with ``--vlmevalkit-dir``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_prep.fileio import atomic_write_text
from recipes.dig.models import ModelSpec, load_model_spec

BENCHMARKS_FILE = Path(__file__).resolve().parent / "benchmarks.yaml"
HARNESSES = ("lmms_eval", "vlmevalkit")
# lmms-eval model names (its --model) per family, for the HF backend; "vllm" is family-agnostic.
LMMS_EVAL_MODEL = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}
# VLMEvalKit model classes per family (vlmeval/vlm/qwen*_vl).
VLMEVALKIT_MODEL_CLASS = {"qwen2_5_vl": "Qwen2VLChat", "qwen3_vl": "Qwen3VLChat"}
# Row labels that hold the headline value in VLMEvalKit score CSVs.
OVERALL_LABELS = ("overall", "none", "dev", "test", "total")


@dataclass(frozen=True)
class Benchmark:
    key: str
    display: str
    paper: str | None
    lmms_tasks: tuple[str, ...]
    lmms_metrics: tuple[str, ...]  # candidates, first present wins (harness versions rename metrics)
    vlmeval_datasets: tuple[str, ...]
    vlmeval_class: str
    vlmeval_metric: str


def load_benchmarks(path: str | Path = BENCHMARKS_FILE) -> dict[str, Benchmark]:
    path = Path(path)
    try:
        table = (yaml.safe_load(path.read_text()) or {}).get("benchmarks")
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read benchmark list {path}: {err}") from err
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path}: needs a non-empty 'benchmarks:' mapping")
    out = {}
    for key, entry in table.items():
        try:
            lm, vk = entry["lmms_eval"], entry["vlmevalkit"]
            out[key] = Benchmark(
                key=key,
                display=entry.get("display", key),
                paper=entry.get("paper"),
                lmms_tasks=tuple(lm["tasks"]),
                lmms_metrics=(lm["metric"],) if isinstance(lm["metric"], str) else tuple(lm["metric"]),
                vlmeval_datasets=tuple(vk["datasets"]),
                vlmeval_class=vk["class"],
                vlmeval_metric=vk["metric"],
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: benchmark {key!r} lacks {err} (see the header of {BENCHMARKS_FILE})") from err
    return out


def select_benchmarks(benchmarks: dict[str, Benchmark], only: str | None) -> list[Benchmark]:
    if not only:
        return list(benchmarks.values())
    keys = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in benchmarks]
    if unknown:
        raise ValueError(f"--benchmarks-only: unknown {', '.join(unknown)}; known: {', '.join(benchmarks)}")
    return [benchmarks[k] for k in keys]


# ----------------------------------------------------------------------------------------------- commands


def lmms_eval_command(
    benchmarks: list[Benchmark],
    model_path: str,
    spec: ModelSpec,
    output_path: str | Path,
    backend: str = "hf",
    num_processes: int = 1,
    tensor_parallel_size: int = 1,
    batch_size: int = 1,
    limit: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """One lmms-eval invocation for all benchmarks; pixel bounds come from the model's config file."""
    tasks = ",".join(t for b in benchmarks for t in b.lmms_tasks)
    if backend == "vllm":
        model = "vllm"
        model_args = f"model={model_path},tensor_parallel_size={tensor_parallel_size}"
        launcher = [python, "-m", "lmms_eval"]
    elif backend == "hf":
        if spec.family not in LMMS_EVAL_MODEL:
            raise ValueError(f"no lmms-eval model for family {spec.family!r}; known: {', '.join(LMMS_EVAL_MODEL)}")
        model = LMMS_EVAL_MODEL[spec.family]
        model_args = f"pretrained={model_path},min_pixels={spec.min_pixels},max_pixels={spec.max_pixels}"
        launcher = [python, "-m", "accelerate.commands.launch", f"--num_processes={num_processes}", "-m", "lmms_eval"]
    else:
        raise ValueError(f"--backend must be hf or vllm, got {backend!r}")
    cmd = launcher + [
        "--model", model,
        "--model_args", model_args,
        "--tasks", tasks,
        "--batch_size", str(batch_size),
        "--output_path", str(output_path),
        "--log_samples",
    ]  # fmt: skip
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def vlmevalkit_config(benchmarks: list[Benchmark], model_path: str, spec: ModelSpec, model_label: str) -> dict:
    """VLMEvalKit ``--config`` JSON: our checkpoint as a model entry, each dataset with its class."""
    if spec.family not in VLMEVALKIT_MODEL_CLASS:
        raise ValueError(f"no VLMEvalKit class for family {spec.family!r}; known: {', '.join(VLMEVALKIT_MODEL_CLASS)}")
    model = {
        "class": VLMEVALKIT_MODEL_CLASS[spec.family],
        "model_path": model_path,
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
    }
    data = {ds: {"class": b.vlmeval_class, "dataset": ds} for b in benchmarks for ds in b.vlmeval_datasets}
    return {"model": {model_label: model}, "data": data}


def vlmevalkit_command(
    config_path: str | Path,
    work_dir: str | Path,
    vlmevalkit_dir: str | Path,
    num_processes: int = 1,
    python: str = sys.executable,
) -> list[str]:
    run_py = str(Path(vlmevalkit_dir) / "run.py")
    if num_processes > 1:
        launcher = [python, "-m", "torch.distributed.run", f"--nproc-per-node={num_processes}", run_py]
    else:
        launcher = [python, run_py]
    return launcher + ["--config", str(config_path), "--work-dir", str(work_dir), "--mode", "all"]


# ----------------------------------------------------------------------------------------------- parsing


def _as_percent(value: float) -> float:
    # Harnesses mix 0-1 fractions and 0-100 percentages; the table is in percent.
    return value * 100.0 if abs(value) <= 1.0 else value


def parse_lmms_eval_results(path: str | Path) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from an lmms-eval ``*_results.json`` (filters and stderr dropped)."""
    try:
        results = json.loads(Path(path).read_text())["results"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path}: not an lmms-eval results file ({err})") from err
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        clean = {}
        for key, value in metrics.items():
            name = key.split(",", 1)[0]
            if name.endswith("_stderr") or name == "alias" or not isinstance(value, int | float):
                continue
            clean.setdefault(name, float(value))
        out[task] = clean
    return out


def find_lmms_eval_results(output_path: str | Path) -> list[Path]:
    """All results files under an lmms-eval ``--output_path``, oldest first (later files win on merge)."""
    return sorted(Path(output_path).rglob("*_results.json"), key=lambda p: (p.stat().st_mtime, str(p)))


def collect_lmms_eval(benchmarks: list[Benchmark], output_path: str | Path) -> dict[str, dict]:
    merged: dict[str, dict[str, float]] = {}
    for path in find_lmms_eval_results(output_path):
        merged.update(parse_lmms_eval_results(path))
    table = {}
    for b in benchmarks:
        values, missing = [], []
        for task in b.lmms_tasks:
            found = [merged.get(task, {})[m] for m in b.lmms_metrics if m in merged.get(task, {})]
            if found:
                values.append(found[0])
            else:
                missing.append(task)
        table[b.key] = _row(b, values, missing, {t: merged.get(t, {}) for t in b.lmms_tasks})
    return table


def parse_vlmevalkit_csv(path: str | Path, metric: str) -> float:
    """Headline value of one VLMEvalKit score CSV.

    Two layouts occur: metric as a column (``split,Overall,...`` / ``split,aAcc,fAcc,qAcc``), read from the
    overall row (or the only row); or metric as a row label in the first column with the value next to it.
    """
    with open(path, newline="") as handle:
        rows = [r for r in csv.reader(handle) if r]
    if len(rows) < 2:
        raise ValueError(f"{path}: empty score file")
    header, body = rows[0], rows[1:]
    if metric in header:
        col = header.index(metric)
        row = next((r for r in body if r[0].strip().lower() in OVERALL_LABELS), body[0])
        return float(row[col])
    for r in body:
        if r[0].strip() == metric and len(r) > 1:
            return float(r[1])
    raise ValueError(f"{path}: no column or row named {metric!r} (header: {header})")


def find_vlmevalkit_score(work_dir: str | Path, model_label: str, dataset: str) -> Path | None:
    """Newest ``<model>_<dataset>_{acc,score}.csv`` under the work dir (VLMEvalKit nests runs by id)."""
    candidates = []
    for suffix in ("acc", "score"):
        candidates += Path(work_dir).rglob(f"{model_label}_{dataset}_{suffix}.csv")
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime, str(p)))


def collect_vlmevalkit(benchmarks: list[Benchmark], work_dir: str | Path, model_label: str) -> dict[str, dict]:
    table = {}
    for b in benchmarks:
        values, missing, raw = [], [], {}
        for ds in b.vlmeval_datasets:
            path = find_vlmevalkit_score(work_dir, model_label, ds)
            if path is None:
                missing.append(ds)
                continue
            raw[ds] = parse_vlmevalkit_csv(path, b.vlmeval_metric)
            values.append(raw[ds])
        table[b.key] = _row(b, values, missing, raw)
    return table


def _row(b: Benchmark, values: list[float], missing: list[str], raw: dict) -> dict:
    # A benchmark split over several tasks/datasets (CV-Bench 2D + 3D) reports their mean.
    complete = values and not missing
    return {
        "benchmark": b.display,
        "score": round(sum(_as_percent(v) for v in values) / len(values), 2) if complete else None,
        "missing": missing,
        "raw": raw,
    }


def markdown_table(table: dict[str, dict], title: str = "this recipe") -> str:
    names = [row["benchmark"] for row in table.values()]
    scores = ["—" if row["score"] is None else f"{row['score']:.1f}" for row in table.values()]
    return "\n".join(
        [
            "| model | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
            f"| {title} | " + " | ".join(scores) + " |",
        ]
    )


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.harness", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "collect"):
        p = sub.add_parser(name)
        p.add_argument("--harness", choices=HARNESSES, default="lmms_eval")
        p.add_argument(
            "--out-dir", required=True, help="harness output folder (lmms-eval --output_path / VLMEvalKit --work-dir)"
        )
        p.add_argument("--model", default="qwen3_vl_8b_thinking", help="base-model config name or YAML path")
        p.add_argument("--model-label", default="dig", help="name VLMEvalKit files are written under")
        p.add_argument("--benchmarks", default=str(BENCHMARKS_FILE))
        p.add_argument("--benchmarks-only", default=None, help="comma list of benchmark keys")
        p.add_argument("--out", default=None, help="table JSON (default <out-dir>/perception.json)")
    run = sub.choices["run"]
    run.add_argument("--model-path", required=True, help="HF checkpoint folder (e.g. the merged stage-3 model)")
    run.add_argument("--backend", choices=("hf", "vllm"), default="vllm")
    run.add_argument("--num-processes", type=int, default=1)
    run.add_argument("--tensor-parallel-size", type=int, default=1)
    run.add_argument("--batch-size", type=int, default=1)
    run.add_argument("--limit", type=int, default=None, help="samples per task (smoke runs)")
    run.add_argument("--vlmevalkit-dir", default=os.environ.get("VLMEVALKIT_DIR"), help="VLMEvalKit checkout")
    run.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args = parser.parse_args(argv)

    benchmarks = select_benchmarks(load_benchmarks(args.benchmarks), args.benchmarks_only)
    spec = load_model_spec(args.model)
    out_dir = Path(args.out_dir)
    if args.command == "run":
        if args.harness == "lmms_eval":
            cmd = lmms_eval_command(
                benchmarks,
                args.model_path,
                spec,
                out_dir,
                args.backend,
                args.num_processes,
                args.tensor_parallel_size,
                args.batch_size,
                args.limit,
            )
        else:
            if not args.vlmevalkit_dir or not (Path(args.vlmevalkit_dir) / "run.py").is_file():
                parser.error("--vlmevalkit-dir (or $VLMEVALKIT_DIR) must be a VLMEvalKit checkout holding run.py")
            config_path = out_dir / "vlmevalkit_config.json"
            config = vlmevalkit_config(benchmarks, args.model_path, spec, args.model_label)
            atomic_write_text(config_path, json.dumps(config, indent=2))
            cmd = vlmevalkit_command(config_path.resolve(), out_dir.resolve(), args.vlmevalkit_dir, args.num_processes)
        print(shlex.join(cmd), flush=True)
        if args.dry_run:
            return 0
        cwd = args.vlmevalkit_dir if args.harness == "vlmevalkit" else None
        rc = subprocess.call(cmd, cwd=cwd)
        if rc != 0:
            print(f"harness exited with {rc}; collecting whatever it wrote", file=sys.stderr)
    if args.harness == "lmms_eval":
        table = collect_lmms_eval(benchmarks, out_dir)
    else:
        table = collect_vlmevalkit(benchmarks, out_dir, args.model_label)
    out = Path(args.out) if args.out else out_dir / "perception.json"
    atomic_write_text(out, json.dumps({"harness": args.harness, "benchmarks": table}, indent=2))
    md = markdown_table(table)
    atomic_write_text(out.with_suffix(".md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
