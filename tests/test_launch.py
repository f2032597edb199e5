"""Launch layer on CPU: every model x stage dry-runs through the real Hydra composition, verl's validate_config
and verl's reward loader; every class of bad input stops with a message naming its culprit.

Most checks call recipes.dig.launch in-process (one verl import for all); two run the real entry points as
subprocesses: `DRY_RUN=1 bash launch/grpo_stage1.sh` and `python -m recipes.dig.main --cfg job`, the latter
proving the dry run composes exactly the config the training run gets.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from dig_common.models import load_model_spec, model_names
from dig_common.paths import BASE_MODEL_DIR
from recipes.dig import launch
from recipes.dig.settings import KNOB_NAMES, REMOVED_KNOBS, STAGES, LaunchError, Settings

pytestmark = pytest.mark.verl

REPO = Path(__file__).resolve().parents[1]
LAUNCH_ENV_KEYS = (*KNOB_NAMES, *REMOVED_KNOBS)  # every variable the launch path reads (recipes/dig/settings.py)


@pytest.fixture
def launch_env(tmp_path, monkeypatch):
    """A clean launch environment: dry run; checkpoints and data under tmp_path through ``dirs(tmp_path)``."""
    for key in LAUNCH_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DRY_RUN", "1")
    return tmp_path


def dirs(root: Path) -> list[str]:
    """The Hydra overrides that put checkpoints and data under ``root``."""
    return [f"curriculum.ckpt_dir={root / 'ckpt'}", f"curriculum.data_dir={root / 'data'}"]


def with_dirs(root: Path, argv: list[str]) -> list[str]:
    """Launcher argv with ``dirs(root)`` appended as overrides (after ``--``, which ends --curriculum's list)."""
    return [*argv, *([] if "--" in argv else ["--"]), *dirs(root)]


def dry_settings(tmp_path: Path, stage: int, **kwargs) -> Settings:
    return Settings(stage=stage, ckpt_dir=tmp_path / "ckpt", data_dir=tmp_path / "data", dry_run=True, **kwargs)


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_stage_parquet(path: Path, min_pixels: int, max_pixels: int, width: int = 64, height: int = 48) -> None:
    """Two rows in the parquet row layout of docs/contracts.md (plain image structs with per-image pixel bounds)."""
    png = png_bytes(width, height)
    rows = [
        {
            "data_source": "dig",
            "prompt": [{"role": "user", "content": "<image><image>Find every difference."}],
            "images": [{"bytes": png, "min_pixels": min_pixels, "max_pixels": max_pixels}] * 2,
            "ability": "grounding",
            "reward_model": {
                "style": "rule",
                "ground_truth": json.dumps({"boxes": [[1, 2, 9, 9]], "width": width, "height": height}),
            },
            "extra_info": {
                "split": path.stem,
                "index": i,
                "pair_id": f"p{i}",
                "stage": 1,
                "num_differences": 1,
                "types": ["color"],
                "width": width,
                "height": height,
            },
        }
        for i in range(2)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# ---------------------------------------------------------------------------------------------------------------
# Every model x stage


@pytest.mark.parametrize("model", model_names())
def test_dry_run_every_stage_of_every_model(model, tmp_path):
    spec = load_model_spec(model)
    for stage in STAGES:
        plan = launch.plan_stage(dry_settings(tmp_path, stage, model=model, assume_previous=True))
        cfg = plan.cfg
        assert (cfg.dig.model_name, cfg.curriculum.stage) == (model, stage)
        assert cfg.trainer.experiment_name == f"{model}_stage{stage}"  # fresh name per stage
        assert cfg.trainer.default_local_dir == str(tmp_path / "ckpt" / "dig" / f"{model}_stage{stage}")
        assert cfg.trainer.resume_mode == "auto"
        assert cfg.data.train_files == str(tmp_path / "data" / model / f"stage{stage}" / "train.parquet")
        assert cfg.data.val_files == str(tmp_path / "data" / model / f"stage{stage}" / "val.parquet")
        assert cfg.data.image_patch_size == spec.patch_size
        # GRPO + low-variance KL loss, vLLM async rollouts with two images
        assert cfg.algorithm.adv_estimator == "grpo" and not cfg.algorithm.use_kl_in_reward
        actor = cfg.actor_rollout_ref.actor
        assert (actor.use_kl_loss, actor.kl_loss_type, actor.kl_loss_coef) == (True, "low_var_kl", 0.01)
        assert actor.use_dynamic_bsz
        rollout = cfg.actor_rollout_ref.rollout
        assert (rollout.name, rollout.mode, rollout.limit_images, rollout.n) == ("vllm", "async", 2, 8)
        # validation decodes as the model file's dig.decoding says (the model card's sampling; greedy: do_sample off)
        val, decoding = rollout.val_kwargs, spec.decoding
        assert (val.temperature, val.top_p, val.top_k, val.n) == (
            decoding.temperature,
            decoding.top_p,
            decoding.top_k,
            decoding.n,
        )
        assert val.do_sample == (not decoding.greedy) and rollout.seed == decoding.seed
        assert decoding.greedy == (spec.family == "qwen2_5_vl") and (decoding.n > 1) == (not decoding.greedy)
        # reward through reward.custom_reward_function, its model kwargs from the model file's dig: block
        reward = cfg.reward.custom_reward_function
        assert (reward.path, reward.name) == ("pkg://reward_fns.dig_reward", "compute_score")
        kwargs = OmegaConf.to_container(reward.reward_kwargs, resolve=True)
        assert spec.reward_kwargs().items() <= kwargs.items()
        assert OmegaConf.select(cfg, "custom_reward_function.path") is None  # legacy key stays unused
        assert plan.reward_probe["score"] == 0.0  # verl-loaded reward scored a malformed answer
        # initial weights: base model, then the previous stage's merged checkpoint
        expected_init = (
            spec.hf_path
            if stage == 1
            else str(tmp_path / "ckpt" / "dig" / f"{model}_stage{stage - 1}" / "hf_merged" / "global_step_LAST")
        )
        assert cfg.actor_rollout_ref.model.path == expected_init
        # no data yet: the run will build it, and says how
        assert not plan.data.ready
        build_args = ["--out-dir", str(tmp_path / "data"), "--model", model, "--stage", str(stage)]
        assert plan.data.build_command[-6:] == build_args
        assert any("pairs x 4.5 s/pair" in line for line in plan.data.lines)
        command = plan.train_command()
        assert command[1:3] == ["-m", "recipes.dig.main"] and f"stage=stage{stage}" in command


def test_stage1_script_dry_run_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}
    env.update(DRY_RUN="1")
    settings = ["base_model=qwen2_5_vl_3b", "trainer.nnodes=2", "trainer.n_gpus_per_node=4"]
    settings += ["trainer.logger=[console,wandb]", *dirs(tmp_path)]
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "grpo_stage1.sh"), *settings, "trainer.total_epochs=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "DRY_RUN: stage 1 OK" in out
    assert "GPUs: 2 node(s) x 4" in out
    assert "-m data_prep.build --out-dir" in out  # data missing: says it will build it
    command = next(line for line in out.splitlines() if line.startswith("[dig] command: "))
    for override in (
        "base_model=qwen2_5_vl_3b",
        "stage=stage1",
        "trainer.nnodes=2",
        "trainer.n_gpus_per_node=4",
        "trainer.logger=[console,wandb]",
        "trainer.total_epochs=2",
    ):
        assert override in command
    assert not (tmp_path / "ckpt").exists()  # a dry run writes nothing


