"""eval.harness: command construction and result-file parsing for lmms-eval and VLMEvalKit (no harness data)."""

from __future__ import annotations

import json
import os
import time

import pytest

from eval import harness
from recipes.dig.models import load_model_spec

PAPER_LIST = {"hallusionbench", "vstar", "mmvp", "cv_bench", "mmstar", "mmbench", "ai2d", "pope"}


def test_benchmark_list_covers_the_paper():
    benchmarks = harness.load_benchmarks()
    assert set(benchmarks) == PAPER_LIST
    assert benchmarks["cv_bench"].vlmeval_datasets == ("CV-Bench-2D", "CV-Bench-3D")
    with pytest.raises(ValueError, match="unknown nope"):
        harness.select_benchmarks(benchmarks, "mmstar,nope")


def test_benchmark_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("benchmarks:\n  x: {display: X, lmms_eval: {tasks: [x]}}\n")
    with pytest.raises(ValueError, match="benchmark 'x' lacks"):
        harness.load_benchmarks(bad)


def test_lmms_eval_command_hf_and_vllm():
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), "mmstar,pope,cv_bench")
    spec = load_model_spec("qwen2_5_vl_7b")
    cmd = harness.lmms_eval_command(benchmarks, "/ckpt", spec, "/out", backend="hf", num_processes=4, python="py")
    assert cmd[:4] == ["py", "-m", "accelerate.commands.launch", "--num_processes=4"]
    assert cmd[cmd.index("--model") + 1] == "qwen2_5_vl"
    bounds = f"min_pixels={spec.min_pixels},max_pixels={spec.max_pixels}"  # from the model's config file
    assert cmd[cmd.index("--model_args") + 1] == f"pretrained=/ckpt,{bounds}"
    assert cmd[cmd.index("--tasks") + 1] == "mmstar,pope,cv_bench"
    assert cmd[cmd.index("--output_path") + 1] == "/out"
    cmd = harness.lmms_eval_command(
        benchmarks, "/ckpt", load_model_spec("qwen3_vl_8b_thinking"), "/out", backend="vllm", tensor_parallel_size=2,
        limit=8, python="py",
    )  # fmt: skip
    assert cmd[:3] == ["py", "-m", "lmms_eval"]
    assert cmd[cmd.index("--model") + 1] == "vllm"
    assert cmd[cmd.index("--model_args") + 1] == "model=/ckpt,tensor_parallel_size=2"
    assert cmd[cmd.index("--limit") + 1] == "8"


def test_vlmevalkit_config_and_command(tmp_path):
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), "hallusionbench,cv_bench")
    spec = load_model_spec("qwen3_vl_4b_thinking")
    config = harness.vlmevalkit_config(benchmarks, "/ckpt", spec, "dig4b")
    assert config["model"] == {
        "dig4b": {"class": "Qwen3VLChat", "model_path": "/ckpt", "min_pixels": spec.min_pixels,
                  "max_pixels": spec.max_pixels}
    }  # fmt: skip
    assert config["data"] == {
        "HallusionBench": {"class": "ImageYORNDataset", "dataset": "HallusionBench"},
        "CV-Bench-2D": {"class": "ImageMCQDataset", "dataset": "CV-Bench-2D"},
        "CV-Bench-3D": {"class": "ImageMCQDataset", "dataset": "CV-Bench-3D"},
    }
    cmd = harness.vlmevalkit_command("/c.json", "/w", "/vlmeval", num_processes=8, python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc-per-node=8", "/vlmeval/run.py",
                   "--config", "/c.json", "--work-dir", "/w", "--mode", "all"]  # fmt: skip


def lmms_results(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "configs": {}, "versions": {}}))


