"""The eval command lines' bad-input paths (docs/cli.md, Errors): exit status 2 and one ``<prog>: error:`` line on
stderr that names the thing and the fix, never a traceback, and before any model loads. One case per tool runs
as a real subprocess (``python -m eval.<tool>``), so nothing between ``main`` and the shell can leak a traceback;
the rest call ``main(argv)`` in-process."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_dig import write_parquet
from test_eval_refcoco import write_split

from dig_common.models import load_model_spec
from eval import dig, harness, refcoco, visualize

REPO = Path(__file__).resolve().parents[1]
NO_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
PROCESSOR_FIX = "hf download Qwen/Qwen2.5-VL-3B-Instruct --include 'preprocessor_config.json' --include"


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("DIG_DEBUG", raising=False)  # DIG_DEBUG=1 turns the one-line errors into tracebacks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tiny_qwen import save_tiny_checkpoint

    return save_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def weights_only(checkpoint, tmp_path_factory) -> Path:
    """The checkpoint without its processor files: what a hand-copied weights folder looks like."""
    folder = tmp_path_factory.mktemp("weights_only")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, folder / name)
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    return write_parquet(tmp_path / "test.parquet")


@pytest.fixture
def predictions(tmp_path) -> Path:
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"pair_id": "p1", "response": "[]"}) + "\n")
    return path


def one_error(err: str, prog: str) -> str:
    """The message of the single ``prog: error:`` line that is all of ``err``."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    prefix = f"python -m {prog}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix) :]


