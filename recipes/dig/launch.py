"""One implementation behind launch/grpo_stage{1,2,3}.sh, launch/curriculum.sh and launch/slurm/*.sbatch.

    python -m recipes.dig.launch --stage K [--status] [HYDRA_OVERRIDE ...]

Reads MODEL, NNODES, GPUS_PER_NODE, DATA_DIR, CKPT_DIR, DRY_RUN, LOGGER, INIT_MODEL from the environment.
For one curriculum stage it composes the exact config the run will use (recipes/dig/config/dig_grpo.yaml via
Hydra), runs verl's own validate_config, loads the reward through verl's loader, checks the data and the
initial weights (stage k > 1: the merged HF checkpoint of stage k-1's last step), then either prints the
command (DRY_RUN=1) or builds missing data, merges the stage k-1 checkpoint if needed and execs
``python -m recipes.dig.main <overrides>``. Every error names its culprit and comes before anything slow.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipes.dig.models import DEFAULT_MODEL, ModelSpec, load_model_spec, model_file

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(__file__).resolve().parent / "config"
CONFIG_NAME = "dig_grpo"
STAGES = (1, 2, 3)
# Written by recipes/dig/main.py when a stage's training loop returned normally.
DONE_MARKER = "dig_stage_done.json"
# Merged HF weights of <experiment>/global_step_N live in <experiment>/hf_merged/global_step_N.
MERGED_DIRNAME = "hf_merged"
# What data_prep.build will render (data, not code: pair counts and image size per stage live there).
STAGES_FILE = REPO_ROOT / "data_prep" / "stages.yaml"
DEFAULT_PAIRS_PER_SPLIT = {"train": 1600, "val": 200}  # DESIGN §7, used if stages.yaml is absent
RENDER_SEC_PER_PAIR = 4.5  # 480x320, 16 spp: measured wall time per pair on a 2-core box
REQUIRED_COLUMNS = ("data_source", "prompt", "images", "ability", "reward_model", "extra_info")
# Text part of a prompt (instruction + chat template) in tokens: a generous bound for the budget check.
PROMPT_TEXT_TOKENS = 300
# Keys main_ppo no longer reads (docs/verl.md §2): Hydra accepts them, verl silently ignores them.
LEGACY_REWARD_PREFIXES = ("custom_reward_function.", "reward_model.reward_kwargs", "reward_model.reward_manager")


class LaunchError(Exception):
    """A mistake in the launch inputs; the message names the env var, override, file or stage at fault."""


@dataclass
class Settings:
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
    extra_overrides: list[str] = field(default_factory=list)
    python: str = sys.executable

    @classmethod
    def from_env(cls, stage: int, extra_overrides: list[str], env: dict | None = None) -> Settings:
        env = dict(os.environ if env is None else env)

        def positive_int(name: str, default: int | None) -> int | None:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            if not raw.isdigit() or int(raw) < 1:
                raise LaunchError(f"{name}={raw!r}: expected a positive integer")
            return int(raw)

        model = env.get("MODEL", "").strip() or DEFAULT_MODEL
        # `base_model=NAME` on the command line is the Hydra spelling of MODEL=NAME
        chosen = [o.split("=", 1)[1] for o in extra_overrides if o.split("=", 1)[0].lstrip("+") == "base_model"]
        if chosen:
            if env.get("MODEL", "").strip() and env["MODEL"].strip() != chosen[-1]:
                raise LaunchError(f"MODEL={env['MODEL']} and override base_model={chosen[-1]} disagree; give one")
            model = chosen[-1]
            extra_overrides = [o for o in extra_overrides if o.split("=", 1)[0].lstrip("+") != "base_model"]
        nnodes = positive_int("NNODES", None) or positive_int("SLURM_NNODES", 1)
        gpus = positive_int("GPUS_PER_NODE", None)
        data_dir = env.get("DATA_DIR", "").strip()
        ckpt_dir = env.get("CKPT_DIR", "").strip()
        logger = [b.strip() for b in env.get("LOGGER", "").split(",") if b.strip()] or None
        return cls(
            stage=stage,
            model=model,
            nnodes=nnodes,
            gpus_per_node=gpus,
            data_dir=Path(data_dir).expanduser().resolve() if data_dir else None,
            ckpt_dir=Path(ckpt_dir).expanduser().resolve() if ckpt_dir else REPO_ROOT / "checkpoints",
            dry_run=env.get("DRY_RUN", "0").strip() not in ("", "0", "false", "False"),
            logger=logger,
            init_model=env.get("INIT_MODEL", "").strip() or None,
            data_workers=positive_int("DATA_WORKERS", None),
            data_build_args=shlex.split(env.get("DATA_BUILD_ARGS", "")),
            assume_previous=env.get("DIG_ASSUME_PREVIOUS", "0").strip() not in ("", "0"),
            extra_overrides=list(extra_overrides),
            python=env.get("DIG_PYTHON") or sys.executable,
        )


@dataclass
class Handoff:
    """Where stage k's initial weights come from."""

    init_path: str
    # human-readable origin: base model / existing merge / merge to run / explicit INIT_MODEL
    note: str
    merge_command: list[str] | None = None
    merge_target: Path | None = None


