"""Config composition: the model overlay, the launcher's overrides, Hydra compose (exactly as recipes/dig/main.py's
``@hydra.main``), override checks and verl's own validate_config plus the recipe's invariants."""

from __future__ import annotations

import shutil
from pathlib import Path

from dig_common.fileio import atomic_output
from dig_common.models import ModelSpec, load_model_spec, model_file
from dig_common.paths import BASE_MODEL_DIR
from recipes.dig import dynamic_sampling
from recipes.dig.settings import CONFIG_FILE, LaunchError, Settings, config_defaults, override_key

CONFIG_DIR = CONFIG_FILE.parent
CONFIG_NAME = CONFIG_FILE.stem
# dig_grpo.yaml's hydra.searchpath (verl's config, and dig_common for the base_model group); a model overlay
# folder is added after it
SEARCHPATH = config_defaults()["hydra"]["searchpath"]
# Top-level keys verl 0.9's main_ppo no longer migrates: Hydra accepts them, verl silently ignores them.
LEGACY_REWARD_PREFIXES = ("custom_reward_function.", "reward_model.reward_kwargs", "reward_model.reward_manager")


def resolve_model(settings: Settings) -> tuple[ModelSpec, str, Path | None]:
    """(spec, Hydra option name, overlay search dir or None) for base_model=, a name or a path to a YAML file."""
    try:
        path = model_file(settings.model)
        spec = load_model_spec(path)
    except (ValueError, FileNotFoundError) as err:
        raise LaunchError(f"base_model={settings.model}: {err}") from err
    if spec.model_name != path.stem:
        # the data dir comes from the file name and the experiment (checkpoints, resume) from dig.model_name: a
        # copied file with the old name would resume the other model's run
        raise LaunchError(
            f"base_model={settings.model}: dig.model_name={spec.model_name!r} differs from the file name {path.stem!r}; "
            f"set model_name: {path.stem} in {path} (it names the experiment and its checkpoints)"
        )
    if path.parent.resolve() == BASE_MODEL_DIR.resolve():
        return spec, path.stem, None
    if (BASE_MODEL_DIR / f"{path.stem}.yaml").exists():
        raise LaunchError(
            f"base_model={settings.model}: its name {path.stem!r} clashes with a built-in model; rename the file"
        )
    return spec, path.stem, path


def model_overlay_dir(model_path: Path, root: Path) -> Path:
    """A search-path folder holding base_model/<stem>.yaml, so Hydra can select a model file from anywhere."""
    with atomic_output(root / "base_model" / model_path.name) as tmp:
        shutil.copyfile(model_path, tmp)
    return root


def hydra_value(value: object) -> str:
    """A path as a Hydra override value: quoted when it holds characters the override grammar treats specially."""
    text = str(value)
    if all(c.isalnum() or c in "_./-:" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stage_overrides(settings: Settings, stage: int, model_option: str, overlay: Path | None) -> list[str]:
    """The overrides the launcher adds for one stage, before the user's own (which win)."""
    overrides = [
        f"base_model={model_option}",
        f"stage=stage{stage}",
        f"curriculum.data_dir={hydra_value(settings.data_dir)}",
        f"curriculum.ckpt_dir={hydra_value(settings.ckpt_dir)}",
    ]
    if settings.gpus_per_node is not None:
        overrides.append(f"trainer.n_gpus_per_node={settings.gpus_per_node}")
    if overlay is not None:
        overrides.append(f"hydra.searchpath=[{','.join(SEARCHPATH)},{hydra_value(f'file://{overlay}')}]")
    return overrides


def check_override_syntax(overrides: list[str]) -> None:
    for item in overrides:
        key = override_key(item).lstrip("~")  # ~key deletes it
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
            (o for o in overrides if f"'{override_key(o).lstrip('~')}'" in message), None
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
            f"trainer.n_gpus_per_node={trainer.n_gpus_per_node}"
        )
    if (data.train_batch_size * rollout.n) % n_gpus:
        raise LaunchError(
            f"data.train_batch_size x rollout.n = {data.train_batch_size} x {rollout.n} must be divisible by the "
            f"{n_gpus} GPUs (trainer.nnodes x trainer.n_gpus_per_node)"
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
    val = rollout.val_kwargs
    if bool(val.do_sample) != (val.temperature > 0):
        raise LaunchError(
            f"actor_rollout_ref.rollout.val_kwargs: do_sample={val.do_sample} but temperature={val.temperature} "
            "(0 = greedy); take both from the model file's dig.decoding"
        )
    if rollout.get("limit_images", None) != 2:
        raise LaunchError("actor_rollout_ref.rollout.limit_images must be 2 (image A and image B per prompt)")
    backends = [trainer.logger] if isinstance(trainer.logger, str) else list(trainer.logger)
    unknown = [b for b in backends if b not in Tracking.supported_backend]
    if unknown:
        raise LaunchError(f"trainer.logger: unknown backend(s) {unknown}; verl supports {Tracking.supported_backend}")
    if cfg.reward.custom_reward_function.path is None:
        raise LaunchError("reward.custom_reward_function.path is null: verl would fall back to its default scorer")
    check_lora(cfg.actor_rollout_ref.model)
    dynamic_sampling.check_config(cfg)


# the ranks vLLM serves (vllm/config/lora.py, max_lora_rank); verl passes lora_rank as max_lora_rank
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# a vision-tower module name of both families (transformers 5): LoRA must leave it alone
VISION_MODULE = "model.visual.blocks.0.attn.qkv"


def check_lora(model) -> None:
    import re

    rank = int(model.get("lora_rank", 0) or 0)
    if not rank:
        return
    if rank not in VLLM_LORA_RANKS:
        raise LaunchError(
            f"actor_rollout_ref.model.lora_rank={rank}: vLLM serves LoRA ranks {', '.join(map(str, VLLM_LORA_RANKS))}"
        )
    exclude = model.get("exclude_modules", None)
    if not (isinstance(exclude, str) and re.fullmatch(exclude, VISION_MODULE)):
        raise LaunchError(
            f"actor_rollout_ref.model.exclude_modules={exclude!r} leaves the vision tower under LoRA: vLLM applies "
            "adapters to the language model only, so those adapters would train but never be served; use .*visual.*"
        )
