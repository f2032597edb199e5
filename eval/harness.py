"""Perception benchmarks through the standard harnesses (lmms-eval or VLMEvalKit), collected into one table.

    python -m eval.harness run --harness lmms_eval --model-path CKPT --model MODEL \
        --out-dir runs/perception [--benchmarks-only mmstar,pope] [--judge-free] [--dry-run]
    python -m eval.harness collect --harness lmms_eval --out-dir runs/perception --out table.json

The benchmark list and each harness's task / dataset / metric names, score scale, judge need and the harness
version they were checked against are data (``eval/benchmarks.yaml``). ``run`` builds one harness command
(printed, and executed unless ``--dry-run``) whose pixel bounds, sampling and token budget come from the
base-model file's ``dig:`` block (the same as ``eval.dig``), then ``collect`` reads the harness's own result
files: lmms-eval's ``<output_path>/<model>/<date>_results.json`` and VLMEvalKit's
``<work_dir>/<model>/[<eval id>/]<model>_<dataset>_{acc,score}.csv``. Neither harness is a dependency of this
repo: install it in the eval environment (``pip install lmms-eval==0.7.3`` or a VLMEvalKit checkout given
with ``--vlmevalkit-dir``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from dig_common.argtypes import positive_int
from dig_common.checkpoints import check_checkpoint
from dig_common.cli import CliError, cli_main, tool_parser
from dig_common.fileio import atomic_write_text
from dig_common.models import Decoding, ModelSpec, load_model_spec
from dig_common.yaml_error import yaml_error_line
from eval.backends import BACKENDS, PROMPT_TOKEN_BUDGET, require_backend
from eval.options import add_model_arg, require_file

PROG = "python -m eval.harness"

BENCHMARKS_FILE = Path(__file__).resolve().parent / "benchmarks.yaml"
HARNESSES = ("lmms_eval", "vlmevalkit")
JUDGE_NEEDS = ("none", "optional", "required")
SCALES = ("fraction", "percent")
# lmms-eval model names per family for the HF backend. Run with --force_simple: the simple wrappers
# (models/simple/qwen*_vl.py) apply min_pixels/max_pixels; the chat wrapper of qwen3_vl ignores them.
LMMS_EVAL_MODEL = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}
# VLMEvalKit model classes per family (vlmeval/vlm/qwen*_vl).
VLMEVALKIT_MODEL_CLASS = {"qwen2_5_vl": "Qwen2VLChat", "qwen3_vl": "Qwen3VLChat"}
# Row labels that hold the headline value in VLMEvalKit score CSVs.
OVERALL_LABELS = ("overall", "none", "dev", "test", "total")
PLACEHOLDER_KEYS = ("", "YOUR_API_KEY")  # what lmms-eval's judged tasks fall back to without a key


class JudgeError(ValueError):
    """A benchmark needs an API judge that is not configured."""


@dataclass(frozen=True)
class Entry:
    """How one harness runs and scores one benchmark (one block of ``benchmarks.yaml``)."""

    names: tuple[str, ...]  # lmms-eval tasks / VLMEvalKit datasets
    metrics: tuple[str, ...]  # candidates, first present wins
    scale: str  # fraction | percent
    judge: str  # none | optional | required
    measures: str
    checked: str
    dataset_class: str | None = None  # VLMEvalKit only
    judge_free: Entry | None = None


@dataclass(frozen=True)
class Benchmark:
    key: str
    display: str
    paper: str | None
    entries: dict[str, Entry]  # harness -> entry

    def entry(self, harness: str, judge_free: bool = False) -> Entry:
        entry = self.entries[harness]
        return entry.judge_free if judge_free and entry.judge_free else entry


def _entry(path: Path, key: str, harness: str, block: dict, inherit: Entry | None = None) -> Entry:
    names_key = "tasks" if harness == "lmms_eval" else "datasets"
    where = f"{path}: benchmark {key!r} ({harness}{' judge_free' if inherit else ''})"
    try:
        metric = block["metric"]
        entry = Entry(
            names=tuple(block[names_key]),
            metrics=(metric,) if isinstance(metric, str) else tuple(metric),
            scale=block["scale"],
            judge=block["judge"],
            measures=block["measures"],
            checked=block["checked"] if inherit is None else block.get("checked", inherit.checked),
            dataset_class=block.get("class", inherit.dataset_class if inherit else None),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where} lacks {err} (see the header of {BENCHMARKS_FILE})") from err
    if entry.scale not in SCALES:
        raise ValueError(f"{where}: scale must be one of {', '.join(SCALES)}, got {entry.scale!r}")
    if entry.judge not in JUDGE_NEEDS:
        raise ValueError(f"{where}: judge must be one of {', '.join(JUDGE_NEEDS)}, got {entry.judge!r}")
    if harness == "vlmevalkit" and not entry.dataset_class:
        raise ValueError(f"{where} lacks 'class' (the VLMEvalKit dataset class)")
    if "judge_free" in block:
        if inherit is not None:
            raise ValueError(f"{where}: a judge_free block cannot hold another")
        free = _entry(path, key, harness, block["judge_free"], inherit=entry)
        if free.judge == "required":
            raise ValueError(f"{where}: its judge_free variant says judge: required")
        entry = Entry(**{**entry.__dict__, "judge_free": free})
    return entry


def load_benchmarks(path: str | Path = BENCHMARKS_FILE) -> dict[str, Benchmark]:
    path = Path(path)
    try:
        table = (yaml.safe_load(path.read_text()) or {}).get("benchmarks")
    except OSError as err:
        raise ValueError(f"cannot read benchmark list {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"benchmark list {path}: not valid YAML: {yaml_error_line(err)}") from err
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path}: needs a non-empty 'benchmarks:' mapping")
    out = {}
    for key, entry in table.items():
        if not isinstance(entry, dict) or any(not isinstance(entry.get(h), dict) for h in HARNESSES):
            raise ValueError(f"{path}: benchmark {key!r} lacks a {' and a '.join(HARNESSES)} block")
        out[key] = Benchmark(
            key=key,
            display=entry.get("display", key),
            paper=entry.get("paper"),
            entries={h: _entry(path, key, h, entry[h]) for h in HARNESSES},
        )
    return out


def select_benchmarks(benchmarks: dict[str, Benchmark], only: str | None) -> list[Benchmark]:
    if not only:
        return list(benchmarks.values())
    keys = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in benchmarks]
    if unknown:
        raise ValueError(f"--benchmarks-only: unknown {', '.join(unknown)}; known: {', '.join(benchmarks)}")
    return [benchmarks[k] for k in keys]


# ----------------------------------------------------------------------------------------------- judges


def judge_key_variable(harness: str, env: dict | None = None) -> str:
    """The environment variable the harness reads its judge's API key from."""
    env = os.environ if env is None else env
    if harness == "lmms_eval" and env.get("API_TYPE", "openai") == "azure":
        return "AZURE_API_KEY"
    return "OPENAI_API_KEY"