# --------------------------------------------------------------------------------------------------------------
# Config composition


def resolve_model(settings: Settings) -> tuple[ModelSpec, str, Path | None]:
    """(spec, Hydra option name, overlay search dir or None) for MODEL, a name or a path to a YAML file."""
    try:
        path = model_file(settings.model)
        spec = load_model_spec(path)
    except (ValueError, FileNotFoundError) as err:
        raise LaunchError(f"MODEL={settings.model}: {err}") from err
    if path.parent.resolve() == (CONFIG_DIR / "base_model").resolve():
        return spec, path.stem, None
    if (CONFIG_DIR / "base_model" / f"{path.stem}.yaml").exists():
        raise LaunchError(
            f"MODEL={settings.model}: its name {path.stem!r} clashes with a built-in model; rename the file"
        )
    return spec, path.stem, path


def model_overlay_dir(model_path: Path, root: Path) -> Path:
    """A search-path folder holding base_model/<stem>.yaml, so Hydra can select a model file from anywhere."""
    target = root / "base_model" / model_path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(model_path, tmp)
    os.replace(tmp, target)
    return root


def hydra_value(value: object) -> str:
    """A path as a Hydra override value: quoted when it holds characters the override grammar treats specially."""
    text = str(value)
    if all(c.isalnum() or c in "_./-:" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stage_overrides(settings: Settings, stage: int, model_option: str, overlay: Path | None) -> list[str]:
    """The overrides the launcher adds for one stage, before the user's own (which win)."""
    data_dir = settings.data_dir or (REPO_ROOT / "data" / model_option)
    overrides = [
        f"base_model={model_option}",
        f"stage=stage{stage}",
        f"curriculum.data_dir={hydra_value(data_dir)}",
        f"curriculum.ckpt_dir={hydra_value(settings.ckpt_dir)}",
        f"trainer.nnodes={settings.nnodes}",
    ]
    if settings.gpus_per_node is not None:
        overrides.append(f"trainer.n_gpus_per_node={settings.gpus_per_node}")
    if settings.logger:
        overrides.append(f"trainer.logger=[{','.join(settings.logger)}]")
    if overlay is not None:
        overrides.append(f"hydra.searchpath=[pkg://verl.trainer.config,{hydra_value(f'file://{overlay}')}]")
    return overrides


def check_override_syntax(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" not in item and not item.startswith("~"):
            raise LaunchError(f"override {item!r}: expected key=value (Hydra syntax)")
        if key.startswith(LEGACY_REWARD_PREFIXES):
            raise LaunchError(
                f"override {item!r}: verl 0.9 ignores the legacy top-level reward keys (main_ppo no longer migrates "
                f"them); use reward.custom_reward_function.* / reward.reward_manager.* instead"
            )
        if key == "stage":
            raise LaunchError(f"override {item!r}: the stage is chosen by the script (launch/grpo_stage<k>.sh)")


def compose(overrides: list[str]):
    """Compose dig_grpo.yaml exactly as ``@hydra.main`` in recipes/dig/main.py does for the same overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return hydra_compose(CONFIG_NAME, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        message = str(err).strip()
        culprit = next((o for o in overrides if o in message), None) or next(
            (o for o in overrides if f"'{o.split('=', 1)[0].lstrip('+~')}'" in message), None
        )
        hint = f"override {culprit!r} rejected" if culprit else "config composition failed"
        raise LaunchError(f"{hint}: {message} (new keys need a leading '+'; check the spelling)") from err


def check_override_types(base_cfg, cfg, overrides: list[str]) -> None:
    """A number or flag overridden with text (trainer.save_freq=often) composes fine and crashes on the GPUs."""
    from omegaconf import OmegaConf

    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith(("+", "~")) or key.startswith("hydra."):
            continue
        default = OmegaConf.select(base_cfg, key, default=None, throw_on_missing=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise LaunchError(f"override {item!r}: {key} is a flag (default {default}); use true/false")
        if isinstance(default, int | float) and not isinstance(default, bool) and isinstance(value, str):
            raise LaunchError(f"override {item!r}: {key} is a number (default {default}), got text {value!r}")


def validate(cfg) -> None:
    """verl's own static checks (what main_ppo.main runs before Ray) plus the rollout dataclass checks."""
    import warnings

    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    try:
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    except Exception as err:  # verl raises AssertionError/ValueError/TypeError/omegaconf errors
        raise LaunchError(f"verl validate_config rejected the config: {type(err).__name__}: {err}") from err
    check_recipe_invariants(cfg)


def check_recipe_invariants(cfg) -> None:
    """Mistakes verl only notices on GPUs (or never): catch them here."""
    from verl.utils.tracking import Tracking

    trainer, rollout, data = cfg.trainer, cfg.actor_rollout_ref.rollout, cfg.data
    n_gpus = trainer.nnodes * trainer.n_gpus_per_node
    if trainer.n_gpus_per_node % rollout.tensor_model_parallel_size:
        raise LaunchError(
            f"actor_rollout_ref.rollout.tensor_model_parallel_size={rollout.tensor_model_parallel_size} must divide "
            f"trainer.n_gpus_per_node={trainer.n_gpus_per_node} (GPUS_PER_NODE)"
        )
    if (data.train_batch_size * rollout.n) % n_gpus:
        raise LaunchError(
            f"data.train_batch_size x rollout.n = {data.train_batch_size} x {rollout.n} must be divisible by the "
            f"{n_gpus} GPUs (NNODES x GPUS_PER_NODE)"
        )
    longest = data.max_prompt_length + data.max_response_length
    if not rollout.enable_chunked_prefill and rollout.max_num_batched_tokens < longest:
        raise LaunchError(
            f"actor_rollout_ref.rollout.max_num_batched_tokens={rollout.max_num_batched_tokens} < max_prompt_length + "
            f"max_response_length = {longest}: vLLM cannot prefill without chunked prefill"
        )
    if cfg.actor_rollout_ref.actor.ppo_max_token_len_per_gpu < longest:
        raise LaunchError(
            f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={cfg.actor_rollout_ref.actor.ppo_max_token_len_per_gpu}"
            f" < max_prompt_length + max_response_length = {longest}"
        )
    if data.image_patch_size != cfg.dig.patch_size:
        raise LaunchError(
            f"data.image_patch_size={data.image_patch_size} differs from dig.patch_size={cfg.dig.patch_size}"
        )
    if rollout.get("limit_images", None) != 2:
        raise LaunchError("actor_rollout_ref.rollout.limit_images must be 2 (image A and image B per prompt)")
    backends = [trainer.logger] if isinstance(trainer.logger, str) else list(trainer.logger)
    unknown = [b for b in backends if b not in Tracking.supported_backend]
    if unknown:
        raise LaunchError(
            f"trainer.logger (LOGGER): unknown backend(s) {unknown}; verl supports {Tracking.supported_backend}"
        )
    if cfg.reward.custom_reward_function.path is None:
        raise LaunchError("reward.custom_reward_function.path is null: verl would fall back to its default scorer")


def check_reward_kwargs(cfg, spec: ModelSpec) -> None:
    """The reward must see the same frame and pixel bounds the parquet was written with (DESIGN §4)."""
    from omegaconf import OmegaConf

    from reward_fns.dig_reward import check_reward_kwargs as validate_knobs

    kwargs = OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs, resolve=True)
    try:  # compute_score never raises, so a typo'd knob would be silently ignored for a whole run
        validate_knobs(**kwargs)
    except ValueError as err:
        raise LaunchError(f"reward.custom_reward_function.reward_kwargs: {err}") from err
    for key, want in spec.reward_kwargs().items():
        if kwargs.get(key) != want:
            raise LaunchError(
                f"reward.custom_reward_function.reward_kwargs.{key}={kwargs.get(key)!r} but the model file says "
                f"dig.{key}={want!r}; set it in the model file's dig: block, not on the command line"
            )


def load_reward(cfg):
    """Load compute_score through verl's own loader and score one malformed answer (must not raise)."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    path = cfg.reward.custom_reward_function.path
    try:
        fn = get_custom_reward_fn(cfg)
    except Exception as err:
        raise LaunchError(
            f"reward.custom_reward_function.path={path}: cannot load: {type(err).__name__}: {err}"
        ) from err
    if fn is None:
        raise LaunchError("reward.custom_reward_function.path is not set")
    ground_truth = json.dumps({"boxes": [[10, 10, 20, 20]], "width": 64, "height": 64})
    try:
        result = fn(data_source="dig", solution_str="no boxes here", ground_truth=ground_truth, extra_info={})
    except Exception as err:
        raise LaunchError(
            f"reward {path}: compute_score raised on a malformed answer: {type(err).__name__}: {err}"
        ) from err
    if not (isinstance(result, dict) and "score" in result) and not isinstance(result, int | float):
        raise LaunchError(
            f"reward {path}: compute_score returned {type(result).__name__}; verl needs a float or a dict with 'score'"
        )
    return result


# --------------------------------------------------------------------------------------------------------------
# Stage handoff


def experiment_dir(cfg) -> Path:
    return Path(cfg.trainer.default_local_dir)


def latest_step(exp_dir: Path) -> int | None:
    tracker = exp_dir / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise LaunchError(f"{tracker}: expected a step number, found {text!r}")
    return int(text)


def stage_done(exp_dir: Path) -> dict | None:
    marker = exp_dir / DONE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def merged_dir(exp_dir: Path, step: int) -> Path:
    return exp_dir / MERGED_DIRNAME / f"global_step_{step}"


def is_merged(target: Path) -> bool:
    """A finished merge: the rename from the temp dir happened, so config and weights are all there."""
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def merge_command(python: str, actor_dir: Path, target: Path) -> list[str]:
    return [python, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(actor_dir),
            "--target_dir", str(target)]  # fmt: skip


def plan_handoff(settings: Settings, stage: int, prev_cfg, spec: ModelSpec) -> Handoff:
    """Stage 1: the base model. Stage k: stage k-1's last step, merged to HF (merge planned if not done yet)."""
    if settings.init_model:
        return Handoff(settings.init_model, "INIT_MODEL (explicit)")
    if stage == 1:
        return Handoff(spec.hf_path, f"base model {spec.hf_path}")
    prev_dir = experiment_dir(prev_cfg)
    prev_script = f"launch/grpo_stage{stage - 1}.sh"
    done = stage_done(prev_dir)
    if done is None:
        if settings.assume_previous:
            return Handoff(
                str(prev_dir / MERGED_DIRNAME / "global_step_LAST"),
                f"stage {stage - 1} runs first (curriculum); its last step is merged before stage {stage} starts",
            )
        step = latest_step(prev_dir)
        state = f"its latest checkpoint is global_step_{step}" if step else "it has no checkpoint"
        raise LaunchError(
            f"stage {stage - 1} checkpoint missing: {prev_dir} has no {DONE_MARKER} ({state}). Run (or resume) "
            f"{prev_script} with the same MODEL/CKPT_DIR first, or set INIT_MODEL=<HF dir> to start stage {stage} "
            f"from given weights"
        )
    step = int(done["global_step"])
    actor_dir = prev_dir / f"global_step_{step}" / "actor"
    target = merged_dir(prev_dir, step)
    if is_merged(target):
        return Handoff(str(target), f"stage {stage - 1} global_step_{step}, already merged")
    if not (actor_dir / "fsdp_config.json").is_file() or not any(actor_dir.glob("model_world_size_*_rank_0.pt")):
        raise LaunchError(
            f"stage {stage - 1} checkpoint missing: {actor_dir} lacks fsdp_config.json / model_world_size_*_rank_0.pt "
            f"(deleted? {DONE_MARKER} says global_step_{step} is the last step)"
        )
    return Handoff(
        str(target),
        f"stage {stage - 1} global_step_{step}, merged now (not merged yet)",
        merge_command=merge_command(settings.python, actor_dir, target),
        merge_target=target,
    )


def run_merge(handoff: Handoff) -> None:
    """verl's FSDP->HF merger into a temp dir, then rename: a killed merge never looks finished."""
    assert handoff.merge_command and handoff.merge_target
    target = handoff.merge_target
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    command = handoff.merge_command[:-1] + [str(tmp)]
    print(f"[dig] merging: {shlex.join(command)}", flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0 or not is_merged(tmp):
        raise LaunchError(f"model merge failed (rc={result.returncode}): {shlex.join(command)}")
    if target.exists():  # a concurrent merge finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)


# --------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class DataReport:
    ready: bool
    lines: list[str]
    build_command: list[str] | None = None


def data_files(cfg) -> dict[str, Path]:
    files = {}
    for split, key in (("train", "train_files"), ("val", "val_files")):
        value = cfg.data[key]
        paths = [value] if isinstance(value, str) else list(value)
        for i, p in enumerate(paths):
            files[split if i == 0 else f"{split}{i}"] = Path(p)
    return files


def prompt_token_bound(width: int, height: int, spec: ModelSpec) -> int:
    """Upper bound of a two-image prompt in tokens: image tokens after smart_resize + text."""
    from reward_fns.geometry import resized_size

    h, w = resized_size(height, width, spec.resize_factor, spec.min_pixels, spec.max_pixels)
    return 2 * (h * w) // (spec.resize_factor**2) + PROMPT_TEXT_TOKENS


def inspect_parquet(path: Path, cfg, spec: ModelSpec) -> str:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise LaunchError(f"data file {path}: not a readable parquet file: {err}") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise LaunchError(f"data file {path}: missing column(s) {missing} (DESIGN §5); rebuild with data_prep.build")
    rows = pf.metadata.num_rows
    if rows == 0:
        raise LaunchError(f"data file {path}: 0 rows")
    first = next(pf.iter_batches(batch_size=1, columns=["images", "extra_info"])).to_pylist()[0]
    image = (first["images"] or [{}])[0] or {}
    for key in ("min_pixels", "max_pixels"):
        if image.get(key) is not None and image.get(key) != getattr(spec, key):
            raise LaunchError(
                f"data file {path}: images carry {key}={image.get(key)} but MODEL={spec.model_name} uses "
                f"{getattr(spec, key)}; the data was built for another model: use a DATA_DIR per model"
            )
    sizes = pf.read(columns=["extra_info"]).column("extra_info").to_pylist()
    worst = max(prompt_token_bound(int(e["width"]), int(e["height"]), spec) for e in sizes if e and e.get("width"))
    if worst > cfg.data.max_prompt_length:
        raise LaunchError(
            f"data file {path}: a two-image prompt needs up to ~{worst} tokens but data.max_prompt_length="
            f"{cfg.data.max_prompt_length}: raise it in the model file or lower dig.max_pixels"
        )
    return f"{path} ({rows} rows, prompts <= ~{worst} tokens of {cfg.data.max_prompt_length})"


def planned_render(stage: int) -> dict:
    """Pairs per split and image size data_prep.build renders for a stage, from data_prep/stages.yaml."""
    import yaml

    plan = {"pairs": dict(DEFAULT_PAIRS_PER_SPLIT), "width": 480, "height": 320}
    if not STAGES_FILE.is_file():
        return plan
    doc = yaml.safe_load(STAGES_FILE.read_text()) or {}
    render = doc.get("render") or {}
    plan["width"], plan["height"] = int(render.get("width", 480)), int(render.get("height", 320))
    splits = ((doc.get("stages") or {}).get(str(stage)) or {}).get("splits") or {}
    for split, runs in splits.items():
        runs = runs if isinstance(runs, list) else [runs]
        plan["pairs"][split] = sum(int(run.get("num", 0)) for run in runs)
    return plan


def check_data(cfg, spec: ModelSpec, settings: Settings, stage: int, model_ref: str) -> DataReport:
    files = data_files(cfg)
    missing = {split: p for split, p in files.items() if not p.is_file()}
    lines = [f"data {split}: {inspect_parquet(p, cfg, spec)}" for split, p in files.items() if split not in missing]
    if "train" not in missing:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(files["train"]).metadata.num_rows
        if rows < cfg.data.train_batch_size:  # verl's train loader drops the last partial batch
            raise LaunchError(
                f"data file {files['train']}: {rows} rows < data.train_batch_size={cfg.data.train_batch_size}, so "
                "no training step would run; build more pairs or lower data.train_batch_size"
            )
    if not missing:
        return DataReport(True, lines)
    data_dir = Path(cfg.curriculum.data_dir)
    expected = {
        "train": data_dir / f"stage{stage}" / "train.parquet",
        "val": data_dir / f"stage{stage}" / "val.parquet",
    }
    if any(files.get(s) != p for s, p in expected.items() if s in missing):
        raise LaunchError(f"data file(s) not found: {', '.join(str(p) for p in missing.values())} (set by an override)")
    plan = planned_render(stage)
    pairs = sum(plan["pairs"].get(split, 0) for split in missing)
    workers = settings.data_workers or 1
    seconds = pairs * RENDER_SEC_PER_PAIR / workers
    worst = prompt_token_bound(plan["width"], plan["height"], spec)
    if worst > cfg.data.max_prompt_length:
        raise LaunchError(
            f"data.max_prompt_length={cfg.data.max_prompt_length} is below the ~{worst} tokens of a two-image prompt "
            f"at the planned {plan['width']}x{plan['height']} render ({STAGES_FILE.name}): raise it in the model file"
        )
    command = [settings.python, "-m", "data_prep.build", "--data-dir", str(data_dir), "--model", model_ref,
               "--stage", str(stage)]  # fmt: skip
    if settings.data_workers:
        command += ["--workers", str(settings.data_workers)]
    command += settings.data_build_args
    lines.append(
        f"data: missing {', '.join(str(p) for p in missing.values())}; the run builds them first with "
        f"`{shlex.join(command)}`: {pairs} pairs x {RENDER_SEC_PER_PAIR} s/pair (measured at 480x320, 16 spp on "
        f"2 cores) / {workers} worker(s) = ~{seconds / 3600:.1f} h; prompts <= ~{worst} tokens of {cfg.data.max_prompt_length}"
    )
    return DataReport(False, lines, command)


# --------------------------------------------------------------------------------------------------------------
# Driver


@dataclass
class Plan:
    settings: Settings
    spec: ModelSpec
    cfg: object
    overrides: list[str]
    handoff: Handoff
    data: DataReport
    reward_probe: object
    overlay_dir: Path | None

    def train_command(self) -> list[str]:
        return [self.settings.python, "-m", "recipes.dig.main", *self.overrides]


def plan_stage(settings: Settings, overlay_root: Path | None = None) -> Plan:
    """Everything a stage run needs, checked, without starting anything. Raises LaunchError."""
    stage = settings.stage
    if stage not in STAGES:
        raise LaunchError(f"stage {stage}: expected one of {STAGES}")
    check_override_syntax(settings.extra_overrides)
    spec, model_option, model_path = resolve_model(settings)
    overlay = None
    if model_path is not None:
        overlay = model_overlay_dir(model_path, overlay_root or Path(tempfile.mkdtemp(prefix="dig_model_")))
    model_ref = str(model_path) if model_path else model_option

    prev_cfg = None
    if stage > 1 and not settings.init_model:
        prev_cfg = compose(stage_overrides(settings, stage - 1, model_option, overlay) + settings.extra_overrides)
    handoff = plan_handoff(settings, stage, prev_cfg, spec)

    overrides = stage_overrides(settings, stage, model_option, overlay)
    if stage > 1 or settings.init_model:
        overrides.append(f"actor_rollout_ref.model.path={hydra_value(handoff.init_path)}")
    overrides += settings.extra_overrides
    cfg = compose(overrides)
    if settings.extra_overrides:
        check_override_types(compose(overrides[: len(overrides) - len(settings.extra_overrides)]), cfg,
                             settings.extra_overrides)  # fmt: skip
    validate(cfg)
    check_reward_kwargs(cfg, spec)
    probe = load_reward(cfg)
    data = check_data(cfg, spec, settings, stage, model_ref)
    return Plan(settings, spec, cfg, overrides, handoff, data, probe, overlay)


def describe(plan: Plan) -> str:
    cfg, s = plan.cfg, plan.settings
    rollout = cfg.actor_rollout_ref.rollout
    lines = [
        f"[dig] stage {s.stage} | model {plan.spec.model_name} ({plan.spec.hf_path}, coord_mode={plan.spec.coord_mode})",
        f"[dig] GPUs: {cfg.trainer.nnodes} node(s) x {cfg.trainer.n_gpus_per_node}; rollout TP "
        f"{rollout.tensor_model_parallel_size}, n={rollout.n}, batch {cfg.data.train_batch_size} prompts, "
        f"{cfg.trainer.total_epochs} epochs",
        f"[dig] experiment: {cfg.trainer.project_name}/{cfg.trainer.experiment_name} -> {cfg.trainer.default_local_dir}"
        f" (resume_mode={cfg.trainer.resume_mode})",
        f"[dig] init weights: {plan.handoff.init_path} [{plan.handoff.note}]",
    ]
    if plan.handoff.merge_command:
        lines.append(f"[dig] merge: {shlex.join(plan.handoff.merge_command)}")
    lines += [f"[dig] {line}" for line in plan.data.lines]
    lines.append(f"[dig] reward: {cfg.reward.custom_reward_function.path}::{cfg.reward.custom_reward_function.name} "
                 f"loaded by verl (probe on a malformed answer: {plan.reward_probe})")  # fmt: skip
    lines.append(f"[dig] logger: {list(cfg.trainer.logger)}; validate_config: passed")
    return "\n".join(lines)


def check_gpu_environment() -> None:
    """Before anything slow or Ray: a real run needs vLLM and GPUs (or a Ray cluster that has them)."""
    if os.environ.get("RAY_ADDRESS"):
        return  # GPUs live in the cluster; verl checks trainer.nnodes x n_gpus_per_node against it
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise LaunchError("no GPU visible (torch.cuda.device_count() == 0): training needs GPUs. Use DRY_RUN=1 to "
                          "validate everything on CPU, or set RAY_ADDRESS to a Ray cluster with GPUs")  # fmt: skip
    if importlib.util.find_spec("vllm") is None:
        raise LaunchError(
            "vLLM is not installed in this Python: a training run needs the GPU stack "
            "(pip install -r requirements.txt && pip install -e . --no-deps). To validate on CPU use DRY_RUN=1"
        )


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def default_gpus_per_node(dry_run: bool) -> int:
    if dry_run:
        return 8
    import torch

    return max(torch.cuda.device_count(), 1)


def run(settings: Settings) -> int:
    start = time.monotonic()
    if not settings.dry_run:
        check_gpu_environment()
    if settings.gpus_per_node is None:
        settings.gpus_per_node = default_gpus_per_node(settings.dry_run)
    overlay_root = None if settings.dry_run else settings.ckpt_dir / "model_configs"
    plan = plan_stage(settings, overlay_root)
    print(describe(plan), flush=True)
    if "wandb" in plan.cfg.trainer.logger and not wandb_credentials():
        print(
            "[dig] WARNING: LOGGER has wandb but no WANDB_API_KEY / ~/.netrc login (WANDB_MODE=offline to log locally)"
        )
    if plan.data.build_command and not settings.dry_run:
        print(f"[dig] building data: {shlex.join(plan.data.build_command)}", flush=True)
        if importlib.util.find_spec("data_prep.build") is None:
            raise LaunchError("data_prep.build is not available in this Python; cannot build the missing data")
        rc = subprocess.run(plan.data.build_command, check=False).returncode
        if rc != 0:
            raise LaunchError(f"data build failed (rc={rc}): {shlex.join(plan.data.build_command)}")
        plan.data = check_data(plan.cfg, plan.spec, settings, settings.stage, settings.model)
    if plan.handoff.merge_command and not settings.dry_run:
        run_merge(plan.handoff)
    command = plan.train_command()
    print(f"[dig] command: {shlex.join(command)}", flush=True)
    if settings.dry_run:
        print(
            f"[dig] DRY_RUN: stage {settings.stage} OK in {time.monotonic() - start:.1f} s; nothing started", flush=True
        )
        return 0
    os.chdir(REPO_ROOT)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.execv(command[0], command)  # hand the process (and SLURM's signals) to the trainer


def stage_experiment_dir(settings: Settings) -> Path:
    spec, model_option, model_path = resolve_model(settings)
    overlay = model_overlay_dir(model_path, Path(tempfile.mkdtemp(prefix="dig_model_"))) if model_path else None
    if settings.gpus_per_node is None:
        settings.gpus_per_node = 8  # does not enter the experiment path
    cfg = compose(stage_overrides(settings, settings.stage, model_option, overlay) + settings.extra_overrides)
    return experiment_dir(cfg)


def status(settings: Settings) -> int:
    """Exit 0 if the stage finished (DONE marker), 1 if not; prints the experiment dir."""
    exp_dir = stage_experiment_dir(settings)
    done = stage_done(exp_dir)
    print(f"stage {settings.stage}: {'done' if done else 'not done'} ({exp_dir})")
    return 0 if done else 1


def curriculum(settings: Settings, stages: list[int]) -> int:
    """Stages in order, skipping finished ones; a failed stage stops the chain (rerun to resume it).

    Dry run: every stage is planned in this process, stage k on the checkpoint stage k-1 will produce.
    Real run: each stage is its own `python -m recipes.dig.launch --stage k` (it execs the trainer).
    """
    for stage in stages:
        stage_settings = replace(settings, stage=stage)
        exp_dir = stage_experiment_dir(replace(stage_settings))
        if stage_done(exp_dir):
            print(f"[dig] curriculum: stage {stage} already finished ({exp_dir / DONE_MARKER}), skipping", flush=True)
            continue
        print(f"[dig] curriculum: stage {stage}", flush=True)
        if settings.dry_run:
            rc = run(replace(stage_settings, assume_previous=True))
        else:
            command = [
                settings.python,
                "-m",
                "recipes.dig.launch",
                "--stage",
                str(stage),
                "--",
                *settings.extra_overrides,
            ]
            rc = subprocess.run(command, check=False).returncode
        if rc != 0:
            print(f"[dig] curriculum: stage {stage} failed (rc={rc}); rerun to resume it", file=sys.stderr, flush=True)
            return rc
    print("[dig] curriculum: done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m recipes.dig.launch")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", type=int, choices=STAGES, help="run (or DRY_RUN) one curriculum stage")
    which.add_argument("--curriculum", type=int, nargs="+", choices=STAGES, metavar="STAGE",
                       help="run these stages in order, skipping finished ones")  # fmt: skip
    parser.add_argument("--status", action="store_true", help="with --stage: exit 0 if it has finished, 1 otherwise")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, passed to verl")
    args = parser.parse_args(argv)
    try:
        if args.curriculum:
            return curriculum(Settings.from_env(args.curriculum[0], args.overrides), args.curriculum)
        settings = Settings.from_env(args.stage, args.overrides)
        return status(settings) if args.status else run(settings)
    except LaunchError as err:
        print(f"[dig] ERROR: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