def test_collect_lmms_eval(tmp_path):
    out = tmp_path / "lmms"
    lmms_results(out / "ckpt" / "2026-12-01T10-00-00_results.json", {
        "mmstar": {"alias": "mmstar", "average,none": 0.617, "average_stderr,none": "N/A"},
        "pope": {"alias": "pope", "pope_accuracy,none": 0.87, "pope_f1_score,none": 0.885},
        "ai2d": {"alias": "ai2d", "exact_match,flexible-extract": 0.82, "exact_match_stderr,flexible-extract": 0.01},
        "vstar_bench": {"alias": "vstar_bench", "vstar_overall_acc,none": 79.1},
    })  # fmt: skip
    # a later rerun of one task wins over the earlier file
    later = out / "ckpt" / "2026-12-01T11-00-00_results.json"
    lmms_results(later, {"mmstar": {"average,none": 0.65}})
    os.utime(later, (time.time() + 10, time.time() + 10))
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), "mmstar,pope,ai2d,vstar,mmvp")
    table = harness.collect_lmms_eval(benchmarks, out)
    assert table["mmstar"]["score"] == 65.0
    assert table["pope"]["score"] == 88.5
    assert table["ai2d"]["score"] == 82.0
    assert table["vstar"]["score"] == 79.1  # already a percentage
    assert table["mmvp"]["score"] is None and table["mmvp"]["missing"] == ["mmvp"]
    md = harness.markdown_table(table)
    assert md.splitlines()[0] == "| model | MMStar | POPE | AI2D | V* | MMVP |"
    assert md.splitlines()[2] == "| this recipe | 65.0 | 88.5 | 82.0 | 79.1 | — |"


def test_parse_lmms_eval_rejects_other_files(tmp_path):
    bad = tmp_path / "x_results.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not an lmms-eval results file"):
        harness.parse_lmms_eval_results(bad)


def test_collect_vlmevalkit(tmp_path):
    run = tmp_path / "work" / "dig" / "T20261201_Gabc"
    run.mkdir(parents=True)
    (run / "dig_MMStar_acc.csv").write_text("split,Overall,coarse perception,math\nnone,0.702,0.8,0.6\n")
    (run / "dig_HallusionBench_score.csv").write_text(
        "split,aAcc,fAcc,qAcc\nOverall,73.8,50.2,48.9\nVD,70.0,40.0,41.0\n"
    )
    (run / "dig_CV-Bench-2D_acc.csv").write_text("split,Overall\ntest,0.80\n")
    (run / "dig_CV-Bench-3D_acc.csv").write_text("split,Overall\ntest,0.70\n")
    (run / "dig_POPE_score.csv").write_text("split,Overall,acc,precision,recall\nOverall,88.5,87.0,90.1,86.0\n")
    benchmarks = harness.select_benchmarks(harness.load_benchmarks(), "mmstar,hallusionbench,cv_bench,pope,ai2d")
    table = harness.collect_vlmevalkit(benchmarks, tmp_path / "work", "dig")
    assert table["mmstar"]["score"] == 70.2
    assert table["hallusionbench"]["score"] == 73.8
    assert table["cv_bench"]["score"] == 75.0  # mean of 2D and 3D
    assert table["pope"]["score"] == 88.5
    assert table["ai2d"]["score"] is None and table["ai2d"]["missing"] == ["AI2D_TEST"]


def test_vlmevalkit_csv_metric_as_row_label(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("metric,value\naAcc,71.5\nqAcc,44.0\n")
    assert harness.parse_vlmevalkit_csv(path, "qAcc") == 44.0
    with pytest.raises(ValueError, match="no column or row named 'fAcc'"):
        harness.parse_vlmevalkit_csv(path, "fAcc")


def test_cli_dry_run_and_collect(tmp_path, capsys):
    out = tmp_path / "lmms"
    rc = harness.main(["run", "--model-path", "/ckpt", "--out-dir", str(out), "--dry-run", "--backend", "vllm",
                       "--benchmarks-only", "mmstar"])  # fmt: skip
    assert rc == 0
    assert "--tasks mmstar" in capsys.readouterr().out
    lmms_results(out / "ckpt" / "a_results.json", {"mmstar": {"average,none": 0.5}})
    assert harness.main(["collect", "--out-dir", str(out), "--benchmarks-only", "mmstar,pope"]) == 0
    saved = json.loads((out / "perception.json").read_text())
    assert saved["benchmarks"]["mmstar"]["score"] == 50.0
    assert (out / "perception.md").read_text().startswith("| model | MMStar | POPE |")


def test_metric_candidates_first_present_wins(tmp_path):
    listing = tmp_path / "b.yaml"
    listing.write_text(
        "benchmarks:\n  hb:\n    display: HB\n    lmms_eval: {tasks: [hb], metric: [new_name, aAcc]}\n"
        "    vlmevalkit: {datasets: [HallusionBench], class: ImageYORNDataset, metric: aAcc}\n"
    )
    benchmarks = list(harness.load_benchmarks(listing).values())
    lmms_results(tmp_path / "out" / "m" / "x_results.json", {"hb": {"aAcc,none": 0.7, "qAcc,none": 0.4}})
    assert harness.collect_lmms_eval(benchmarks, tmp_path / "out")["hb"]["score"] == 70.0
