"""Environment and overrides -> launch settings, parsed once, here.

One channel per setting: a configuration value is a Hydra key with its one default in
``recipes/dig/config/dig_grpo.yaml`` (``CONFIG_KEYS`` lists the ones the launcher reads or fills in); environment
variables are only launcher behaviour (``KNOBS``: dry run, stages, initial weights, setup, the Python, SLURM/Ray
plumbing). A variable that used to carry a setting (``REMOVED_KNOBS``) stops the launch naming its key. The
tables in docs/launch.md are ``python -m recipes.dig.settings`` (tests/test_launch_settings.py keeps them equal).
Booleans have one truth table, shared with the shell (``dig_bool`` in launch/common.sh): ``1/true/yes`` and
``0/false/no`` (any case), unset or empty is the default, anything else is refused by name.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dig_common.cli import CliError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = Path(__file__).resolve().parent / "config" / "dig_grpo.yaml"
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
    Knob("DRY_RUN", "`0`", "boolean: check everything on CPU, print the plan and command, start nothing"),
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
        "boolean: skip the GPU checks (the launch scripts' before any setup, `recipes.dig.main`'s GPU/vLLM check); "
        "`profile=cpu` needs no such flag",
        reader="launch/common.sh",
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


@dataclass(frozen=True)
class ConfigKey:
    key: str  # a Hydra key of dig_grpo.yaml (or a config group)
    meaning: str
    launcher: str  # what the launcher does with it


CONFIG_KEYS = (
    ConfigKey(
        "base_model",
        "a file name of `dig_common/base_model/` or a path to a model YAML",
        "a path is copied into a search-path folder so Hydra can select it",
    ),
    ConfigKey(
        "curriculum.data_dir",
        "`<data_dir>/<model>/stage{1,2,3}/{train,val}.parquet`; the pairs in `<data_dir>/pairs/` are shared by "
        "every model",
        "made absolute (the default against the repo, a given one against the cwd); builds missing parquets there",
    ),
    ConfigKey(
        "curriculum.ckpt_dir",
        "`<ckpt_dir>/dig/<model>_stage<k>/` (+ `tensorboard/`, `hydra/`)",
        "made absolute like `curriculum.data_dir`",
    ),
    ConfigKey(
        "tuning",
        "`full` (every weight) or `lora` (adapters on the language model, `config/tuning/lora.yaml`)",
        "prints the choice; a LoRA stage's merge gets its adapter folded in (`recipes/dig/lora.py`)",
    ),
    ConfigKey(
        "profile",
        "none (a GPU cluster), `1gpu` (one 80 GB card) or `cpu` (the CPU rehearsal): `config/profile/`",
        "a profile sets its own GPU count; `cpu` skips the GPU checks",
    ),
    ConfigKey(
        "algorithm.filter_groups.enable",
        "dynamic sampling: replace groups whose samples all score the same (recommended for stage 1)",
        "checks its metric and bound (`max_num_gen_batches` > 0); prints the choice",
    ),
    ConfigKey("trainer.nnodes", "nodes", "`dig_grpo.sbatch` passes the job's node count"),
    ConfigKey(
        "trainer.n_gpus_per_node",
        "GPUs per node",
        "a real run without it (and without a profile) takes the GPUs this node sees; `dig_grpo.sbatch` passes "
        "SLURM's count",
    ),
    ConfigKey("trainer.logger", "e.g. `[console,wandb]` (needs `WANDB_API_KEY`)", "checked against verl's backends"),
    ConfigKey(
        "live.pictures",
        "validation pairs drawn per validation into TensorBoard/W&B (docs/watching.md); `0`: no pictures, no "
        "`dig/val/*` curves",
        "—",
    ),
    ConfigKey("live.poll_seconds", "how often the driver looks for a new validation dump", "—"),
)
# Environment variables that used to carry a setting: set, they stop the launch naming the override instead.
REMOVED_KNOBS = {
    "MODEL": "base_model=NAME",
    "NNODES": "trainer.nnodes=N",
    "GPUS_PER_NODE": "trainer.n_gpus_per_node=N",
    "DATA_DIR": "curriculum.data_dir=DIR",
    "CKPT_DIR": "curriculum.ckpt_dir=DIR",
    "LOGGER": "trainer.logger=[console,wandb]",
}


def config_defaults() -> dict:
    """dig_grpo.yaml as plain YAML (its interpolations unresolved): the one home of every default."""
    return yaml.safe_load(CONFIG_FILE.read_text(encoding="utf-8"))


def default_model() -> str:
    """The ``base_model`` entry of dig_grpo.yaml's defaults list."""
    return next(d["base_model"] for d in config_defaults()["defaults"] if isinstance(d, dict) and "base_model" in d)


