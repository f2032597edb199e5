"""eval.harness against the real lmms-eval 0.7.3 package (its task YAMLs, argument parser and model wrappers,
read from the installed files) and on result folders laid out as lmms-eval and VLMEvalKit write them."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from dig_common.models import load_model_spec
from eval import harness
from eval.refcoco import DATASETS as REFCOCO_DATASETS

PAPER_LIST = {"hallusionbench", "vstar", "mmvp", "cv_bench", "mmstar", "mmbench", "ai2d", "pope"}
LMMS_EVAL_VERSION = "0.7.3"
# VLMEvalKit is not on PyPI: its names were read at this commit (2026-08-18) of open-compass/VLMEvalKit.
# dataset -> (class holding its DATASET_URL, metric column of its score file), from vlmeval/dataset/*.py.
VLMEVALKIT_COMMIT = "e8e78f05f3080fe28154f2130321f17951c3be94"
VLMEVALKIT_FACTS = {
    "HallusionBench": ("ImageYORNDataset", "aAcc"),
    "VStarBench": ("ImageMCQDataset", "Overall"),
    "MMVP": ("ImageMCQDataset", "Average"),  # report_acc_MMVP: Average per question, Overall per pair
    "CV-Bench-2D": ("CVBench", "Overall"),
    "CV-Bench-3D": ("CVBench", "Overall"),
    "MMStar": ("ImageMCQDataset", "Overall"),
    "MMBench_DEV_EN_V11": ("ImageMCQDataset", "Overall"),
    "AI2D_TEST": ("ImageMCQDataset", "Overall"),
    "POPE": ("ImageYORNDataset", "Overall"),
}
NO_KEY: dict[str, str] = {}
WITH_KEY = {"OPENAI_API_KEY": "sk-test"}


# ----------------------------------------------------------------------------------------------- the real lmms-eval


def lmms_eval_dir() -> Path:
    """The installed lmms-eval package folder (found without importing it: its __init__ pulls heavy deps)."""
    spec = importlib.util.find_spec("lmms_eval")
    assert spec is not None and spec.submodule_search_locations, (
        "lmms-eval is not installed in the test env: `pip install --no-deps lmms-eval==0.7.3` "
        "(scripts/setup_env.sh test does it)"
    )
    return Path(next(iter(spec.submodule_search_locations)))


def lmms_eval_functions(relative: str, names: set[str], namespace: dict) -> dict:
    """Top-level functions of an installed lmms-eval module, run from its own source. lmms_eval/__main__.py
    and utils.py import torch, loguru, openai, the evaluator ... at module level (its heavy dependencies
    are not installed here); the functions used below need only what ``namespace`` gives them."""
    path = lmms_eval_dir() / relative
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {n.name for n in body} == names, f"{path} lacks {names - {n.name for n in body}}"
    scope = dict(namespace)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), scope)
    return scope


class _TaskLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # ~1900 task files: C loader if built
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _task_config(path: Path) -> dict:
    config = yaml.load(path.read_text(), Loader=_TaskLoader) or {}
    if isinstance(config, dict) and "include" in config:
        base = _task_config(path.parent / config.pop("include"))
        config = {**base, **config}
    return config if isinstance(config, dict) else {}


@functools.cache
def lmms_eval_tasks() -> dict[str, dict]:
    """``{task name: config}`` from every task YAML of the installed lmms-eval (includes resolved)."""
    tasks = {}
    for path in sorted((lmms_eval_dir() / "tasks").rglob("*.yaml")):
        config = _task_config(path)
        if isinstance(config.get("task"), str):
            tasks[config["task"]] = {**config, "__file__": str(path)}
    return tasks


def lmms_eval_parser():
    """lmms-eval's own ``parse_eval_args`` (lmms_eval/__main__.py) as a function of argv."""
    scope = lmms_eval_functions(
        "__main__.py",
        {"parse_eval_args", "_int_or_none_list_arg_type", "_positive_int_arg_type"},
        {"argparse": argparse, "partial": functools.partial},
    )

    def parse(argv: list[str]) -> argparse.Namespace:
        saved = os.sys.argv
        os.sys.argv = ["lmms_eval", *argv]
        try:
            return scope["parse_eval_args"]()[1]
        finally:
            os.sys.argv = saved

    return parse