def judge_configured(harness: str, env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(judge_key_variable(harness, env), "").strip() not in PLACEHOLDER_KEYS


def plan_judges(
    benchmarks: list[Benchmark],
    harness: str,
    judge_free: bool = False,
    allow_unjudged: bool = False,
    env: dict | None = None,
) -> tuple[dict[str, Entry], list[str]]:
    """The entry each benchmark runs with, and the warnings to print.

    ``--judge-free`` picks every benchmark's judge-free variant where one exists. A benchmark whose score
    needs a judge (``judge: required``) with no key configured is refused, naming it and its way out
    (the judge-free variant, the other harness, or ``--allow-unjudged``); ``optional`` judges are a warning.
    """
    have_key = judge_configured(harness, env)
    variable = judge_key_variable(harness, env)
    plan, warnings, refused = {}, [], []
    for b in benchmarks:
        entry = b.entry(harness, judge_free)
        plan[b.key] = entry
        if entry.judge == "none" or have_key or (judge_free and entry.judge == "optional"):
            continue  # --judge-free turns optional judges off (VLMEvalKit: --judge exact_matching)
        names = ",".join(entry.names)
        if entry.judge == "optional":
            warnings.append(
                f"{b.display} ({names}): no {variable}: answers the rules cannot read are scored by exact matching"
            )
            continue
        if entry.judge_free:
            way_out = f"--judge-free runs {','.join(entry.judge_free.names)} ({entry.judge_free.measures})"
        else:
            other = next(h for h in HARNESSES if h != harness)
            way_out = f"{harness} has no judge-free variant; --harness {other} scores it {b.entries[other].measures}"
        message = f"{b.display} ({names}) needs an API judge and {variable} is not set: {way_out}"
        if allow_unjudged:
            warnings.append(f"{message}. --allow-unjudged: running anyway, its score is meaningless")
        else:
            refused.append(message)
    if refused:
        raise JudgeError("; ".join(refused) + " (or set the key, drop it with --benchmarks-only, or --allow-unjudged)")
    return plan, warnings


# ----------------------------------------------------------------------------------------------- commands


def _kwargs_string(values: dict) -> str:
    """``k=v,k=v`` as lmms-eval's ``simple_parse_args_string`` reads it (JSON values stay whole)."""
    return ",".join(
        f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, dict) else v}" for k, v in values.items()
    )


