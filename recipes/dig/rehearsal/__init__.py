"""The CPU rehearsal (launch/cpu_rehearsal.sh): the real curriculum on tiny models on a machine without GPUs.

``cpu_verl`` holds the verl/vLLM workarounds (loaded only through ``profile=cpu``); ``tiny_models`` builds the
tiny Qwen-VL policies offline from configs and ``warm_start`` fits them briefly to the rehearsal's own data. This
module itself imports nothing heavy.
"""

PROFILE = "cpu"  # config/profile/cpu.yaml
PLATFORM_MODULE = "recipes.dig.rehearsal.cpu_verl"


def selected(overrides: list[str]) -> bool:
    """Whether the launcher's Hydra overrides select the CPU profile (checked before any config is composed)."""
    return f"profile={PROFILE}" in overrides


def runs_on_cpu(config) -> bool:
    """Whether a composed config runs verl on the rehearsal's CPU platform (its workers load ``cpu_verl``)."""
    env = config.get("ray_kwargs", {}).get("ray_init", {}).get("runtime_env", {}).get("env_vars", {}) or {}
    return PLATFORM_MODULE in str(env.get("VERL_USE_EXTERNAL_MODULES", "")).split(",")