def lmms_eval_args_string():
    """lmms-eval's own ``simple_parse_args_string`` (lmms_eval/utils.py): how --model_args/--gen_kwargs are read."""
    names = {"simple_parse_args_string", "_smart_comma_split", "handle_arg_string"}
    return lmms_eval_functions("utils.py", names, {})["simple_parse_args_string"]


def init_parameters(relative: str, class_name: str) -> set[str]:
    """Named parameters of a model wrapper's ``__init__`` in the installed lmms-eval."""
    tree = ast.parse((lmms_eval_dir() / relative).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}


def test_installed_lmms_eval_is_the_checked_version():
    assert importlib.metadata.version("lmms-eval") == LMMS_EVAL_VERSION
    for b in harness.load_benchmarks().values():
        assert b.entries["lmms_eval"].checked == f"lmms-eval {LMMS_EVAL_VERSION}", b.key
        assert b.entries["vlmevalkit"].checked == f"VLMEvalKit {VLMEVALKIT_COMMIT[:7]}", b.key
    assert VLMEVALKIT_COMMIT in harness.BENCHMARKS_FILE.read_text()  # the full commit is documented there


def test_every_lmms_eval_task_and_metric_exists_in_the_package():
    tasks = lmms_eval_tasks()
    checked = 0
    for b in harness.load_benchmarks().values():
        for entry in filter(None, (b.entries["lmms_eval"], b.entries["lmms_eval"].judge_free)):
            for task in entry.names:
                if task not in tasks:
                    pytest.fail(f"{b.key}: lmms-eval {LMMS_EVAL_VERSION} has no task {task!r}")
                metrics = [m["metric"] for m in tasks[task].get("metric_list", [])]
                assert entry.metrics[0] in metrics, f"{b.key}: task {task} has metrics {metrics}"
                checked += 1
    assert checked == 9  # eight benchmarks + MMBench's judge-free task


def test_judge_needs_match_the_package():
    """Judged lmms-eval tasks live next to code that reads an OpenAI key; the judge-free ones do not (MMBench's
    static task shares its folder with the judged one but aggregates with eval_method="static")."""
    tasks = lmms_eval_tasks()
    for b in harness.load_benchmarks().values():
        entry = b.entries["lmms_eval"]
        folder = Path(tasks[entry.names[0]]["__file__"]).parent
        reads_key = any("OPENAI_API_KEY" in p.read_text() for p in folder.glob("*.py"))
        assert reads_key == (entry.judge == "required"), b.key
    static = tasks["mmbench_en_dev_static"]["metric_list"][0]["aggregation"].split(".")[-1]
    assert f"def {static}(results, args):" in (lmms_eval_dir() / "tasks/mmbench/en_utils.py").read_text()
    assert 'eval_method="static"' in (lmms_eval_dir() / "tasks/mmbench/en_utils.py").read_text()


def test_refcoco_data_addresses_are_lmms_eval_s():
    tasks = lmms_eval_tasks()
    for key, (folder, _) in REFCOCO_DATASETS.items():
        config = tasks[f"{key}_bbox_rec_val"]
        assert config["dataset_path"] == f"lmms-lab-encoder/{folder}"
        assert "refcoco_ACC@0.5" in [m["metric"] for m in config["metric_list"]]