def check_removed_knobs(env: dict) -> None:
    for name, replacement in REMOVED_KNOBS.items():
        if env.get(name, "").strip():
            raise LaunchError(
                f"{name}={env[name].strip()!r}: the environment no longer sets this; pass the Hydra override "
                f"{replacement} instead (docs/launch.md, Knobs)"
            )


def parse_bool(name: str, raw: str | None, default: bool = False) -> bool:
    """One truth table for every boolean knob and the launcher's boolean overrides (recipes/dig/attention.py);
    launch/common.sh's dig_bool cannot import it and repeats it (a test keeps the two equal)."""
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


def take_override(key: str, overrides: list[str]) -> tuple[str | None, list[str]]:
    """The value the overrides give ``key`` (the last one wins, as in Hydra) and the overrides without it: the
    launcher re-emits it in its own form (a model option, an absolute path)."""
    chosen = [o.split("=", 1)[1] for o in overrides if override_key(o) == key and "=" in o]
    return (chosen[-1] if chosen else None), [o for o in overrides if override_key(o) != key]


def launch_dir(key: str, given: str | None) -> Path:
    """A path setting made absolute: a given value against the cwd, the YAML default against the repo."""
    if given:
        return Path(given.strip("'\"")).expanduser().resolve()
    section, name = key.split(".")
    return (REPO_ROOT / str(config_defaults()[section][name])).resolve()


@dataclass
class Settings:
    """The resolved launch inputs; one object plans (and runs) every stage of a curriculum."""

    stage: int
    model: str = field(default_factory=default_model)  # base_model=
    data_dir: Path = field(default_factory=lambda: launch_dir("curriculum.data_dir", None))
    ckpt_dir: Path = field(default_factory=lambda: launch_dir("curriculum.ckpt_dir", None))
    # trainer.n_gpus_per_node the launcher adds: what a real run's node sees, unless the overrides set it
    gpus_per_node: int | None = None
    dry_run: bool = False
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
        env = dict(os.environ if env is None else env)
        check_removed_knobs(env)
        env = {k: v for k, v in env.items() if k in KNOB_NAMES}

        def text(name: str) -> str:
            return env.get(name, "").strip()

        model, overrides = take_override("base_model", extra_overrides)
        data_dir, overrides = take_override("curriculum.data_dir", overrides)
        ckpt_dir, overrides = take_override("curriculum.ckpt_dir", overrides)
        return cls(
            stage=stage,
            model=model or default_model(),
            data_dir=launch_dir("curriculum.data_dir", data_dir),
            ckpt_dir=launch_dir("curriculum.ckpt_dir", ckpt_dir),
            dry_run=parse_bool("DRY_RUN", env.get("DRY_RUN")),
            init_model=text("INIT_MODEL") or None,
            data_workers=positive_int("DATA_WORKERS", text("DATA_WORKERS")),
            data_build_args=shlex.split(env.get("DATA_BUILD_ARGS", "")),
            assume_previous=parse_bool("DIG_ASSUME_PREVIOUS", env.get("DIG_ASSUME_PREVIOUS")),
            ray_address=text("RAY_ADDRESS") or None,
            extra_overrides=overrides,
            python=text("DIG_PYTHON") or sys.executable,
        )


def knob_table() -> str:
    """The Markdown tables of docs/launch.md (a test keeps them equal): ``python -m recipes.dig.settings``."""
    defaults = config_defaults()

    def default(key: str) -> str:
        if key == "base_model":
            return f"`{default_model()}`"
        if "." not in key:  # a config group of the defaults list
            chosen = next(e[key] for e in defaults["defaults"] if isinstance(e, dict) and key in e)
            return f"`{chosen}`" if chosen is not None else "none"
        value = defaults
        for part in key.split("."):
            value = value[part]
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        return f"`[{','.join(value)}]`" if isinstance(value, list) else f"`{value}`"

    rows = ["Settings: Hydra keys, each with its one default in `recipes/dig/config/dig_grpo.yaml`.", ""]
    rows += ["| key | default | meaning | the launcher |", "|---|---|---|---|"]
    rows += [f"| `{c.key}` | {default(c.key)} | {c.meaning} | {c.launcher} |" for c in CONFIG_KEYS]
    rows += ["", "Launcher behaviour: environment variables.", ""]
    rows += ["| env var | default | read by | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k.name}` | {k.default} | {k.reader} | {k.meaning} |" for k in KNOBS]
    rows += ["", "Removed environment variables (set, they stop the launch naming the override):", ""]
    rows += ["| was | now |", "|---|---|"]
    rows += [f"| `{name}` | `{replacement}` |" for name, replacement in REMOVED_KNOBS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(knob_table())