def run_main(main, argv: list[str], capsys, prog: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # failed before any work started (eval.dig prints what it will generate)
    return one_error(captured.err, prog)


def run_module(prog: str, argv: list[str]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("DIG_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", prog, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout
    return one_error(proc.stderr, prog)


# ----------------------------------------------------------------------------------------------- eval.dig


def test_dig_missing_data_as_a_subprocess(tmp_path, predictions):
    argv = ["--data", str(tmp_path / "nope.parquet"), "--predictions", str(predictions), "--out", str(tmp_path / "r")]
    assert run_module("eval.dig", argv) == f"--data {tmp_path / 'nope.parquet'}: no such parquet file"


def test_dig_bad_inputs(tmp_path, capsys, data, predictions):
    base = ["--data", str(data), "--out", str(tmp_path / "r.json")]

    def error(*argv) -> str:
        return run_main(dig.main, [*base, *argv], capsys, "eval.dig")

    message = error("--predictions", str(predictions), "--model", "qwen9")
    assert message.startswith("unknown model 'qwen9'; known models: ") and "qwen3_vl_8b_thinking" in message
    message = error("--predictions", str(predictions), "--reward-kwargs", "{iou_threshold: 0.7}")
    assert message.startswith("--reward-kwargs is not JSON (") and '{"iou_threshold": 0.75}' in message
    assert error("--predictions", str(predictions), "--reward-kwargs", "[0.7]") == (
        "--reward-kwargs must be a JSON object of knob: value pairs, got '[0.7]'"
    )
    assert (
        error("--predictions", str(tmp_path / "none.jsonl")) == f"--predictions {tmp_path / 'none.jsonl'}: no such file"
    )
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps({"pair_id": "p1", "response": "[]"}) + "\n" + '{"pair": "p2"}\n')
    message = error("--predictions", str(bad_line))
    assert message.startswith(f'{bad_line}:2: expected {{"pair_id", "response"}}, got ')
    # nothing is written when the input is bad
    assert not (tmp_path / "r.json").exists()


def test_dig_checkpoint_checked_before_a_model_loads(tmp_path, capsys, data, checkpoint, weights_only):
    base = ["--data", str(data), "--out", str(tmp_path / "r.json"), "--backend", "hf", "--model", "qwen2_5_vl_3b"]

    def error(model_path) -> str:
        return run_main(dig.main, [*base, "--model-path", str(model_path)], capsys, "eval.dig")

    assert error(tmp_path / "nope").startswith(f"--model-path {tmp_path / 'nope'}: no such folder")
    assert error(data).startswith(f"--model-path {data}: not a folder")
    message = error(tmp_path)
    assert message.startswith(f"--model-path {tmp_path}: no config.json, so not a Hugging Face checkpoint")
    assert "python -m verl.model_merger merge" in message
    message = error(weights_only)
    assert message.startswith(f"--model-path {weights_only}: no processor files (lacks preprocessor_config.json")
    assert "a merged checkpoint carries them" in message
    assert PROCESSOR_FIX in message and message.endswith(f"--local-dir {weights_only}")
    assert not (tmp_path / "r.predictions.jsonl").exists()  # no generation started


@NO_VLLM
def test_dig_vllm_backend_without_vllm(tmp_path, capsys, data, checkpoint):
    argv = ["--data", str(data), "--out", str(tmp_path / "r.json"), "--model-path", str(checkpoint)]
    message = run_main(dig.main, argv, capsys, "eval.dig")  # --backend vllm is the default
    assert message.startswith("--backend vllm: vLLM is not installed in this environment")
    assert message.endswith("--backend hf generates with transformers instead")


def test_flag_syntax_stays_with_argparse(tmp_path, capsys, data):
    with pytest.raises(SystemExit) as exit_:
        dig.main(["--data", str(data), "--out", str(tmp_path / "r.json")])  # neither --predictions nor --model-path
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: python -m eval.dig")
    assert "one of the arguments --predictions --model-path is required" in err
    for tool, argv in ((dig, ["--samples", "0"]), (visualize, ["--limit", "-1"]), (harness, ["run", "--limit", "0"])):
        with pytest.raises(SystemExit) as exit_:
            tool.main(argv)
        assert exit_.value.code == 2 and "expected an integer >= 1, got" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- eval.refcoco


def test_refcoco_missing_folder_as_a_subprocess(tmp_path, predictions):
    folder = tmp_path / "refcoco"
    argv = ["--refcoco-dir", str(folder), "--splits", "refcoco:val", "--predictions", str(predictions)]
    message = run_module("eval.refcoco", [*argv, "--out", str(tmp_path / "r.json")])
    assert message == (
        f"--refcoco-dir {folder}: no such folder; download the snapshots: hf download "
        f"lmms-lab-encoder/RefCOCO --repo-type dataset --local-dir {folder / 'RefCOCO'}"
    )


def test_refcoco_bad_inputs(tmp_path, capsys, predictions, weights_only):
    write_split(tmp_path, "RefCOCO", "val", [("1", ["left cat"], [10, 10, 40, 40])])
    base = ["--refcoco-dir", str(tmp_path), "--out", str(tmp_path / "r.json")]

    def error(*argv) -> str:
        return run_main(refcoco.main, [*base, *argv], capsys, "eval.refcoco")

    message = error("--splits", "refcoco:val,refcocog:test", "--predictions", str(predictions))
    assert message.startswith(f"no {tmp_path / 'RefCOCOg' / 'data'}/test-*.parquet; download it with `hf")
    assert error("--splits", "coco:val", "--predictions", str(predictions)).startswith(
        "--splits: 'coco:val' is not <dataset>:<split>"
    )
    assert error("--splits", "refcoco:val", "--predictions", str(predictions), "--model", "qwen9").startswith(
        "unknown model 'qwen9'"
    )
    generate = ["--model", "qwen2_5_vl_3b", "--backend", "hf", "--model-path", str(weights_only)]
    message = error("--splits", "refcoco:val", *generate)
    assert "no processor files" in message and PROCESSOR_FIX in message
    answers = tmp_path / "answers.jsonl"
    answers.write_text("not json\n")
    assert error("--splits", "refcoco:val", "--predictions", str(answers)).startswith(
        f'{answers}:1: expected {{"id", "response"}}'
    )


# ----------------------------------------------------------------------------------------------- eval.harness


def test_harness_missing_checkpoint_as_a_subprocess(tmp_path):
    argv = ["run", "--model-path", str(tmp_path / "ckpt"), "--out-dir", str(tmp_path / "out"), "--dry-run"]
    assert run_module("eval.harness", argv).startswith(f"--model-path {tmp_path / 'ckpt'}: no such folder")


def test_harness_bad_inputs(tmp_path, capsys, checkpoint, weights_only, monkeypatch):
    monkeypatch.delenv("VLMEVALKIT_DIR", raising=False)
    run = ["run", "--model-path", str(checkpoint), "--out-dir", str(tmp_path / "out"), "--dry-run"]

    def error(*argv) -> str:
        return run_main(harness.main, list(argv), capsys, "eval.harness")

    assert error(*run, "--benchmarks", str(tmp_path / "b.yaml")) == f"--benchmarks {tmp_path / 'b.yaml'}: no such file"
    assert error(*run, "--benchmarks-only", "mmstar,vsr").startswith("--benchmarks-only: unknown vsr; known: ")
    assert error(*run, "--model", "qwen9").startswith("unknown model 'qwen9'")
    assert error(*run, "--harness", "vlmevalkit") == (
        "--vlmevalkit-dir (or $VLMEVALKIT_DIR) must be a VLMEvalKit checkout holding run.py"
    )
    message = error(*run, "--model", "qwen2_5_vl_3b", "--model-path", str(weights_only))
    assert "no processor files" in message and PROCESSOR_FIX in message
    missing = tmp_path / "never_ran"
    assert error("collect", "--out-dir", str(missing)) == (
        f"--out-dir {missing}: no such folder (the harness output of `python -m eval.harness run`)"
    )


@NO_VLLM
def test_harness_run_checks_the_backend_before_starting_the_harness(tmp_path, capsys, checkpoint):
    argv = ["run", "--model-path", str(checkpoint), "--out-dir", str(tmp_path / "out"), "--benchmarks-only", "mmstar"]
    message = run_main(harness.main, argv, capsys, "eval.harness")
    assert message.startswith("--backend vllm: vLLM is not installed") and "--backend hf" in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- eval.visualize


def test_visualize_missing_samples_as_a_subprocess(tmp_path):
    argv = ["--samples", str(tmp_path / "r.samples.jsonl"), "--out-dir", str(tmp_path / "g")]
    assert run_module("eval.visualize", argv) == f"--samples {tmp_path / 'r.samples.jsonl'}: no such file"


def test_visualize_bad_inputs(tmp_path, capsys, data):
    dump = tmp_path / "40.jsonl"
    dump.write_text(json.dumps({"output": "[]"}) + "\n")
    out = ["--out-dir", str(tmp_path / "g")]

    def error(*argv) -> str:
        return run_main(visualize.main, [*argv, *out], capsys, "eval.visualize")

    assert error("--verl-dump", str(dump), "--data", str(tmp_path / "x.parquet")) == (
        f"--data {tmp_path / 'x.parquet'}: no such parquet file"
    )
    assert error("--verl-dump", str(dump), "--model", "qwen9").startswith("unknown model 'qwen9'")
    assert error("--verl-dump", str(dump)) == (f"{dump}:1: not a verl generations dump line (needs 'output' and 'gts')")
    dump.write_text('{"output": "[]", "gts":\n')
    assert error("--verl-dump", str(dump)).startswith(f"{dump}:1: not a JSON line (")
    samples = tmp_path / "r.samples.jsonl"
    samples.write_text(json.dumps({"pair_id": "p1"}) + "\n")
    assert error("--samples", str(samples)).startswith(f"{samples}:1: not an eval.dig samples line (missing ")
    assert not (tmp_path / "g").exists()


def test_default_model_is_the_shared_one():
    """No eval tool carries its own default model name."""
    from dig_common.models import DEFAULT_MODEL

    for parser in (dig.build_parser(), refcoco.build_parser(), visualize.build_parser()):
        assert parser.get_default("model") == DEFAULT_MODEL
    run = harness.build_parser()._subparsers._group_actions[0].choices["run"]
    assert run.get_default("model") == DEFAULT_MODEL
    assert load_model_spec().model_name == DEFAULT_MODEL


# ------------------------------------------------------------------------ data built for another model, broken files


def model_parquet(path: Path, model: str, **image_changes) -> Path:
    """One row as data_prep.to_verl writes it for ``model`` (its prompt, its per-image pixel bounds, its name in
    the file's metadata), with ``image_changes`` applied to the image structs alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dig_common.parquet import METADATA_KEY
    from dig_common.prompts import build_prompt

    spec = load_model_spec(model)
    image = {"bytes": b"png", "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels, **image_changes}
    gt = json.dumps({"boxes": [[10, 20, 60, 80]], "width": 480, "height": 320, "types": ["color"]})
    row = {
        "data_source": "dig",
        "prompt": build_prompt(spec),
        "images": [image, dict(image)],
        "ability": "grounding",
        "reward_model": {"style": "rule", "ground_truth": gt},
        "extra_info": {
            "split": "test",
            "index": 0,
            "pair_id": "p1",
            "stage": 0,
            "num_differences": 1,
            "types": ["color"],
            "width": 480,
            "height": 320,
        },
    }
    table = pa.Table.from_pylist([row])
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps({"model": spec.model_name}).encode()})
    pq.write_table(table, path)
    return path


def with_prompt_of(path: Path, model: str) -> Path:
    """The same file with only the prompt replaced by ``model``'s."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dig_common.prompts import build_prompt

    table = pq.read_table(path)
    column = pa.array([build_prompt(load_model_spec(model))], type=table.schema.field("prompt").type)
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", column), path)
    return path


@pytest.mark.parametrize(
    ("built", "given", "change", "why"),
    [
        # built for qwen2.5 (other bounds, other frame) scored as the default model: right answers would score 0
        ("qwen2_5_vl_7b", None, {}, "its images carry min_pixels=3136 but qwen3_vl_8b_thinking uses 65536"),
        # one field differs: max_pixels alone
        ("qwen3_vl_8b_thinking", "qwen3_vl_8b_thinking", {"max_pixels": 401408}, "max_pixels=401408"),
        # one field differs: the instruction alone (same bounds, the instruct model's prompt)
        ("qwen3_vl_8b_instruct", "qwen3_vl_8b_thinking", {}, "its instruction is another model's"),
    ],
)
def test_dig_refuses_data_built_for_another_model(tmp_path, capsys, predictions, built, given, change, why):
    data = model_parquet(tmp_path / "test.parquet", built, **change)
    argv = ["--data", str(data), "--predictions", str(predictions), "--out", str(tmp_path / "r.json")]
    message = run_main(dig.main, argv + (["--model", given] if given else []), capsys, "eval.dig")
    assert message.startswith(f"--data {data} was built for {built}, not for --model ")
    assert why in message and f"pass --model {built}" in message
    if given is None:
        assert "--model qwen3_vl_8b_thinking (the default)" in message
    assert not (tmp_path / "r.json").exists()


def test_dig_accepts_data_built_for_its_model(tmp_path, capsys, predictions):
    data = model_parquet(tmp_path / "test.parquet", "qwen2_5_vl_7b")
    out = tmp_path / "r.json"
    assert (
        dig.main(
            ["--data", str(data), "--predictions", str(predictions), "--model", "qwen2_5_vl_7b", "--out", str(out)]
        )
        == 0
    )
    assert json.loads(out.read_text())["overall"]["n"] == 1


def test_instruction_only_mismatch_is_seen_by_the_shared_check(tmp_path):
    from dig_common.parquet import model_mismatch, open_parquet

    path = with_prompt_of(model_parquet(tmp_path / "t.parquet", "qwen3_vl_8b_thinking"), "qwen3_vl_8b_instruct")
    spec = load_model_spec("qwen3_vl_8b_thinking")
    assert "instruction" in model_mismatch(open_parquet(path), spec)
    assert model_mismatch(open_parquet(path), load_model_spec("qwen3_vl_8b_instruct")) is None


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_parquet_is_named(tmp_path, capsys, predictions):
    data = truncated(model_parquet(tmp_path / "test.parquet", "qwen3_vl_8b_thinking"))
    argv = ["--data", str(data), "--predictions", str(predictions), "--out", str(tmp_path / "r.json")]
    message = run_main(dig.main, argv, capsys, "eval.dig")
    assert message.startswith(f"--data {data}: not a readable parquet file (") and "rebuild it" in message
    dump = tmp_path / "40.jsonl"
    dump.write_text(json.dumps({"output": "[]", "gts": "{}"}) + "\n")
    argv = ["--verl-dump", str(dump), "--data", str(data), "--out-dir", str(tmp_path / "g")]
    message = run_main(visualize.main, argv, capsys, "eval.visualize")
    assert message.startswith(f"--data {data}: not a readable parquet file (")
    assert not (tmp_path / "g").exists()


def test_visualize_refuses_a_verl_dump_rescored_with_another_model(tmp_path, capsys):
    data = model_parquet(tmp_path / "val.parquet", "qwen2_5_vl_7b")
    dump = tmp_path / "40.jsonl"
    dump.write_text(json.dumps({"output": "[]", "gts": "{}"}) + "\n")
    argv = ["--verl-dump", str(dump), "--data", str(data), "--out-dir", str(tmp_path / "g")]
    message = run_main(visualize.main, argv, capsys, "eval.visualize")
    assert message.startswith(f"--data {data} was built for qwen2_5_vl_7b, not for --model qwen3_vl_8b_thinking")


# ------------------------------------------------------------------------ eval.harness: a harness that cannot run


def shadow_lmms_eval(root: Path, init: str = "", main: str = "") -> dict:
    """An ``lmms_eval`` package first on the path: ``init`` stands for what the installed one does at import."""
    package = root / "lmms_eval"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    (package / "__main__.py").write_text(main)
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    env.pop("DIG_DEBUG", None)
    return env


def harness_run(tmp_path, checkpoint, env) -> subprocess.CompletedProcess:
    argv = ["run", "--model-path", str(checkpoint), "--out-dir", str(tmp_path / "out"), "--benchmarks-only", "mmstar"]
    return subprocess.run(
        [sys.executable, "-m", "eval.harness", *argv, "--backend", "vllm"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="--backend vllm needs vLLM installed")
def test_harness_run_refuses_an_lmms_eval_without_its_dependencies(tmp_path, checkpoint):
    """lmms-eval installed with --no-deps (as in .venv) dies on its first import: one line, exit 2, nothing run."""
    env = shadow_lmms_eval(tmp_path / "shadow", init="import loguru_is_not_installed\n")
    proc = harness_run(tmp_path, checkpoint, env)
    assert proc.returncode == 2, proc.stderr
    message = one_error(proc.stderr, "eval.harness")
    assert message.startswith("lmms-eval is installed but does not import here (ModuleNotFoundError: ")
    assert "loguru_is_not_installed" in message and "pip install lmms-eval==0.7.3" in message
    assert proc.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="--backend vllm needs vLLM installed")
def test_harness_run_that_fails_exits_1_with_what_it_collected(tmp_path, checkpoint):
    env = shadow_lmms_eval(tmp_path / "shadow", main='import sys\n\nif __name__ == "__main__":\n    sys.exit(3)\n')
    proc = harness_run(tmp_path, checkpoint, env)
    assert proc.returncode == 1, proc.stderr
    assert "the harness failed (exit 3)" in proc.stderr
    assert (tmp_path / "out" / "perception.json").is_file()