@pytest.mark.parametrize("backend", ["hf", "vllm"])
@pytest.mark.parametrize("model", ["qwen3_vl_8b_thinking", "qwen3_vl_8b_instruct", "qwen2_5_vl_7b"])
def test_lmms_eval_command_parses_with_lmms_eval_s_own_parser(model, backend):
    spec = load_model_spec(model)
    plan, _ = harness.plan_judges(list(harness.load_benchmarks().values()), "lmms_eval", env=WITH_KEY)
    cmd = harness.lmms_eval_command(list(plan.values()), "/ckpt", spec, "/out", backend=backend, limit=8, python="py")
    argv = cmd[cmd.index("lmms_eval") + 1 :]
    args = lmms_eval_parser()(argv)
    parse_kwargs = lmms_eval_args_string()
    model_args, gen_kwargs = parse_kwargs(args.model_args), parse_kwargs(args.gen_kwargs)
    dec = spec.decoding

    assert args.tasks.split(",") == [t for e in plan.values() for t in e.names]
    assert args.output_path == "/out" and args.log_samples and args.limit == 8
    assert args.seed == [dec.seed] * 4
    # the model file's token budget replaces each task's own (16 tokens for vstar/mmvp/ai2d)
    assert gen_kwargs["max_new_tokens"] == dec.max_new_tokens
    assert gen_kwargs["temperature"] == dec.temperature
    if dec.greedy:
        assert gen_kwargs["do_sample"] is False
    else:
        assert gen_kwargs["top_p"] == dec.top_p and gen_kwargs["top_k"] == dec.top_k
    if backend == "hf":
        assert args.model == spec.family and args.force_simple  # the simple wrapper applies the pixel bounds
        module = f"models/simple/{spec.family}.py"
        accepted = init_parameters(module, {"qwen3_vl": "Qwen3_VL", "qwen2_5_vl": "Qwen2_5_VL"}[spec.family])
        assert set(model_args) <= accepted, set(model_args) - accepted  # the wrapper asserts kwargs == {}
        assert (model_args["min_pixels"], model_args["max_pixels"]) == (spec.min_pixels, spec.max_pixels)
        assert model_args.get("enable_thinking", False) is spec.require_think
        assert "presence_penalty" not in gen_kwargs  # HF generate has none; the docs say so
    else:
        assert args.model == "vllm"
        assert {"model", "tensor_parallel_size", "max_new_tokens"} <= init_parameters("models/simple/vllm.py", "VLLM")
        # unknown keys go to vllm.LLM; JSON-looking strings become dicts (models/simple/vllm.py)
        assert json.loads(model_args["mm_processor_kwargs"]) == {
            "min_pixels": spec.min_pixels,
            "max_pixels": spec.max_pixels,
        }
        assert model_args["max_new_tokens"] == dec.max_new_tokens
        assert gen_kwargs.get("presence_penalty", 0.0) == dec.presence_penalty
        assert gen_kwargs.get("seed", dec.seed) == dec.seed and (dec.greedy or "seed" in gen_kwargs)
        sampling_keys = ("max_new_tokens", "temperature", "top_p", "seed", "top_k", "presence_penalty", "do_sample")
        assert set(gen_kwargs) <= set(sampling_keys)
        assert "n" not in gen_kwargs  # lmms-eval's vLLM wrapper accepts only n=1


def test_lmms_eval_command_refuses_a_path_it_would_split():
    spec = load_model_spec("qwen3_vl_8b_thinking")
    with pytest.raises(ValueError, match="splits --model_args at commas"):
        harness.lmms_eval_command([], "/ckpt/a,b", spec, "/out")


def test_lmms_eval_gen_kwargs_are_read_by_the_hf_wrapper():
    """Every key we send is one Qwen3_VL._build_generate_kwargs passes to generate()."""
    source = (lmms_eval_dir() / "models/simple/qwen3_vl.py").read_text()
    for backend_key in harness.lmms_eval_gen_kwargs(load_model_spec("qwen3_vl_8b_thinking").decoding, "hf"):
        assert f'"{backend_key}"' in source, backend_key


# ----------------------------------------------------------------------------------------------- the list and judges


def test_benchmark_list_covers_the_paper_and_records_judges():
    benchmarks = harness.load_benchmarks()
    assert set(benchmarks) == PAPER_LIST
    judged = {k for k, b in benchmarks.items() if b.entries["lmms_eval"].judge == "required"}
    assert judged == {"hallusionbench", "mmbench"}
    assert benchmarks["mmbench"].entry("lmms_eval", judge_free=True).names == ("mmbench_en_dev_static",)
    assert benchmarks["hallusionbench"].entry("lmms_eval", judge_free=True).judge == "required"  # no variant
    with pytest.raises(ValueError, match="unknown nope"):
        harness.select_benchmarks(benchmarks, "mmstar,nope")


