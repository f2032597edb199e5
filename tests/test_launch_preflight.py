"""Dry runs refuse what a real run would fail on: initial weights that are not there, a curriculum that assumes a
stage it does not run, mini-batches verl only checks after the first rollout. One field varies per case; the
model is the default one (no MODEL, no base_model=)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.dig import launch
from recipes.dig.handoff import check_init_model
from recipes.dig.settings import KNOB_NAMES, LaunchError
from recipes.dig.settings import REPO_ROOT as REPO

pytestmark = pytest.mark.verl

PREFIX = "python -m recipes.dig.launch: error: "
# settings some launchers read from the environment and others refuse there: none may leak into these tests
SETTINGS_ONCE_IN_THE_ENV = ("MODEL", "NNODES", "SLURM_NNODES", "GPUS_PER_NODE", "DATA_DIR", "CKPT_DIR", "LOGGER")


@pytest.fixture
def launch_env(tmp_path, monkeypatch):
    """A dry run with nothing from the environment: its folders come as Hydra overrides (``dirs``)."""
    for key in (*KNOB_NAMES, *SETTINGS_ONCE_IN_THE_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DRY_RUN", "1")
    return tmp_path


def dirs(root) -> list[str]:
    return [f"curriculum.data_dir={root / 'data'}", f"curriculum.ckpt_dir={root / 'ckpt'}"]


def with_dirs(argv: list[str], root) -> list[str]:
    """``argv`` with the folders: after ``--`` for --curriculum (its stage list takes every number)."""
    if argv[0] == "--curriculum":
        return [*argv, "--", *dirs(root)]
    return [*argv[:2], *dirs(root), *argv[2:]]


def one_line_error(capsys, argv, root) -> str:
    rc = launch.main(with_dirs(argv, root))
    captured = capsys.readouterr()
    assert rc == 2, captured.out[-2000:]
    assert captured.err.startswith(PREFIX) and captured.err.count("\n") == 1, captured.err
    last = [a for a in argv if a.isdigit()][-1]
    assert f"DRY_RUN: stage {last} OK" not in captured.out
    return captured.err


def hf_folder(path, config=True, weights=True):
    path.mkdir(parents=True)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    if weights:
        (path / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 16)
    return path


# ---- INIT_MODEL ------------------------------------------------------------------------------------------


def test_init_model_that_does_not_exist_is_refused(launch_env, monkeypatch, capsys):
    monkeypatch.setenv("INIT_MODEL", "/nonexistent")
    err = one_line_error(capsys, ["--stage", "1"], launch_env)
    assert "INIT_MODEL=/nonexistent: no such folder" in err and "config.json" in err and "hub id" in err


@pytest.mark.parametrize(
    ("config", "weights", "missing"), [(True, False, "no weights"), (False, True, "no config.json")]
)
def test_init_model_folder_missing_one_part_is_refused(launch_env, monkeypatch, capsys, config, weights, missing):
    folder = hf_folder(launch_env / "warm", config=config, weights=weights)
    monkeypatch.setenv("INIT_MODEL", str(folder))
    err = one_line_error(capsys, ["--stage", "2"], launch_env)
    assert f"INIT_MODEL={folder}: not a complete checkpoint folder ({missing}" in err


def test_init_model_that_is_a_file_is_refused(launch_env, monkeypatch, capsys):
    weights = launch_env / "model.safetensors"
    weights.write_bytes(b"\0")
    monkeypatch.setenv("INIT_MODEL", str(weights))
    assert "not a folder" in one_line_error(capsys, ["--stage", "1"], launch_env)


def test_a_complete_init_model_folder_or_a_hub_id_passes(launch_env, monkeypatch, capsys):
    folder = hf_folder(launch_env / "warm")
    monkeypatch.setenv("INIT_MODEL", str(folder))
    assert launch.main(["--stage", "2", *dirs(launch_env)]) == 0
    out = capsys.readouterr().out
    assert f"[dig] init weights: {folder} [INIT_MODEL (explicit), checked: config.json and 1 weight file(s)]" in out
    assert check_init_model("Qwen/Qwen2.5-VL-3B-Instruct") == "INIT_MODEL (explicit), a hub id: the run downloads it"
    with pytest.raises(LaunchError, match="no such folder"):
        check_init_model("./Qwen/Qwen2.5-VL-3B-Instruct")  # a path, not an id


# ---- curriculum: which stage runs first -------------------------------------------------------------------


def test_curriculum_without_its_first_stage_needs_that_checkpoint(launch_env, capsys):
    """STAGES="2 3" with no stage-1 checkpoint: stage 1 does not run first, so the dry run must not say it does."""
    err = one_line_error(capsys, ["--curriculum", "2", "3"], launch_env)
    assert "stage 1 checkpoint missing" in err and "launch/grpo_stage1.sh" in err


def test_curriculum_with_a_gap_needs_the_missing_stage(launch_env, capsys):
    err = one_line_error(capsys, ["--curriculum", "1", "3"], launch_env)
    assert "stage 2 checkpoint missing" in err


def test_curriculum_in_order_plans_on_the_stage_before(launch_env, capsys):
    assert launch.main(with_dirs(["--curriculum", "1", "2", "3"], launch_env)) == 0
    out = capsys.readouterr().out
    assert "[stage 1 runs first (curriculum)" in out and "[stage 2 runs first (curriculum)" in out


def test_curriculum_settings_assume_only_a_predecessor_in_the_list(launch_env):
    settings = launch.Settings.from_env(2, dirs(launch_env))
    per_stage = launch.curriculum_stage_settings(settings, [2, 3])
    assert [s.assume_previous for s in per_stage] == [False, True]
    per_stage = launch.curriculum_stage_settings(launch.Settings.from_env(1, []), [1, 3])
    assert [s.assume_previous for s in per_stage] == [False, False]


# ---- mini-batches under dynamic batch sizes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # below: verl's ActorConfig.validate skips this check under use_dynamic_bsz=true (the recipe's setting)
        (
            ["data.train_batch_size=8"],
            "data.train_batch_size=8 is below actor_rollout_ref.actor.ppo_mini_batch_size=32",
        ),
        (["data.train_batch_size=48"], "data.train_batch_size=48 is not a multiple of"),
        # 1 x 3 samples per mini-batch over the 8 ranks of a node (n=3 keeps 64 x 3 divisible by the 8 GPUs)
        (
            ["actor_rollout_ref.actor.ppo_mini_batch_size=1", "actor_rollout_ref.rollout.n=3"],
            "= 1 x 3 is not divisible by the 8 data-parallel ranks",
        ),
    ],
)
def test_mini_batches_a_real_run_would_stop_on_are_refused(launch_env, capsys, overrides, expected):
    err = one_line_error(capsys, ["--stage", "1", *overrides], launch_env)
    assert expected in err, err


def test_mini_batches_that_divide_pass(launch_env):
    overrides = ["data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "trainer.nnodes=2"]
    assert launch.main(["--stage", "1", *overrides, *dirs(launch_env)]) == 0


# ---- data built for another model: one field differs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "change", "why"),
    [
        ("qwen3_vl_8b_instruct", {}, "its instruction is another model's"),  # same pixel bounds, other prompt
        ("qwen3_vl_8b_thinking", {"max_pixels": 401408}, "its images carry max_pixels=401408"),  # bounds alone
    ],
)
def test_data_differing_from_the_model_in_one_field_is_refused(launch_env, capsys, built, change, why):
    from test_cli_eval import model_parquet

    cfg = launch.plan_stage(launch.Settings.from_env(1, dirs(launch_env))).cfg  # where stage 1's data goes
    for path in (Path(cfg.data.train_files), Path(cfg.data.val_files)):
        path.parent.mkdir(parents=True, exist_ok=True)
        model_parquet(path, built, **change)
    err = one_line_error(capsys, ["--stage", "1"], launch_env)  # the default model: qwen3_vl_8b_thinking
    assert "train.parquet: " + why in err and "built for another model" in err


# ---- defaults a user gets without setting them ---------------------------------------------------------------


def test_without_a_data_dir_the_data_lives_in_the_repo_per_model(launch_env):
    """No data dir given (every other launch test gives one): the repo's data/, per model, and the build command
    writes there; a dry run creates nothing."""
    plan = launch.plan_stage(launch.Settings.from_env(1, [f"curriculum.ckpt_dir={launch_env / 'ckpt'}"]))
    stage1 = REPO / "data" / "qwen3_vl_8b_thinking" / "stage1"  # the default model
    assert plan.cfg.data.train_files == str(stage1 / "train.parquet")
    assert plan.cfg.data.val_files == str(stage1 / "val.parquet")
    command = plan.data.build_command
    assert Path(command[command.index("--out-dir") + 1]) in (stage1.parent, stage1.parent.parent)
    assert not stage1.exists()


# ---- a stage-1 merge folder that lacks one part is not a finished merge ------------------------------------------


@pytest.mark.parametrize(
    ("config", "weights", "merged"), [(True, False, False), (False, True, False), (True, True, True)]
)
def test_stage2_plans_the_merge_unless_the_merged_folder_is_complete(launch_env, config, weights, merged):
    """Stage 1 finished at step 4; its hf_merged/global_step_4 holds config.json and/or weights (one part varies):
    only both make it a finished merge, else stage 2 plans the merge again."""
    stage1 = launch_env / "ckpt" / "dig" / "qwen3_vl_8b_thinking_stage1"
    actor = stage1 / "global_step_4" / "actor"
    actor.mkdir(parents=True)
    (actor / "fsdp_config.json").write_text("{}")
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"\0")
    (stage1 / "dig_stage_done.json").write_text(json.dumps({"global_step": 4}))
    target = stage1 / "hf_merged" / "global_step_4"
    target.mkdir(parents=True)
    if config:
        (target / "config.json").write_text("{}")
    if weights:
        (target / "model.safetensors").write_bytes(b"\0")
    plan = launch.plan_stage(launch.Settings.from_env(2, dirs(launch_env)))
    assert plan.cfg.actor_rollout_ref.model.path == str(target)
    assert (plan.handoff.merge_command is None) == merged
    assert ("already merged" in plan.handoff.note) == merged
