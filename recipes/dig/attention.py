"""The attention backend of a run: chosen at launch time, printed by the dry run.

verl 0.9.1's FSDP workers default to ``flash_attention_2`` (``verl/workers/config/model.py``), and its patched
Qwen2-VL / Qwen2.5-VL attention (``verl/models/transformers/qwen2_vl.py``) always takes a flash-attn code path
when ``use_remove_padding=True``: without flash-attn that combination crashes with a ``NameError`` mid-step.
Qwen3-VL packs sequences with ``sdpa`` too. So:

- flash-attn imports in the training Python: the model file's own choice (``flash_attention_2`` + packing);
- it does not: ``sdpa``, and packing off for the Qwen2-VL / Qwen2.5-VL families.

A user override wins, except the combination known to crash, which is refused by name before any GPU is
requested.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from recipes.dig.models import ATTN_IMPLEMENTATIONS, ModelSpec

# Families whose verl-patched attention needs flash-attn once sequences are packed (remove-padding).
PACKING_NEEDS_FLASH_ATTN = ("qwen2_vl", "qwen2_5_vl")

ATTN_OVERRIDE_KEY = "actor_rollout_ref.model.override_config.attn_implementation"
REMOVE_PADDING_KEY = "actor_rollout_ref.model.use_remove_padding"


class AttentionError(ValueError):
    """A backend choice that cannot run (named, with the fix)."""


@dataclass(frozen=True)
class AttentionChoice:
    attn_implementation: str
    use_remove_padding: bool
    reason: str

    def overrides(self) -> list[str]:
        """Hydra overrides that put the choice into verl's config (``+`` because override_config is open)."""
        return [
            f"+{ATTN_OVERRIDE_KEY}={self.attn_implementation}",
            f"{REMOVE_PADDING_KEY}={str(self.use_remove_padding).lower()}",
        ]


def flash_attn_available(python: str) -> bool:
    """Whether ``import flash_attn`` succeeds in the training interpreter (a subprocess: never this one's)."""
    try:
        result = subprocess.run([python, "-c", "import flash_attn"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def choose_attention(
    spec: ModelSpec,
    flash_attn: bool,
    user_attn: str | None = None,
    user_remove_padding: bool | None = None,
) -> AttentionChoice:
    """The backend for ``spec``; ``user_*`` are the user's own overrides (None = not given)."""
    if user_attn is not None and user_attn not in ATTN_IMPLEMENTATIONS:
        raise AttentionError(
            f"attn_implementation={user_attn!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)} ({ATTN_OVERRIDE_KEY})"
        )
    if user_attn == "flash_attention_2" and not flash_attn:
        raise AttentionError(
            "attn_implementation=flash_attention_2 was asked for, but flash-attn does not import in the training "
            "Python: install it (bash scripts/setup_gpu.sh) or drop the override to fall back to sdpa"
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
        packing, reason = user_remove_padding, reason + f"; use_remove_padding={user_remove_padding} set by the user"
    if packing and not flash_attn and spec.family in PACKING_NEEDS_FLASH_ATTN:
        raise AttentionError(
            f"{spec.model_name} ({spec.family}) with use_remove_padding=true needs flash-attn, which does not import "
            f"in the training Python (verl's packed {spec.family} attention would crash with a NameError): "
            f"set {REMOVE_PADDING_KEY}=false or install flash-attn (bash scripts/setup_gpu.sh)"
        )
    return AttentionChoice(attn, packing, reason)
