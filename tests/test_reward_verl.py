"""The reward through the real verl 0.9.1: loader, reward_kwargs, reward loop, reward_extra_info."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_qwen import build_tiny_tokenizer

from reward_fns.dig_reward import RESULT_KEYS, compute_score

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("verl_reward_probe.py")
GT = json.dumps({"boxes": [[10, 20, 110, 120], [200, 100, 260, 180]], "width": 480, "height": 320})
CASES = [
    # malformed first: verl takes the key list from sample 0, so a failure must carry every key
    ["I see no boxes", GT],
    ['[{"bbox_2d": [10, 20, 110, 120], "label": "colour"}, {"bbox_2d": [200, 100, 260, 180]}]', GT],
    ["[[10, 20, 110, 120]]", GT],
    ["[[300, 200, 400, 300]]", GT],
]


@pytest.mark.verl
@pytest.mark.slow
def test_reward_through_verl_reward_loop(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    build_tiny_tokenizer("qwen2_5_vl").save_pretrained(tokenizer_dir)
    workdir = tmp_path / "elsewhere"  # not the repo: the loader must not rely on the cwd
    workdir.mkdir()
    # immune to ambient clusters: the probe starts its own (address="local", own temp dir), even with RAY_ADDRESS
    # pointing at a dead one (as a stale ray_current_cluster file from an earlier `ray start` would)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH="", RAY_ADDRESS="127.0.0.1:9")
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(REPO / "reward_fns" / "dig_reward.py"), str(tokenizer_dir), json.dumps(CASES)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    # reward_kwargs reached the function: coord_mode=abs means these pixel answers score exactly
    expected = [compute_score("dig", r, g, coord_mode="abs") for r, g in CASES]
    assert report["direct"] == expected
    assert expected[1]["score"] == 1.0 and expected[0]["format"] == 0.0
    assert compute_score("dig", CASES[1][0], GT)["score"] < 1.0  # the default rel1000 frame would differ

    # through the reward loop, every key reaches reward_extra_info, for every sample
    assert report["reward_extra_keys"] == list(RESULT_KEYS)
    for key in RESULT_KEYS:
        assert report["extra"][key] == pytest.approx([e[key] for e in expected]), key
    assert report["rm_score_sums"] == pytest.approx([e["score"] for e in expected])