def lmms_eval_gen_kwargs(decoding: Decoding, backend: str) -> dict:
    """``--gen_kwargs`` from the model file: overrides every task's own (often 16-token) generation limit."""
    out = {"max_new_tokens": decoding.max_new_tokens, "temperature": decoding.temperature}
    if decoding.greedy:
        out["do_sample"] = False
        return out
    out["top_p"] = decoding.top_p
    if decoding.top_k > 0:
        out["top_k"] = decoding.top_k
    if backend == "vllm":
        # lmms-eval's vLLM wrapper passes these to SamplingParams (models/simple/vllm.py); HF generate has no
        # presence penalty, and its seed is --seed
        out["seed"] = decoding.seed
        if decoding.presence_penalty:
            out["presence_penalty"] = decoding.presence_penalty
    return out


def lmms_eval_model_args(model_path: str, spec: ModelSpec, backend: str, tensor_parallel_size: int = 1) -> dict:
    """``--model_args``: the model file's pixel bounds reach the image processor on both backends."""
    if backend == "vllm":
        max_new_tokens = spec.decoding.max_new_tokens
        return {
            "model": model_path,
            "tensor_parallel_size": tensor_parallel_size,
            "max_new_tokens": max_new_tokens,
            # bounded context, as eval.backends does: the checkpoints' native length reserves unused KV cache
            "max_model_len": max_new_tokens + PROMPT_TOKEN_BUDGET,
            # the wrapper hands unknown keys to vllm.LLM; the HF processor inside vLLM resizes with these
            "mm_processor_kwargs": {"min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels},
        }
    args = {"pretrained": model_path, "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    if spec.family == "qwen3_vl" and spec.require_think:
        # the simple wrapper then answers with the text after </think>, empty when the thought never closed
        args["enable_thinking"] = True
    return args


def lmms_eval_command(
    entries: list[Entry],
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
    """One lmms-eval invocation for all benchmarks; resolution and decoding come from the model's file."""
    if backend not in ("hf", "vllm"):
        raise ValueError(f"--backend must be hf or vllm, got {backend!r}")
    if "," in str(model_path):
        raise ValueError(f"--model-path {model_path!r}: lmms-eval splits --model_args at commas; rename the folder")
    tasks = ",".join(t for e in entries for t in e.names)
    model_args = _kwargs_string(lmms_eval_model_args(model_path, spec, backend, tensor_parallel_size))
    if backend == "vllm":
        model_flags = ["--model", "vllm"]
        launcher = [python, "-m", "lmms_eval"]
    else:
        if spec.family not in LMMS_EVAL_MODEL:
            raise ValueError(f"no lmms-eval model for family {spec.family!r}; known: {', '.join(LMMS_EVAL_MODEL)}")
        model_flags = ["--model", LMMS_EVAL_MODEL[spec.family], "--force_simple"]
        launcher = [python, "-m", "accelerate.commands.launch", f"--num_processes={num_processes}", "-m", "lmms_eval"]
    cmd = launcher + model_flags + [
        "--model_args", model_args,
        "--tasks", tasks,
        "--gen_kwargs", _kwargs_string(lmms_eval_gen_kwargs(spec.decoding, backend)),
        "--seed", str(spec.decoding.seed),
        "--batch_size", str(batch_size),
        "--output_path", str(output_path),
        "--log_samples",
    ]  # fmt: skip
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def vlmevalkit_model_entry(model_path: str, spec: ModelSpec, backend: str) -> dict:
    """Our checkpoint as a VLMEvalKit model entry, decoding as the model file says (VLMEvalKit's own
    Qwen3-VL entries in vlmeval/config.py set the model-card sampling and use_custom_prompt=False too)."""
    if spec.family not in VLMEVALKIT_MODEL_CLASS:
        raise ValueError(f"no VLMEvalKit class for family {spec.family!r}; known: {', '.join(VLMEVALKIT_MODEL_CLASS)}")
    dec = spec.decoding
    model = {
        "class": VLMEVALKIT_MODEL_CLASS[spec.family],
        "model_path": model_path,
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "max_new_tokens": dec.max_new_tokens,
        "temperature": dec.temperature,
        "top_p": dec.top_p,
        "top_k": dec.top_k if dec.top_k > 0 else 1 if dec.greedy else 0,
        "repetition_penalty": 1.0,
        "do_sample": not dec.greedy,
        "use_vllm": backend == "vllm",
    }
    if spec.family == "qwen3_vl":
        model["presence_penalty"] = dec.presence_penalty  # Qwen2VLChat has no such parameter
        model["use_custom_prompt"] = False
    return model


def vlmevalkit_config(
    plan: dict[str, Entry], model_path: str, spec: ModelSpec, model_label: str, backend: str = "hf"
) -> dict:
    """VLMEvalKit ``--config`` JSON: our checkpoint as a model entry, each dataset with its class."""
    data = {ds: {"class": e.dataset_class, "dataset": ds} for e in plan.values() for ds in e.names}
    return {"model": {model_label: vlmevalkit_model_entry(model_path, spec, backend)}, "data": data}


def vlmevalkit_env(spec: ModelSpec, env: dict | None = None) -> dict:
    """Environment for run.py: thinking models get SPLIT_THINK so only the text after </think> is scored."""
    env = dict(os.environ if env is None else env)
    if spec.require_think:
        env["SPLIT_THINK"] = "True"
    return env


def vlmevalkit_command(
    config_path: str | Path,
    work_dir: str | Path,
    vlmevalkit_dir: str | Path,
    num_processes: int = 1,
    judge_free: bool = False,
    python: str = sys.executable,
) -> list[str]:
    run_py = str(Path(vlmevalkit_dir) / "run.py")
    if num_processes > 1:
        launcher = [python, "-m", "torch.distributed.run", f"--nproc-per-node={num_processes}", run_py]
    else:
        launcher = [python, run_py]
    cmd = launcher + ["--config", str(config_path), "--work-dir", str(work_dir), "--mode", "all"]
    if judge_free:
        cmd += ["--judge", "exact_matching"]
    return cmd


# ----------------------------------------------------------------------------------------------- parsing


def to_percent(value: float, scale: str) -> float:
    return value * 100.0 if scale == "fraction" else value


def parse_lmms_eval_results(path: str | Path) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from an lmms-eval ``*_results.json`` (filters and stderr dropped)."""
    try:
        results = json.loads(Path(path).read_text())["results"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an lmms-eval results file ({err!r})") from err
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        clean = {}
        for key, value in metrics.items():
            name = key.split(",", 1)[0]
            if name.endswith("_stderr") or name == "alias" or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                clean.setdefault(name, float(value))
        out[task] = clean
    return out


def find_lmms_eval_results(output_path: str | Path) -> list[Path]:
    """The results files lmms-eval writes: ``<output_path>/<model>/<date>_results.json``, oldest first (later
    files win on merge). Other ``*_results.json`` files are not results: MMBench writes
    ``<output_path>/submissions/mmbench_en_dev_results.json``, HallusionBench ``gpt_response/``."""
    files = []
    for folder in sorted(Path(output_path).iterdir()) if Path(output_path).is_dir() else []:
        if folder.is_dir() and folder.name not in ("submissions", "gpt_response"):
            files += [p for p in folder.glob("*_results.json") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime, str(p)))


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


def unfinished_rate(samples_file: Path, results_file: Path | None) -> tuple[int, float | None]:
    """(answers, share a thinking model never finished) in an lmms-eval ``<date>_samples_<task>.jsonl``.

    With ``enable_thinking=True`` (HF simple wrapper) the answer is the text after ``</think>``, empty when the
    thought was cut; otherwise (vLLM) the raw answer is logged and a cut thought has no ``</think>``."""
    model_args = ""
    if results_file is not None and results_file.is_file():
        model_args = str((json.loads(results_file.read_text()).get("config") or {}).get("model_args", ""))
    stripped = "enable_thinking=True" in model_args
    texts = []
    for line in samples_file.read_text().splitlines():
        if line.strip():
            texts += _strings(json.loads(line).get("resps", []))
    if not texts:
        return 0, None
    cut = [(not t.strip()) if stripped else ("</think>" not in t) for t in texts]
    return len(texts), sum(cut) / len(cut)


def _lmms_eval_unfinished(output_path: Path, tasks: tuple[str, ...]) -> dict:
    out = {}
    for task in tasks:
        files = sorted(
            (p for p in Path(output_path).glob(f"*/*_samples_{task}.jsonl") if p.parent.name != "submissions"),
            key=lambda p: (p.stat().st_mtime, str(p)),
        )
        if files:
            results = files[-1].with_name(files[-1].name.split("_samples_")[0] + "_results.json")
            out[task] = unfinished_rate(files[-1], results)[1]
    return out


def collect_lmms_eval(
    plan: dict[str, Entry], benchmarks: list[Benchmark], output_path: str | Path, thinking: bool = False
) -> dict:
    """The table from lmms-eval's results files; for a thinking model (``thinking``) also the share of answers
    whose thought never finished, from the ``--log_samples`` files (``unfinished``; a budget check)."""
    merged: dict[str, dict[str, float]] = {}
    for path in find_lmms_eval_results(output_path):
        merged.update(parse_lmms_eval_results(path))
    table = {}
    for b in benchmarks:
        entry = plan[b.key]
        values, missing = [], []
        for task in entry.names:
            found = [merged.get(task, {})[m] for m in entry.metrics if m in merged.get(task, {})]
            if found:
                values.append(found[0])
            else:
                missing.append(task)
        table[b.key] = _row(b, entry, values, missing, {t: merged.get(t, {}) for t in entry.names})
        if thinking:
            table[b.key]["unfinished"] = _lmms_eval_unfinished(Path(output_path), entry.names)
    return table


def parse_vlmevalkit_csv(path: str | Path, metric: str) -> float:
    """Headline value of one VLMEvalKit score CSV.

    Two layouts occur: metric as a column (``split,Overall,...`` / ``split,aAcc,fAcc,qAcc`` / MMVP's
    ``Average,Overall``), read from the overall row (or the first row); or metric as a row label in the
    first column with the value next to it.
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


def _first_metric(path: Path, metrics: tuple[str, ...]) -> float:
    for metric in metrics[:-1]:
        try:
            return parse_vlmevalkit_csv(path, metric)
        except ValueError:
            continue
    return parse_vlmevalkit_csv(path, metrics[-1])  # the error names the file and what it holds


def find_vlmevalkit_score(work_dir: str | Path, model_label: str, dataset: str) -> Path | None:
    """The score file of the latest run. VLMEvalKit writes ``<work_dir>/<model>/<eval id>/<model>_<dataset>_*``
    and links each into ``<work_dir>/<model>/`` after a run: the link names the latest run. Without a (live)
    link, the newest file in a run folder."""
    model_dir = Path(work_dir) / model_label
    names = [f"{model_label}_{dataset}_{suffix}.csv" for suffix in ("acc", "score")]
    for name in names:
        link = model_dir / name
        if link.exists():  # follows the link; a dangling one is skipped
            return link
    candidates = [p for name in names for p in model_dir.glob(f"*/{name}") if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime, str(p)))


def collect_vlmevalkit(plan: dict[str, Entry], benchmarks: list[Benchmark], work_dir: str | Path, model_label: str):
    table = {}
    for b in benchmarks:
        entry = plan[b.key]
        values, missing, raw = [], [], {}
        for ds in entry.names:
            path = find_vlmevalkit_score(work_dir, model_label, ds)
            if path is None:
                missing.append(ds)
                continue
            raw[ds] = _first_metric(path, entry.metrics)
            values.append(raw[ds])
        table[b.key] = _row(b, entry, values, missing, raw)
    return table


def _row(b: Benchmark, entry: Entry, values: list[float], missing: list[str], raw: dict) -> dict:
    # A benchmark split over several tasks/datasets (VLMEvalKit's CV-Bench 2D + 3D) reports their mean.
    complete = values and not missing
    return {
        "benchmark": b.display,
        "score": round(sum(to_percent(v, entry.scale) for v in values) / len(values), 2) if complete else None,
        "measures": entry.measures,
        "tasks": list(entry.names),
        "metric": entry.metrics[0],
        "judge": entry.judge,
        "checked": entry.checked,
        "missing": missing,
        "raw": raw,
    }


def markdown_table(table: dict[str, dict], title: str = "this recipe", harness: str | None = None) -> str:
    names = [row["benchmark"] for row in table.values()]
    scores = ["—" if row["score"] is None else f"{row['score']:.1f}" for row in table.values()]
    lines = [
        "| model | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        f"| {title} | " + " | ".join(scores) + " |",
    ]
    if harness:
        # the two harnesses measure different things (MMBench v1.0 vs v1.1, CV-Bench pooled vs per source)
        lines += ["", f"Measured with {harness}:"]
        lines += [f"- {row['benchmark']}: {row['measures']} ({row['checked']})" for row in table.values()]
    cut = {row["benchmark"]: r for row in table.values() for r in (row.get("unfinished") or {}).values() if r}
    if cut:
        shares = ", ".join(f"{name} {100 * r:.1f} %" for name, r in cut.items())
        lines += ["", f"WARNING: thoughts cut at the token limit ({shares}): raise dig.decoding.max_new_tokens."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "collect"):
        p = sub.add_parser(name, allow_abbrev=False)
        p.add_argument("--harness", choices=HARNESSES, default="lmms_eval")
        p.add_argument(
            "--out-dir",
            required=True,
            metavar="DIR",
            help="harness output folder (lmms-eval --output_path / VLMEvalKit --work-dir)",
        )
        add_model_arg(p)
        p.add_argument("--model-label", default="dig", help="name VLMEvalKit files are written under")
        p.add_argument("--benchmarks", default=str(BENCHMARKS_FILE), metavar="FILE", help="benchmark list (YAML)")
        p.add_argument("--benchmarks-only", default=None, help="comma list of benchmark keys")
        p.add_argument("--judge-free", action="store_true", help="judge-free variants where the harness has them")
        p.add_argument("--out", default=None, metavar="FILE", help="table JSON (default <out-dir>/perception.json)")
    run = sub.choices["run"]
    run.add_argument("--model-path", required=True, metavar="DIR", help="HF checkpoint folder (e.g. merged stage 3)")
    run.add_argument("--backend", choices=BACKENDS, default="vllm")
    run.add_argument("--num-processes", type=positive_int, default=1)
    run.add_argument("--tensor-parallel-size", type=positive_int, default=1)
    run.add_argument("--batch-size", type=positive_int, default=1)
    run.add_argument("--limit", type=positive_int, default=None, help="at most N samples per task (smoke runs)")
    run.add_argument("--vlmevalkit-dir", default=os.environ.get("VLMEVALKIT_DIR"), help="VLMEvalKit checkout")
    run.add_argument(
        "--allow-unjudged", action="store_true", help="run benchmarks that need a judge without one (loud warning)"
    )
    run.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    return parser


def check_run(args: argparse.Namespace, spec: ModelSpec) -> None:
    """What a run needs, checked before the harness starts (and takes the GPUs): the checkpoint with its
    processor files always; the harness and the backend installed here unless ``--dry-run`` (which only prints)."""
    check_checkpoint(args.model_path, spec.hf_path)
    if args.harness == "vlmevalkit":
        if not args.vlmevalkit_dir or not (Path(args.vlmevalkit_dir) / "run.py").is_file():
            raise CliError("--vlmevalkit-dir (or $VLMEVALKIT_DIR) must be a VLMEvalKit checkout holding run.py")
        if args.backend == "vllm" and args.num_processes > 1:
            raise CliError("VLMEvalKit with vLLM runs one process over all visible GPUs: drop --num-processes")
    if args.dry_run:
        return
    if args.harness == "lmms_eval":
        check_lmms_eval()
    require_backend(args.backend)


LMMS_EVAL_INSTALL = "pip install lmms-eval==0.7.3"


def check_lmms_eval(python: str = sys.executable) -> None:
    """lmms-eval must import in the Python that runs it, not only be present: installed without its dependencies
    (``pip install --no-deps``, as the test venv has it) it dies at its first import, after which the run would
    collect an empty table. The import runs in a child, as the harness will."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise CliError(f"lmms-eval is not installed in this environment: {LMMS_EVAL_INSTALL} (or --dry-run)")
    proc = subprocess.run([python, "-c", "import lmms_eval.__main__"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        cause = lines[-1] if lines else f"exit status {proc.returncode}"
        raise CliError(
            f"lmms-eval is installed but does not import here ({cause}), so it lacks its dependencies: "
            f"{LMMS_EVAL_INSTALL} installs them (or --dry-run)"
        )


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    require_file(args.benchmarks, "--benchmarks")
    benchmarks = select_benchmarks(load_benchmarks(args.benchmarks), args.benchmarks_only)
    spec = load_model_spec(args.model)
    out_dir = Path(args.out_dir)
    if args.command == "run":
        check_run(args, spec)
        plan, warnings = plan_judges(benchmarks, args.harness, args.judge_free, args.allow_unjudged)
        for warning in warnings:
            print(f"eval.harness: WARNING: {warning}", file=sys.stderr, flush=True)
        env = None
        if args.harness == "lmms_eval":
            cmd = lmms_eval_command(
                list(plan.values()),
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
            config_path = out_dir / "vlmevalkit_config.json"
            config = vlmevalkit_config(plan, args.model_path, spec, args.model_label, args.backend)
            atomic_write_text(config_path, json.dumps(config, indent=2))
            cmd = vlmevalkit_command(
                config_path.resolve(), out_dir.resolve(), args.vlmevalkit_dir, args.num_processes, args.judge_free
            )
            env = vlmevalkit_env(spec)
        prefix = "SPLIT_THINK=True " if env and env.get("SPLIT_THINK") else ""
        print(prefix + shlex.join(cmd), flush=True)
        if args.dry_run:
            return 0
        cwd = args.vlmevalkit_dir if args.harness == "vlmevalkit" else None
        rc = subprocess.call(cmd, cwd=cwd, env=env)
        if rc != 0:
            print(f"eval.harness: the harness exited with {rc}; collecting whatever it wrote", file=sys.stderr)
    else:
        rc = 0
        if not out_dir.is_dir():
            raise CliError(f"--out-dir {out_dir}: no such folder (the harness output of `{PROG} run`)")
        plan = {b.key: b.entry(args.harness, args.judge_free) for b in benchmarks}
    if args.harness == "lmms_eval":
        table = collect_lmms_eval(plan, benchmarks, out_dir, thinking=spec.require_think)
    else:
        table = collect_vlmevalkit(plan, benchmarks, out_dir, args.model_label)
    out = Path(args.out) if args.out else out_dir / "perception.json"
    atomic_write_text(out, json.dumps({"harness": args.harness, "benchmarks": table}, indent=2))
    md = markdown_table(table, harness=args.harness)
    atomic_write_text(out.with_suffix(".md"), md + "\n")
    print(md)
    if rc != 0:  # the tool ran and its check failed (docs/cli.md): the table holds only what the harness wrote
        print(f"eval.harness: the harness failed (exit {rc}); {out} holds what it wrote before", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