def test_vlmevalkit_names_are_the_pinned_commit_s():
    for b in harness.load_benchmarks().values():
        entry = b.entries["vlmevalkit"]
        for ds in entry.names:
            cls, metric = VLMEVALKIT_FACTS[ds]
            assert (entry.dataset_class, entry.metrics[0]) == (cls, metric), ds


def test_benchmark_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("benchmarks:\n  x: {display: X, lmms_eval: {tasks: [x]}}\n")
    with pytest.raises(ValueError, match="benchmark 'x' lacks"):
        harness.load_benchmarks(bad)
    good = yaml.safe_load(harness.BENCHMARKS_FILE.read_text())["benchmarks"]["pope"]
    good["lmms_eval"]["judge"] = "maybe"
    bad.write_text(yaml.safe_dump({"benchmarks": {"pope": good}}))
    with pytest.raises(ValueError, match="'pope' \\(lmms_eval\\): judge must be one of"):
        harness.load_benchmarks(bad)


def test_judged_benchmarks_are_refused_without_a_key_by_name():
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), "hallusionbench,mmbench,pope")
    with pytest.raises(harness.JudgeError) as err:
        harness.plan_judges(benchmarks, "lmms_eval", env=NO_KEY)
    message = str(err.value)
    assert "HallusionBench (hallusion_bench_image) needs an API judge and OPENAI_API_KEY is not set" in message
    assert "--harness vlmevalkit" in message  # HallusionBench's way out
    assert "--judge-free runs mmbench_en_dev_static" in message  # MMBench's
    assert "POPE" not in message
    # the judge-free variant where one exists; HallusionBench still refused
    with pytest.raises(harness.JudgeError, match="HallusionBench") as err:
        harness.plan_judges(benchmarks, "lmms_eval", judge_free=True, env=NO_KEY)
    assert "MMBench" not in str(err.value)
    plan, warnings = harness.plan_judges(benchmarks[1:], "lmms_eval", judge_free=True, env=NO_KEY)
    assert plan["mmbench"].names == ("mmbench_en_dev_static",) and warnings == []
    # a placeholder is no key; azure reads its own variable
    with pytest.raises(harness.JudgeError):
        harness.plan_judges(benchmarks, "lmms_eval", env={"OPENAI_API_KEY": "YOUR_API_KEY"})
    with pytest.raises(harness.JudgeError, match="AZURE_API_KEY"):
        harness.plan_judges(benchmarks, "lmms_eval", env={"API_TYPE": "azure", **WITH_KEY})
    plan, warnings = harness.plan_judges(benchmarks, "lmms_eval", env=WITH_KEY)
    assert plan["mmbench"].names == ("mmbench_en_dev",) and warnings == []
    plan, warnings = harness.plan_judges(benchmarks, "lmms_eval", allow_unjudged=True, env=NO_KEY)
    assert len(warnings) == 2 and all("score is meaningless" in w for w in warnings)
    # VLMEvalKit's judges only extract answers: a warning per benchmark, no refusal
    plan, warnings = harness.plan_judges(benchmarks, "vlmevalkit", env=NO_KEY)
    assert len(warnings) == 3 and "HallusionBench (HallusionBench): no OPENAI_API_KEY" in warnings[0]
    assert harness.plan_judges(benchmarks, "vlmevalkit", judge_free=True, env=NO_KEY)[1] == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real (tiny) checkpoint folder: `run` checks --model-path before it builds a command."""
    from tiny_qwen import save_tiny_checkpoint

    return save_tiny_checkpoint("qwen3_vl", tmp_path_factory.mktemp("ckpt"))


def test_cli_refuses_a_judged_benchmark_and_runs_its_judge_free_variant(tmp_path, capsys, monkeypatch, checkpoint):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    base = ["run", "--model-path", str(checkpoint), "--out-dir", str(tmp_path), "--dry-run", "--benchmarks-only"]
    assert harness.main([*base, "mmbench,mmstar"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m eval.harness: error: MMBench (mmbench_en_dev) needs an API judge")
    assert harness.main([*base, "mmbench,mmstar", "--judge-free"]) == 0
    assert "--tasks mmbench_en_dev_static,mmstar" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- VLMEvalKit config


def test_vlmevalkit_config_and_command(tmp_path):
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), "hallusionbench,cv_bench,mmvp")
    spec = load_model_spec("qwen3_vl_4b_thinking")
    plan, _ = harness.plan_judges(benchmarks, "vlmevalkit", env=WITH_KEY)
    config = harness.vlmevalkit_config(plan, "/ckpt", spec, "dig4b", backend="vllm")
    dec = spec.decoding
    assert config["model"] == {
        "dig4b": {
            "class": "Qwen3VLChat",
            "model_path": "/ckpt",
            "min_pixels": spec.min_pixels,
            "max_pixels": spec.max_pixels,
            "max_new_tokens": dec.max_new_tokens,
            "temperature": 1.0,
            "top_p": 0.95,
            "top_k": 20,
            "repetition_penalty": 1.0,
            "do_sample": True,
            "use_vllm": True,
            "presence_penalty": 0.0,
            "use_custom_prompt": False,
        }
    }
    assert config["data"] == {
        "HallusionBench": {"class": "ImageYORNDataset", "dataset": "HallusionBench"},
        "CV-Bench-2D": {"class": "CVBench", "dataset": "CV-Bench-2D"},
        "CV-Bench-3D": {"class": "CVBench", "dataset": "CV-Bench-3D"},
        "MMVP": {"class": "ImageMCQDataset", "dataset": "MMVP"},
    }
    assert harness.vlmevalkit_env(spec, {})["SPLIT_THINK"] == "True"
    assert "SPLIT_THINK" not in harness.vlmevalkit_env(load_model_spec("qwen2_5_vl_7b"), {})
    greedy = harness.vlmevalkit_model_entry("/ckpt", load_model_spec("qwen2_5_vl_7b"), "hf")
    assert greedy["class"] == "Qwen2VLChat" and greedy["do_sample"] is False and "presence_penalty" not in greedy
    cmd = harness.vlmevalkit_command("/c.json", "/w", "/vlmeval", num_processes=8, judge_free=True, python="py")
    flags = ["--config", "/c.json", "--work-dir", "/w", "--mode", "all", "--judge", "exact_matching"]
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc-per-node=8", "/vlmeval/run.py", *flags]


# ----------------------------------------------------------------------------------------------- lmms-eval layout


def write_lmms_eval_run(
    out: Path, model_dir: str, date: str, results: dict, model_args: str = "model=/ckpt/stage3_hf", resps=("A",)
) -> Path:
    """One lmms-eval run as 0.7.3 writes it (loggers/evaluation_tracker.py, tasks/_task_utils/file_utils.py)."""
    folder = out / model_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{date}_results.json"
    path.write_text(
        json.dumps(
            {
                "results": results,
                "group_subtasks": {t: [] for t in results},
                "configs": {t: {} for t in results},
                "versions": {t: 0.0 for t in results},
                "n-shot": {t: 0 for t in results},
                "higher_is_better": {t: {} for t in results},
                "n-samples": {t: {"original": 10, "effective": 10} for t in results},
                "config": {"model": "vllm", "model_args": model_args, "batch_size": "1", "limit": None},
                "git_hash": None,
                "date": date,
                "task_hashes": {},
                "model_source": "vllm",
                "model_name": "/ckpt/stage3_hf",
                "model_name_sanitized": model_dir,
                "total_evaluation_time_seconds": "12.5",
            }
        )
    )
    for task in results:
        lines = [{"doc_id": i, "target": "A", "resps": [r], "filtered_resps": r} for i, r in enumerate(resps)]
        (folder / f"{date}_samples_{task}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_collect_lmms_eval_real_layout(tmp_path):
    out = tmp_path / "lmms"
    write_lmms_eval_run(
        out,
        "ckpt__stage3_hf",
        "2026-12-01T10-00-00.123456",
        {
            "mmstar": {"alias": "mmstar", "average,none": 0.617, "average_stderr,none": "N/A", "math,none": 0.5},
            "pope": {"alias": "pope", "pope_accuracy,none": 0.87, "pope_f1_score,none": 0.885},
            "ai2d": {
                "alias": "ai2d",
                "exact_match,flexible-extract": 0.82,
                "exact_match_stderr,flexible-extract": 0.01,
            },
            "vstar_bench": {"alias": "vstar_bench", "vstar_overall_acc,none": 79.1},
            "mmbench_en_dev_static": {
                "alias": "mmbench_en_dev_static",
                "gpt_eval_score,none": 84.5,
                "submission,none": None,
            },
            "cv_bench": {"alias": "cv_bench", "cv_bench_acc,none": 0.75},
        },
    )
    # what MMBench and HallusionBench write next to the model folders: not results files
    (out / "submissions").mkdir()
    (out / "submissions" / "mmbench_en_dev_static_results.json").write_text(
        json.dumps({"overall_acc": 0.845, "category_acc": {}, "l2_category_acc": {}})
    )
    (out / "submissions" / "mmbench_en_dev_results.xlsx").write_bytes(b"PK")
    (out / "gpt_response").mkdir()
    (out / "gpt_response" / "hallusion_output_vd_model.json").write_text("[]")
    # a later rerun of one task wins over the earlier file
    later = write_lmms_eval_run(
        out, "ckpt__stage3_hf", "2026-12-01T11-00-00.000001", {"mmstar": {"average,none": 0.65}}
    )
    os.utime(later, (time.time() + 10, time.time() + 10))
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), "mmstar,pope,ai2d,vstar,mmvp,mmbench,cv_bench")
    plan = {b.key: b.entry("lmms_eval", judge_free=True) for b in benchmarks}
    table = harness.collect_lmms_eval(plan, benchmarks, out)
    assert table["mmstar"]["score"] == 65.0
    assert table["pope"]["score"] == 88.5
    assert table["ai2d"]["score"] == 82.0
    assert table["vstar"]["score"] == 79.1  # written as a percentage
    assert table["mmbench"]["score"] == 84.5 and table["mmbench"]["tasks"] == ["mmbench_en_dev_static"]
    assert table["cv_bench"]["score"] == 75.0 and "pooled" in table["cv_bench"]["measures"]
    assert table["mmvp"]["score"] is None and table["mmvp"]["missing"] == ["mmvp"]
    md = harness.markdown_table(table, harness="lmms_eval")
    assert md.splitlines()[0] == "| model | MMStar | POPE | AI2D | V* | MMVP | MMBench | CV-Bench |"
    assert md.splitlines()[2] == "| this recipe | 65.0 | 88.5 | 82.0 | 79.1 | — | 84.5 | 75.0 |"
    assert "- MMBench: MMBench v1.0 EN dev, circular, rule-extracted options (lmms-eval 0.7.3)" in md


@pytest.mark.parametrize(
    "model_args, resps",
    [
        ("model=/ckpt,max_new_tokens=4096", ["a long thought</think>B", "a thought cut at the lim"]),  # vLLM: raw
        ("pretrained=/ckpt,min_pixels=65536,enable_thinking=True", ["B", ""]),  # HF simple: after </think>
    ],
)
def test_collect_lmms_eval_reports_thoughts_cut_at_the_limit(tmp_path, model_args, resps):
    out = tmp_path / "lmms"
    write_lmms_eval_run(out, "ckpt", "2026-12-01T10-00-00", {"mmvp": {"mmvp_accuracy,none": 0.5}}, model_args, resps)
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), "mmvp")
    plan = {"mmvp": benchmarks[0].entry("lmms_eval")}
    table = harness.collect_lmms_eval(plan, benchmarks, out, thinking=True)
    assert table["mmvp"]["unfinished"] == {"mmvp": 0.5}
    assert "WARNING: thoughts cut at the token limit (MMVP 50.0 %)" in harness.markdown_table(table)
    assert "unfinished" not in harness.collect_lmms_eval(plan, benchmarks, out)["mmvp"]


def test_parse_lmms_eval_rejects_other_files(tmp_path):
    bad = tmp_path / "x_results.json"
    bad.write_text(json.dumps({"overall_acc": 0.8}))
    with pytest.raises(ValueError, match="not an lmms-eval results file"):
        harness.parse_lmms_eval_results(bad)


# ----------------------------------------------------------------------------------------------- VLMEvalKit layout


def write_vlmevalkit_run(work: Path, model: str, eval_id: str, files: dict[str, str], link: bool = True) -> Path:
    """One VLMEvalKit run (run.py): ``<work>/<model>/<eval id>/<model>_<dataset>*`` plus relative symlinks
    to each in ``<work>/<model>/`` (what run.py makes after a dataset is evaluated)."""
    run = work / model / eval_id
    run.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (run / name).write_text(text)
        if link:
            target = work / model / name
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(Path(eval_id) / name)
    return run


def test_collect_vlmevalkit_real_layout(tmp_path):
    work = tmp_path / "work"
    write_vlmevalkit_run(
        work,
        "dig",
        "T20261201-100000",
        {
            "dig_MMStar.xlsx": "predictions",
            "dig_MMStar_acc.csv": "split,Overall,coarse perception,math\nnone,0.60,0.8,0.6\n",
            "status.json": "{}",
        },
    )
    write_vlmevalkit_run(
        work,
        "dig",
        "T20261201-110000",
        {
            "dig_MMStar_acc.csv": "split,Overall,coarse perception,math\nnone,0.702,0.8,0.6\n",  # the link's target now
            "dig_HallusionBench_score.csv": "split,aAcc,fAcc,qAcc\nOverall,73.8,50.2,48.9\nVD,70.0,40.0,41.0\n",
            "dig_CV-Bench-2D_acc.csv": "split,ADE20K,COCO,Overall\n2D,0.78,0.82,0.80\n",
            "dig_CV-Bench-3D_acc.csv": "split,Overall,Depth,Distance\n3D,0.70,0.72,0.68\n",
            "dig_POPE_score.csv": "split,Overall,acc,precision,recall\nOverall,88.5,87.0,90.1,86.0\nadversarial,86.0,85,88,84\n",
            "dig_MMVP_acc.csv": "Average,Overall\n0.79,0.62\n",
        },
    )
    # a run folder whose link was removed and a dangling link: the newest run folder's file is used
    write_vlmevalkit_run(
        work, "dig", "T20261201-120000", {"dig_AI2D_TEST_acc.csv": "split,Overall\nnone,0.84\n"}, link=False
    )
    (work / "dig" / "dig_AI2D_TEST_acc.csv").symlink_to("T20261130-000000/dig_AI2D_TEST_acc.csv")
    benchmarks = harness.select_benchmarks(
        harness.load_benchmarks(), "mmstar,hallusionbench,cv_bench,pope,mmvp,ai2d,vstar"
    )
    plan = {b.key: b.entry("vlmevalkit") for b in benchmarks}
    table = harness.collect_vlmevalkit(plan, benchmarks, work, "dig")
    assert table["mmstar"]["score"] == 70.2  # the latest run, through the link
    assert table["hallusionbench"]["score"] == 73.8
    assert table["cv_bench"]["score"] == 75.0  # mean of 2D and 3D
    assert table["pope"]["score"] == 88.5
    assert table["mmvp"]["score"] == 79.0  # question accuracy (Average), not the pair score
    assert table["ai2d"]["score"] == 84.0
    assert table["vstar"]["score"] is None and table["vstar"]["missing"] == ["VStarBench"]


def test_vlmevalkit_csv_metric_as_row_label(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("metric,value\naAcc,71.5\nqAcc,44.0\n")
    assert harness.parse_vlmevalkit_csv(path, "qAcc") == 44.0
    with pytest.raises(ValueError, match="no column or row named 'fAcc'"):
        harness.parse_vlmevalkit_csv(path, "fAcc")


def test_cli_dry_run_and_collect(tmp_path, capsys, checkpoint):
    out = tmp_path / "lmms"
    run = ["run", "--model-path", str(checkpoint), "--out-dir", str(out), "--dry-run", "--backend", "vllm"]
    rc = harness.main([*run, "--benchmarks-only", "mmstar"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "--tasks mmstar" in printed and "--gen_kwargs max_new_tokens=4096,temperature=1.0" in printed
    write_lmms_eval_run(out, "ckpt", "2026-12-01T10-00-00", {"mmstar": {"average,none": 0.5}})
    assert harness.main(["collect", "--out-dir", str(out), "--benchmarks-only", "mmstar,pope"]) == 0
    saved = json.loads((out / "perception.json").read_text())
    assert saved["benchmarks"]["mmstar"]["score"] == 50.0
    assert (out / "perception.md").read_text().startswith("| model | MMStar | POPE |")


def test_metric_candidates_first_present_wins(tmp_path):
    listing = tmp_path / "b.yaml"
    block = "metric: [new_name, aAcc], scale: percent, judge: none, measures: m, checked: c"
    listing.write_text(
        f"benchmarks:\n  hb:\n    display: HB\n    lmms_eval: {{tasks: [hb], {block}}}\n"
        f"    vlmevalkit: {{datasets: [HallusionBench], class: ImageYORNDataset, {block}}}\n"
    )
    benchmarks = list(harness.load_benchmarks(listing).values())
    write_lmms_eval_run(tmp_path / "out", "m", "x", {"hb": {"aAcc,none": 70.0, "qAcc,none": 40.0}})
    plan = {"hb": benchmarks[0].entry("lmms_eval")}
    assert harness.collect_lmms_eval(plan, benchmarks, tmp_path / "out")["hb"]["score"] == 70.0


# What each paper column means, pinned here apart from eval/benchmarks.yaml (the file under test): a metric that
# exists in the task but measures something else (MMVP's pair score, POPE's accuracy, one MMStar category) fails.
LMMS_EVAL_MEANING = {
    "hallusionbench": "aAcc",  # question accuracy; fAcc / qAcc are figure / question-pair accuracies
    "vstar": "vstar_overall_acc",  # over both sub-tasks, not vstar_attribute_acc / vstar_spatial_acc
    "mmvp": "mmvp_accuracy",  # per question; mmvp_pair_accuracy is the pair score
    "cv_bench": "cv_bench_acc",  # pooled over 2D and 3D
    "mmstar": "average",  # mean of the six categories, not one of them
    "mmbench": "gpt_eval_score",  # the circular-evaluation score (the static task keeps the name)
    "ai2d": "exact_match",
    "pope": "pope_f1_score",  # the paper's POPE column is F1, not pope_accuracy
}


def test_collect_takes_the_metric_the_paper_reports_from_every_metric_the_task_writes(tmp_path):
    """Every metric the installed task declares is in the results file, each with its own value: the collected
    score must be the one of the metric the paper reports (meaning), not just a metric that exists."""
    assert set(LMMS_EVAL_MEANING) == PAPER_LIST
    tasks = lmms_eval_tasks()
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), ",".join(sorted(PAPER_LIST)))
    for judge_free in (False, True):
        plan = {b.key: b.entry("lmms_eval", judge_free=judge_free) for b in benchmarks}
        results, expected = {}, {}
        for b in benchmarks:
            entry = plan[b.key]
            for task in entry.names:
                metrics = [m["metric"] for m in tasks[task].get("metric_list", [])]
                assert LMMS_EVAL_MEANING[b.key] in metrics, (b.key, task, metrics)
                values = {m: round(0.1 + 0.05 * i, 2) for i, m in enumerate(metrics)}
                results[task] = {"alias": task, **{f"{m},none": v for m, v in values.items()}}
                value = values[LMMS_EVAL_MEANING[b.key]]
                expected[b.key] = harness.to_percent(value, entry.scale)
        out = tmp_path / f"judge_free_{judge_free}"
        write_lmms_eval_run(out, "ckpt", "2026-12-01T10-00-00", results)
        table = harness.collect_lmms_eval(plan, benchmarks, out)
        assert {k: table[k]["score"] for k in expected} == pytest.approx(expected)