def test_training_entry_point_composes_the_dry_run_config(tmp_path):
    plan = launch.plan_stage(
        dry_settings(tmp_path, 1, model="qwen3_vl_4b_thinking", extra_overrides=["trainer.save_freq=10"])
    )
    result = subprocess.run(
        [sys.executable, "-m", "recipes.dig.main", *plan.overrides, "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    composed_by_main = yaml.safe_load(result.stdout)
    assert composed_by_main == OmegaConf.to_container(plan.cfg, resolve=False)
    assert composed_by_main["trainer"]["save_freq"] == 10


def test_base_model_override_selects_the_model(launch_env):
    settings = Settings.from_env(1, ["base_model=qwen2_5_vl_7b", "trainer.save_freq=5", *dirs(launch_env)])
    assert settings.model == "qwen2_5_vl_7b" and settings.extra_overrides == ["trainer.save_freq=5"]
    assert (settings.data_dir, settings.ckpt_dir) == (launch_env / "data", launch_env / "ckpt")
    assert launch.plan_stage(settings).cfg.dig.model_name == "qwen2_5_vl_7b"


def test_model_file_given_by_path(launch_env, monkeypatch):
    """Adding a model is one YAML: here one outside the repo, selected by path."""
    source = yaml.safe_load((BASE_MODEL_DIR / "qwen2_5_vl_3b.yaml").read_text())
    source["dig"]["model_name"] = "my_vlm"
    source["dig"]["hf_path"] = "org/My-VLM-2B"
    path = launch_env / "models" / "my_vlm.yaml"
    path.parent.mkdir()
    path.write_text("# @package _global_\n" + yaml.safe_dump(source))
    plan = launch.plan_stage(dry_settings(launch_env, 1, model=str(path)))
    assert plan.cfg.dig.model_name == "my_vlm"
    assert plan.cfg.actor_rollout_ref.model.path == "org/My-VLM-2B"
    assert plan.cfg.trainer.experiment_name == "my_vlm_stage1"
    assert plan.data.build_command[plan.data.build_command.index("--model") + 1] == str(path)


def write_manifest(pairs_dir: Path, num: int) -> None:
    """A run folder whose manifest lists ``num`` pairs with their files (what data_prep.build counts to decide what
    to render: a listed pair whose files are gone is made again)."""
    from data_prep.manifest import append_entry, manifest_entry

    shard = pairs_dir / "shard-000"
    shard.mkdir(parents=True)
    for index in range(num):
        pid = f"s1-{index:07d}"
        record = manifest_entry(shard, pid, index, [{"type": "color"}])
        for key in ("json", "image_a", "image_b"):
            (pairs_dir / record[key]).touch()
        append_entry(pairs_dir, record)


def test_switching_model_plans_a_conversion_not_a_render(launch_env):
    """The pairs under data/pairs/ are shared by every model: with them on disk, a second model's missing parquets
    are planned as a conversion (seconds), not a render (hours); with half of them, only the rest is rendered."""
    from data_prep.stages import STAGES_FILE, load_curriculum

    runs = load_curriculum(STAGES_FILE).stage("1").splits
    nums = {split: sum(run.num for run in split_runs) for split, split_runs in runs.items()}
    write_manifest(launch_env / "data" / "pairs" / "stage1" / "train", nums["train"] // 2)
    plan = launch.plan_stage(dry_settings(launch_env, 1, model="qwen2_5_vl_3b"))
    line = next(line for line in plan.data.lines if line.startswith("data: missing"))
    assert f"renders {nums['train'] - nums['train'] // 2 + nums['val']} pairs x 4.5 s/pair" in line
    shutil.rmtree(launch_env / "data" / "pairs")
    for split, num in nums.items():
        write_manifest(launch_env / "data" / "pairs" / "stage1" / split, num)
    plan = launch.plan_stage(dry_settings(launch_env, 1, model="qwen2_5_vl_3b"))
    line = next(line for line in plan.data.lines if line.startswith("data: missing"))
    assert str(launch_env / "data" / "qwen2_5_vl_3b" / "stage1" / "train.parquet") in line
    assert f"it only converts {sum(nums.values())} pairs" in line and "renders" not in line
    assert plan.data.build_command[-6:] == [
        "--out-dir",
        str(launch_env / "data"),
        "--model",
        "qwen2_5_vl_3b",
        "--stage",
        "1",
    ]


def test_existing_data_is_checked_and_reported(launch_env):
    spec = load_model_spec("qwen2_5_vl_3b")
    for split in ("train", "val"):
        write_stage_parquet(
            launch_env / "data" / spec.model_name / "stage1" / f"{split}.parquet", spec.min_pixels, spec.max_pixels
        )
    small_batch = ["data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2"]
    plan = launch.plan_stage(dry_settings(launch_env, 1, model="qwen2_5_vl_3b", extra_overrides=small_batch))
    assert plan.data.ready and plan.data.build_command is None
    assert any("train.parquet (2 rows" in line for line in plan.data.lines)
    # the default batch of 64 prompts would never fill from 2 rows: refused, with the knob to change
    with pytest.raises(LaunchError, match=r"2 rows < data.train_batch_size=64"):
        launch.plan_stage(dry_settings(launch_env, 1, model="qwen2_5_vl_3b"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each class stops with its own message, exit code 2


def run_launch(args: list[str], capsys) -> tuple[int, str]:
    rc = launch.main(args)
    captured = capsys.readouterr()
    return rc, captured.err


BAD_INPUTS = {
    # name: (env, argv, substrings of the error)
    "typo_override": (
        {},
        ["--stage", "1", "actor_rollout_ref.rollout.nn=3"],
        ["'actor_rollout_ref.rollout.nn=3' rejected", "Could not override"],
    ),
    "typo_value_type": ({}, ["--stage", "1", "trainer.save_freq=often"], ["trainer.save_freq=often"]),
    "unknown_model": (
        {},
        ["--stage", "1", "base_model=qwen9_vl"],
        ["base_model=qwen9_vl", "unknown model 'qwen9_vl'", "qwen3_vl_8b_thinking"],
    ),
    "missing_model_file": ({}, ["--stage", "1", "base_model=/nonexistent/m.yaml"], ["model config file not found"]),
    "missing_previous_stage": (
        {},
        ["--stage", "2"],
        ["stage 1 checkpoint missing", "launch/grpo_stage1.sh", "INIT_MODEL"],
    ),
    "missing_previous_stage3": ({}, ["--stage", "3"], ["stage 2 checkpoint missing", "launch/grpo_stage2.sh"]),
    "legacy_reward_key": (
        {},
        ["--stage", "1", "custom_reward_function.path=/x.py"],
        ["custom_reward_function.path=/x.py", "reward.custom_reward_function"],
    ),
    "stage_override": ({}, ["--stage", "1", "stage=stage2"], ["the stage is chosen by the script"]),
    "removed_model_env": ({"MODEL": "qwen2_5_vl_3b"}, ["--stage", "1"], ["MODEL='qwen2_5_vl_3b'", "base_model=NAME"]),
    "removed_data_dir_env": ({"DATA_DIR": "/data"}, ["--stage", "1"], ["DATA_DIR='/data'", "curriculum.data_dir=DIR"]),
    "removed_logger_env": ({"LOGGER": "console"}, ["--stage", "1"], ["LOGGER='console'", "trainer.logger="]),
    "verl_validate_config": (
        {},
        ["--stage", "1", "actor_rollout_ref.actor.use_dynamic_bsz=false"],
        ["verl validate_config rejected", "ppo_micro_batch_size"],
    ),
    "reward_kwargs_off_model": (
        {},
        ["--stage", "1", "reward.custom_reward_function.reward_kwargs.coord_mode=abs"],
        ["reward_kwargs.coord_mode='abs'", "dig.coord_mode='rel1000'"],
    ),
    "typo_reward_knob": (
        {},
        ["--stage", "1", "+reward.custom_reward_function.reward_kwargs.iou_thresh=0.7"],
        ["reward_kwargs", "unknown reward knob(s) iou_thresh"],
    ),
    "reward_knob_out_of_range": (
        {},
        ["--stage", "1", "+reward.custom_reward_function.reward_kwargs.w_format=2"],
        ["w_format=2"],
    ),
    "bad_nnodes": ({}, ["--stage", "1", "trainer.nnodes=two"], ["trainer.nnodes=two"]),
    "tp_vs_gpus": (
        {},
        ["--stage", "1", "trainer.n_gpus_per_node=3"],
        ["tensor_model_parallel_size=2", "n_gpus_per_node=3"],
    ),
    "unknown_logger": (
        {},
        ["--stage", "1", "trainer.logger=[console,wandbb]"],
        ["trainer.logger", "unknown backend(s) ['wandbb']"],
    ),
    "prompt_budget": ({}, ["--stage", "1", "data.max_prompt_length=256"], ["data.max_prompt_length=256"]),
    "reward_not_loadable": (
        {},
        ["--stage", "1", "reward.custom_reward_function.path=pkg://reward_fns.nope"],
        ["reward.custom_reward_function.path=pkg://reward_fns.nope", "cannot load"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_its_culprit(case, launch_env, monkeypatch, capsys):
    env, argv, expected = BAD_INPUTS[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc, err = run_launch(with_dirs(launch_env, argv), capsys)
    assert rc == 2
    assert err.startswith("python -m recipes.dig.launch: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


def test_bad_stage_is_an_argparse_error_in_the_same_form(launch_env, capsys):
    with pytest.raises(SystemExit) as stop:
        launch.main(["--stage", "4"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.splitlines()[-1].startswith("python -m recipes.dig.launch: error: argument --stage: invalid choice: 4")


def test_data_built_for_another_model_is_rejected(launch_env, monkeypatch, capsys):
    other = load_model_spec("qwen2_5_vl_7b")
    for split in ("train", "val"):
        write_stage_parquet(  # the default model's folder holding files built for another model
            launch_env / "data" / "qwen3_vl_8b_thinking" / "stage1" / f"{split}.parquet",
            other.min_pixels,
            other.max_pixels,
        )
    rc, err = run_launch(with_dirs(launch_env, ["--stage", "1"]), capsys)  # base_model: qwen3_vl_8b_thinking
    assert rc == 2
    assert "train.parquet" in err and "built for another model" in err


def test_no_gpu_without_dry_run_fails_before_anything_starts(launch_env, monkeypatch, capsys):
    monkeypatch.delenv("DRY_RUN")
    rc, err = run_launch(with_dirs(launch_env, ["--stage", "1"]), capsys)
    assert rc == 2
    assert "no GPU visible" in err and "DRY_RUN=1" in err
    assert not (launch_env / "ckpt").exists() and not (launch_env / "data").exists()


def test_model_file_clashing_with_builtin_name(launch_env, monkeypatch, capsys):
    clash = launch_env / "qwen2_5_vl_3b.yaml"
    shutil.copyfile(BASE_MODEL_DIR / "qwen2_5_vl_3b.yaml", clash)
    rc, err = run_launch(with_dirs(launch_env, ["--stage", "1", f"base_model={clash}"]), capsys)
    assert rc == 2 and "clashes with a built-in model" in err


def test_script_refuses_an_interpreter_without_the_stack(tmp_path):
    """launch/common.sh verifies the environment before anything: /bin/false stands for a Python without verl."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}
    env.update(DRY_RUN="1", DIG_PYTHON="/bin/false")
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "grpo_stage1.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "/bin/false cannot import verl/hydra/recipes" in result.stderr and "SETUP_ENV=1" in result.stderr


def test_training_entry_point_without_gpu_stops_before_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}
    overrides = [f"curriculum.ckpt_dir={tmp_path / 'ckpt'}", f"curriculum.data_dir={tmp_path / 'data'}"]
    result = subprocess.run(
        [sys.executable, "-m", "recipes.dig.main", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no GPU visible" in result.stderr
    assert "ray init kwargs" not in result.stdout  # run_ppo never reached ray.init


# ---------------------------------------------------------------------------------------------------------------
# One resolved plan for every stage; a copied model file; the attention backend


def test_copied_model_file_keeping_the_old_name_is_refused(launch_env, monkeypatch, capsys):
    """The data dir follows the file name, the experiment (checkpoints, resume) dig.model_name: they must agree."""
    copy = launch_env / "my_vlm.yaml"
    shutil.copyfile(BASE_MODEL_DIR / "qwen2_5_vl_3b.yaml", copy)  # model_name: qwen2_5_vl_3b left as is
    rc, err = run_launch(with_dirs(launch_env, ["--stage", "1", f"base_model={copy}"]), capsys)
    assert rc == 2
    assert "dig.model_name='qwen2_5_vl_3b' differs from the file name 'my_vlm'" in err and str(copy) in err


def test_curriculum_stage_settings_keep_the_model_and_seed_only_the_first_stage(launch_env, monkeypatch):
    monkeypatch.setenv("INIT_MODEL", "/weights/warm_start")
    settings = Settings.from_env(1, ["base_model=qwen2_5_vl_3b", "trainer.save_freq=5", *dirs(launch_env)])
    per_stage = launch.curriculum_stage_settings(settings, [1, 2, 3])
    assert [s.stage for s in per_stage] == [1, 2, 3]
    assert {s.model for s in per_stage} == {"qwen2_5_vl_3b"}
    assert {tuple(s.extra_overrides) for s in per_stage} == {("trainer.save_freq=5",)}
    assert [s.init_model for s in per_stage] == ["/weights/warm_start", None, None]


def test_curriculum_dry_run_init_model_seeds_the_first_stage_only(launch_env, monkeypatch, capsys):
    warm = launch_env / "warm_start"  # a checkpoint folder: the dry run checks config.json and the weights
    warm.mkdir()
    (warm / "config.json").write_text("{}")
    (warm / "model.safetensors").write_bytes(b"\0")
    monkeypatch.setenv("INIT_MODEL", str(warm))
    assert launch.main(with_dirs(launch_env, ["--curriculum", "1", "2", "--", "base_model=qwen2_5_vl_3b"])) == 0
    inits = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[dig] init weights: ")]
    stage1_merged = launch_env / "ckpt" / "dig" / "qwen2_5_vl_3b_stage1" / "hf_merged" / "global_step_LAST"
    assert inits == [
        f"[dig] init weights: {warm} [INIT_MODEL (explicit), checked: config.json and 1 weight file(s)]",
        f"[dig] init weights: {stage1_merged} [stage 1 runs first (curriculum); its last step is merged before "
        "stage 2 starts]",
    ]


EXPECTED_ATTENTION = {  # CPU: flash-attn does not import in the test venv
    "qwen3_vl_8b_thinking": "sdpa, use_remove_padding=true",
    "qwen3_vl_4b_thinking": "sdpa, use_remove_padding=true",
    "qwen3_vl_8b_instruct": "sdpa, use_remove_padding=true",
    "qwen2_5_vl_7b": "sdpa, use_remove_padding=false",
    "qwen2_5_vl_3b": "sdpa, use_remove_padding=false",
    "tiny_qwen3_vl_thinking": "sdpa, use_remove_padding=true",
    "tiny_qwen2_5_vl": "sdpa, use_remove_padding=false",
}


def test_attention_choice_is_printed_and_reaches_verl_for_every_model(launch_env, monkeypatch, capsys):
    assert set(EXPECTED_ATTENTION) == set(model_names())
    for model, expected in EXPECTED_ATTENTION.items():
        assert launch.main(with_dirs(launch_env, ["--stage", "1", f"base_model={model}"])) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.startswith("[dig] attention: "))
        assert line.startswith(f"[dig] attention: {expected} (flash-attn does not import: sdpa"), line
        command = next(line for line in out.splitlines() if line.startswith("[dig] command: "))
        assert "+actor_rollout_ref.model.override_config.attn_implementation=sdpa" in command
        padding = "true" if expected.endswith("true") else "false"
        assert f"actor_rollout_ref.model.use_remove_padding={padding}" in command


def test_attention_user_override_wins_and_a_crashing_one_is_refused(launch_env, capsys):
    plan = launch.plan_stage(
        dry_settings(
            launch_env,
            1,
            model="qwen3_vl_4b_thinking",
            extra_overrides=["+actor_rollout_ref.model.override_config.attn_implementation=eager"],
        )
    )
    assert plan.cfg.actor_rollout_ref.model.override_config.attn_implementation == "eager"
    assert "set by the user" in plan.attention.reason
    with pytest.raises(LaunchError, match=r"attention backend: qwen2_5_vl_3b \(qwen2_5_vl\) with use_remove_padding"):
        launch.plan_stage(
            dry_settings(
                launch_env,
                1,
                model="qwen2_5_vl_3b",
                extra_overrides=["actor_rollout_ref.model.use_remove_padding=true"],
            )
        )
