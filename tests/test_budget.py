"""data_prep.budget without the model's processor: one named error with the fixes, no hub traffic, no traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from data_prep import budget
from data_prep.budget import prompt_token_bound
from dig_common.models import load_model_spec, model_file, model_names

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every outgoing connection made in this process."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def uncached_model(tmp_path) -> str:
    """qwen3_vl_8b_thinking's model file with an hf_path that no cache holds."""
    raw = yaml.safe_load(model_file("qwen3_vl_8b_thinking").read_text())
    raw["dig"]["hf_path"] = "dig-tests/no-such-processor"
    path = tmp_path / "qwen3_vl_8b_thinking.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_readme_command_without_the_processor(tmp_path):
    """`python -m data_prep.budget --model qwen3_vl_8b_thinking` as a new user runs it: hub not switched offline,
    empty cache. The hub endpoint is a loopback listener that must see no connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{listener.getsockname()[1]}")
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.budget", "--model", "qwen3_vl_8b_thinking"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        "python -m data_prep.budget: error: no processor for qwen3_vl_8b_thinking: Qwen/Qwen3-VL-8B-Thinking is not in"
    )
    assert (
        "`hf download Qwen/Qwen3-VL-8B-Thinking --include 'config.json' --include 'preprocessor_config.json'"
        in proc.stderr
    )
    assert proc.stderr.count("\n") == 1  # one line


def test_missing_processor_is_one_named_error_with_the_fixes(tmp_path, no_network, capsys):
    from transformers import AutoProcessor  # noqa: F401  (imported before the clock starts: slow on a busy machine)

    model = uncached_model(tmp_path)
    started = time.perf_counter()
    assert budget.main(["--model", model]) == 2
    assert time.perf_counter() - started < 10  # no hub retries (those take ~30 s)
    assert no_network == []
    err = capsys.readouterr().err
    assert err.startswith("python -m data_prep.budget: error: no processor for qwen3_vl_8b_thinking: dig-tests/")
    assert "hf download dig-tests/no-such-processor --include 'config.json' --include 'preprocessor_config.json'" in err
    assert "--processor PATH" in err and "--estimate" in err and "Traceback" not in err
    with pytest.raises(budget.ProcessorNotFound, match="no such folder"):
        budget.load_processor(load_model_spec("qwen2_5_vl_7b"), str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(budget.ProcessorNotFound, match=f"folder {empty}"):
        budget.load_processor(load_model_spec("qwen2_5_vl_7b"), str(empty))


def test_estimate_is_the_launch_dry_run_bound(tmp_path, no_network, capsys):
    spec = load_model_spec("qwen2_5_vl_7b")
    assert budget.main(["--model", "qwen2_5_vl_7b", "--estimate", "--image-size", "480x320"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resized_size"] == [476, 308] and report["image_tokens"] == 17 * 11
    assert report["prompt_tokens_bound"] == prompt_token_bound(480, 320, spec)
    assert report["fits"] and no_network == []
    assert budget.main(["--model", "qwen2_5_vl_7b", "--estimate", "--max-prompt-length", "300"]) == 1
    assert "data.max_prompt_length=300" in capsys.readouterr().err


def test_eval_context_leaves_room_for_every_model_prompt():
    """eval's vLLM context (PROMPT_TOKEN_BUDGET beside max_new_tokens) holds several times the largest prompt
    bound of every model file, images at max_pixels: a prompt over it would fail on the GPU."""
    from eval.backends import PROMPT_TOKEN_BUDGET

    for name in model_names():
        spec = load_model_spec(name)
        largest = prompt_token_bound(*budget.largest_image_size(spec), spec)
        assert 4 * largest <= PROMPT_TOKEN_BUDGET, (name, largest)
