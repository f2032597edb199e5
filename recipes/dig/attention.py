"""The attention backend of a run: chosen at launch time, printed by the dry run.

What verl 0.9.1 does with it (read from its code):

- ``workers/config/model.py`` builds the HF config with ``override_config.get("attn_implementation",
  "flash_attention_2")``; the text and the vision tower both take it, and the FSDP engine loads the model with
  that config, so without flash-attn the default stops at model load (transformers' ``ImportError``).
  ``engine_workers.py`` gives the ref model a deep copy of the same model config: one key sets actor and ref.
  The vLLM rollout picks its own kernels and ignores it.
- ``use_remove_padding`` (``actor_rollout_ref.model``) is read into the actor's and the ref's engine configs.
- ``models/transformers/monkey_patch.py`` replaces Qwen2-VL / Qwen2.5-VL attention with verl's own when
  remove-padding (or Ulysses sequence parallelism) is on; that forward (``qwen2_vl.py``) always calls
  flash-attn, whatever ``attn_implementation`` says, and crashes with a ``NameError`` mid-step without it.
  Qwen3-VL keeps transformers' attention, so packed sequences run on ``sdpa`` too.
- Ulysses sequence parallelism's all-to-all lives only in verl's flash-attention wrapper
  (``_ulysses_flash_attention_forward``): on ``sdpa`` each rank would attend within its own slice.

So: flash-attn imports in the training Python -> the model file's own choice (``flash_attention_2`` +
remove-padding); it does not -> ``sdpa``, and remove-padding off for the Qwen2-VL / Qwen2.5-VL families. A
user override wins, except a combination known to crash or to compute the wrong thing, which is refused by
name before any GPU is requested.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from dig_common.models import ATTN_IMPLEMENTATIONS, ModelSpec
from recipes.dig.settings import FALSE_WORDS, TRUE_WORDS

# Families whose verl-patched attention needs flash-attn once sequences are packed (remove-padding).
PACKING_NEEDS_FLASH_ATTN = ("qwen2_vl", "qwen2_5_vl")

ATTN_OVERRIDE_KEY = "actor_rollout_ref.model.override_config.attn_implementation"
REMOVE_PADDING_KEY = "actor_rollout_ref.model.use_remove_padding"
SETUP_HINT = "bash scripts/setup_gpu.sh"


class AttentionError(ValueError):
    """A backend choice that cannot run (named, with the fix)."""


@dataclass(frozen=True)
class AttentionChoice:
    attn_implementation: str
    use_remove_padding: bool
    reason: str

    def overrides(self) -> list[str]:
        """Hydra overrides that put the choice into verl's config.

        ``++`` (add or replace) because ``override_config`` is an open dict that a user's own ``+...`` may
        already have filled; the remove-padding key exists in verl's config, so a plain override.
        """
        return [
            f"++{ATTN_OVERRIDE_KEY}={self.attn_implementation}",
            f"{REMOVE_PADDING_KEY}={str(self.use_remove_padding).lower()}",
        ]

    def describe(self) -> str:
        """One line for the dry run."""
        return (
            f"attention: {self.attn_implementation}, use_remove_padding={str(self.use_remove_padding).lower()} "
            f"({self.reason})"
        )


def flash_attn_available(python: str) -> bool:
    """Whether ``import flash_attn`` succeeds in the training interpreter (a subprocess: never this one's).

    Importing loads flash-attn's CUDA extension, so a build that does not match the installed torch counts as
    absent, as it must: transformers would see the package and fail when the model loads.
    """
    try:
        result = subprocess.run([python, "-c", "import flash_attn"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def user_overrides(overrides: list[str]) -> tuple[str | None, bool | None]:
    """The user's own ``attn_implementation`` / ``use_remove_padding`` from a Hydra dotlist (None = not given).

    Accepts ``key=v``, ``+key=v`` and ``++key=v``; the last one given wins, as in Hydra.
    """
    attn, packing = None, None
    for override in overrides:
        key, sep, value = override.lstrip("+").partition("=")
        if not sep:
            continue
        if key == ATTN_OVERRIDE_KEY:
            attn = value.strip("'\"")
        elif key == REMOVE_PADDING_KEY:
            word = value.strip("'\"").lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise AttentionError(
                    f"{REMOVE_PADDING_KEY}={value!r}: expected one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}"
                )
            packing = word in TRUE_WORDS
    return attn, packing


def choose_attention(
    spec: ModelSpec,
    flash_attn: bool,
    user_attn: str | None = None,
    user_remove_padding: bool | None = None,
    ulysses_sp_size: int = 1,
) -> AttentionChoice:
    """The backend for ``spec``; ``user_*`` are the user's own overrides (None = not given).

    ``ulysses_sp_size`` is the actor's ``ulysses_sequence_parallel_size`` (1 = off).
    """
    if user_attn is not None and user_attn not in ATTN_IMPLEMENTATIONS:
        raise AttentionError(
            f"attn_implementation={user_attn!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)} ({ATTN_OVERRIDE_KEY})"
        )
    if user_attn == "flash_attention_2" and not flash_attn:
        raise AttentionError(
            "attn_implementation=flash_attention_2 was asked for, but flash-attn does not import in the training "
            f"Python: install it ({SETUP_HINT}) or drop the override to fall back to sdpa"
        )
    if ulysses_sp_size > 1 and not flash_attn:
        raise AttentionError(
            f"{spec.model_name}: ulysses_sequence_parallel_size={ulysses_sp_size} needs flash-attn, which does not "
            "import in the training Python (verl's sequence-parallel all-to-all lives in its flash-attention "
            f"wrapper only; on sdpa each rank would attend within its own slice): install flash-attn ({SETUP_HINT}) "
            "or set actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"
        )
    if flash_attn:
        attn, packing = spec.attn_implementation, spec.use_remove_padding
        reason = f"flash-attn imports: {spec.model_name}'s own choice"
    else:
        attn = "sdpa" if spec.attn_implementation == "flash_attention_2" else spec.attn_implementation
        packing = spec.use_remove_padding and spec.family not in PACKING_NEEDS_FLASH_ATTN
        reason = "flash-attn does not import: sdpa"
        if spec.use_remove_padding and not packing:
            reason += f", remove-padding off ({spec.family}'s packed attention in verl needs flash-attn)"
    if user_attn is not None:
        attn, reason = user_attn, reason + f"; attn_implementation={user_attn} set by the user"
    if user_remove_padding is not None:
        packing = user_remove_padding
        reason += f"; use_remove_padding={str(user_remove_padding).lower()} set by the user"
    if packing and spec.family in PACKING_NEEDS_FLASH_ATTN:
        if not flash_attn:
            raise AttentionError(
                f"{spec.model_name} ({spec.family}) with use_remove_padding=true needs flash-attn, which does not "
                f"import in the training Python (verl's packed {spec.family} attention would crash with a "
                f"NameError): set {REMOVE_PADDING_KEY}=false or install flash-attn ({SETUP_HINT})"
            )
        if attn != "flash_attention_2":
            reason += f" (verl's packed {spec.family} attention runs on flash-attn whatever attn_implementation says)"
    return AttentionChoice(attn, packing, reason)
