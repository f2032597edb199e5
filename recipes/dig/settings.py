"""Environment -> launch settings: every knob of the launch scripts, parsed once, here.

``KNOBS`` is the one list of environment variables the launch path reads (the table in docs/launch.md is
checked against it by tests/test_launch_settings.py). Booleans have one truth table, shared with the shell
(``dig_bool`` in launch/common.sh): ``1/true/yes`` and ``0/false/no`` (any case), unset or empty is the
default, anything else is refused by name.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dig_common.cli import CliError
from dig_common.models import DEFAULT_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = (1, 2, 3)
TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("0", "false", "no")


class LaunchError(CliError):
    """A mistake in the launch inputs; the message names the env var, override, file or stage at fault. Bad input
    in the sense of docs/cli.md: the launcher reports it as one ``prog: error: ...`` line, exit status 2."""

    def __init__(self, message: str):
        # one line, also where it quotes Hydra or verl, whose messages span several
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Knob:
    name: str
    default: str  # as documented
    meaning: str
    # who reads it: "launcher" (this module), or the script that does
    reader: str = "launcher"


# Readers of the knobs the launcher itself does not read.
COMMON_SH = "launch/common.sh"
SBATCH = "launch/slurm/dig_grpo.sbatch"

KNOBS = (
    Knob(
        "MODEL",
        f"`{DEFAULT_MODEL}`",
        "a file name of `dig_common/base_model/` or a path to a model YAML (same as the override `base_model=NAME`)",
    ),
    Knob("NNODES", "`1` (`SLURM_NNODES` under SLURM)", "`trainer.nnodes`"),
    Knob("SLURM_NNODES", "set by SLURM", "`NNODES` when that is unset"),
    Knob("GPUS_PER_NODE", "GPUs visible (8 in a dry run)", "`trainer.n_gpus_per_node`"),
    Knob(
        "DATA_DIR",
        "`data/<model>`",
        "`<DATA_DIR>/stage{1,2,3}/{train,val}.parquet`; per model, because the parquet carries the model's pixel "
        "bounds",
    ),
    Knob("CKPT_DIR", "`checkpoints`", "`<CKPT_DIR>/dig/<model>_stage<k>/` (+ `tensorboard/`, `hydra/`)"),
    Knob("DRY_RUN", "`0`", "boolean: check everything on CPU, print the plan and command, start nothing"),
    Knob("LOGGER", "`console,tensorboard`", "`trainer.logger`, e.g. `console,wandb` (needs `WANDB_API_KEY`)"),
    Knob(
        "INIT_MODEL",
        "—",
        "initial weights (HF dir or hub id) of the stage, or of the first stage of a curriculum; later stages "
        "start from the previous stage's checkpoint",
    ),
    Knob("DATA_WORKERS", "data_prep default", "render workers when the stage's data must be built"),
    Knob("DATA_BUILD_ARGS", "—", 'more `data_prep.build` arguments, e.g. `"--ray-address auto"`'),
    Knob(
        "DIG_ASSUME_PREVIOUS",
        "`0`",
        "boolean, dry runs only: plan stage k on the checkpoint stage k−1 will produce (what a curriculum dry run "
        "does for you)",
    ),
    Knob("RAY_ADDRESS", "—", "a running Ray cluster (GPUs live there): the launcher skips its local GPU check"),
    Knob(
        "DIG_SKIP_GPU_CHECK",
        "`0`",
        "boolean: `recipes.dig.main` skips its GPU/vLLM check (CPU rehearsals)",
        reader="recipes/dig/main.py",
    ),
    Knob(
        "DIG_PYTHON",
        "`.venv-gpu/bin/python` (present, or with `SETUP_ENV=1`), else `.venv/bin/python`, else `python3`",
        "interpreter for everything (a container's Python: the container route)",
        reader=COMMON_SH,
    ),
    Knob(
        "DIG_RENDER_PYTHON",
        "`.venv-render/bin/python`",
        "Blender (bpy) interpreter for building data",
        reader="data_prep/render/generate.py",
    ),
    Knob(
        "SETUP_ENV",
        "`0`",
        "boolean: if the Python lacks verl, `bash scripts/setup_gpu.sh` first (a venv only, never a system Python)",
        reader=COMMON_SH,
    ),
    Knob("STAGES", "`1 2 3`", "`curriculum.sh` only: which stages", reader="launch/curriculum.sh"),
    Knob("STAGE", "`all`", "`dig_grpo.sbatch` only: `1`, `2`, `3` or `all` (curriculum)", reader=SBATCH),
    Knob("RAY_PORT", "`6379`", "sbatch only: Ray head port", reader=SBATCH),
    Knob("RAY_NETWORK_INTERFACE", "—", "sbatch only: interface whose IPv4 the head uses (e.g. `ib0`)", reader=SBATCH),
    Knob("RAY_JOIN_TIMEOUT", "`300`", "sbatch only: seconds to wait for every node to join Ray", reader=SBATCH),
    Knob("RAY_HEAD_ARGS", "—", "sbatch only: more `ray start --head` arguments", reader=SBATCH),
    Knob("RAY_WORKER_ARGS", "—", "sbatch only: more `ray start` arguments for the worker nodes", reader=SBATCH),
    Knob("RAY_BIN", "`ray` next to the Python", "sbatch only: the `ray` executable", reader=SBATCH),
)
KNOB_NAMES = tuple(k.name for k in KNOBS)


def parse_bool(name: str, raw: str | None, default: bool = False) -> bool:
    """One truth table for every boolean knob (launch/common.sh's dig_bool is the same)."""
    text = (raw or "").strip().lower()
    if not text:
        return default
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise LaunchError(f"{name}={raw!r}: expected one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}")


def env_flag(name: str, env: dict | None = None, default: bool = False) -> bool:
    assert name in KNOB_NAMES, name
    return parse_bool(name, (os.environ if env is None else env).get(name), default)


def env_text(name: str, env: dict | None = None) -> str:
    assert name in KNOB_NAMES, name
    return (os.environ if env is None else env).get(name, "").strip()


def positive_int(name: str, raw: str | None) -> int | None:
    text = (raw or "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"{name}={text!r}: expected a positive integer")
    return int(text)


def override_key(override: str) -> str:
    """The config key a Hydra override sets: ``a.b=1``, ``+a.b=1`` (add) and ``++a.b=1`` (add or replace)."""
    return override.split("=", 1)[0].lstrip("+")


def split_model_override(model_env: str, overrides: list[str]) -> tuple[str, list[str]]:
    """MODEL from the environment or the Hydra spelling ``base_model=NAME``; the latter leaves the overrides."""
    chosen = [o.split("=", 1)[1] for o in overrides if override_key(o) == "base_model"]
    if not chosen:
        return model_env or DEFAULT_MODEL, list(overrides)
    if model_env and model_env != chosen[-1]:
        raise LaunchError(f"MODEL={model_env} and override base_model={chosen[-1]} disagree; give one")
    return chosen[-1], [o for o in overrides if override_key(o) != "base_model"]


@dataclass
class Settings:
    """The resolved launch inputs; one object plans (and runs) every stage of a curriculum."""

    stage: int
    model: str = DEFAULT_MODEL
    nnodes: int = 1
    gpus_per_node: int | None = None
    data_dir: Path | None = None
    ckpt_dir: Path = REPO_ROOT / "checkpoints"
    dry_run: bool = False
    logger: list[str] | None = None
    init_model: str | None = None
    # render worker processes for a missing dataset (data_prep.build --workers); None: its default
    data_workers: int | None = None
    # further data_prep.build arguments, e.g. ["--ray-address", "auto"]
    data_build_args: list[str] = field(default_factory=list)
    # dry runs of a whole curriculum: stage k-1 has not run yet but will have when stage k starts
    assume_previous: bool = False
    # GPUs live in a Ray cluster (RAY_ADDRESS): no local GPU check
    ray_address: str | None = None
    extra_overrides: list[str] = field(default_factory=list)
    python: str = sys.executable

    @classmethod
    def from_env(cls, stage: int, extra_overrides: list[str], env: dict | None = None) -> Settings:
        env = {k: v for k, v in (os.environ if env is None else env).items() if k in KNOB_NAMES}

        def text(name: str) -> str:
            return env.get(name, "").strip()

        model, overrides = split_model_override(text("MODEL"), extra_overrides)
        return cls(
            stage=stage,
            model=model,
            nnodes=positive_int("NNODES", text("NNODES")) or positive_int("SLURM_NNODES", text("SLURM_NNODES")) or 1,
            gpus_per_node=positive_int("GPUS_PER_NODE", text("GPUS_PER_NODE")),
            data_dir=Path(text("DATA_DIR")).expanduser().resolve() if text("DATA_DIR") else None,
            ckpt_dir=Path(text("CKPT_DIR")).expanduser().resolve() if text("CKPT_DIR") else REPO_ROOT / "checkpoints",
            dry_run=parse_bool("DRY_RUN", env.get("DRY_RUN")),
            logger=[b.strip() for b in text("LOGGER").split(",") if b.strip()] or None,
            init_model=text("INIT_MODEL") or None,
            data_workers=positive_int("DATA_WORKERS", text("DATA_WORKERS")),
            data_build_args=shlex.split(env.get("DATA_BUILD_ARGS", "")),
            assume_previous=parse_bool("DIG_ASSUME_PREVIOUS", env.get("DIG_ASSUME_PREVIOUS")),
            ray_address=text("RAY_ADDRESS") or None,
            extra_overrides=overrides,
            python=text("DIG_PYTHON") or sys.executable,
        )


def knob_table() -> str:
    """The Markdown table of docs/launch.md (a test keeps the two equal): ``python -m recipes.dig.settings``."""
    rows = ["| env var | default | read by | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k.name}` | {k.default} | {k.reader} | {k.meaning} |" for k in KNOBS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(knob_table())
