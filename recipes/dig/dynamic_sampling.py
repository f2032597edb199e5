"""Dynamic sampling (DAPO's ``algorithm.filter_groups``): its settings, their checks, and the bound's message.

GRPO's advantage is a sample's reward minus its group's mean, over the group's spread: a group whose n samples all
score the same carries no gradient. With ``algorithm.filter_groups.enable=true`` verl 0.9.1's V1 replay buffer
evicts such groups and generates replacements until a full batch of groups with spread is ready. verl refills
without end (its dataloader wraps around, and the built-in buffer ignores ``max_num_gen_batches``):
``recipes/dig/replay_buffer.py`` adds the bound, ``max_num_gen_batches`` train batches of prompts per step, after
which the run stops with one line saying why. This module imports nothing heavy (the launcher checks with it).
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.dig.settings import LaunchError

# the canonical pre-KL reward (verl reads rm_scores); any other name is a key of the reward's result dict
REWARD_METRIC = "reward"
KNOB = "algorithm.filter_groups"


class DynamicSamplingExhausted(RuntimeError):
    """A training step reached ``max_num_gen_batches`` without a full batch of groups with spread."""


@dataclass(frozen=True)
class DynamicSampling:
    enable: bool
    metric: str | None
    max_num_gen_batches: int
    max_inflight_gen_batches: int
    train_batch_size: int

    @classmethod
    def from_config(cls, filter_groups, train_batch_size: int) -> DynamicSampling:
        """From ``algorithm.filter_groups`` (a DictConfig or a dict) and ``data.train_batch_size``."""
        return cls(
            enable=bool(filter_groups.get("enable", False)),
            metric=filter_groups.get("metric", None),
            max_num_gen_batches=int(filter_groups.get("max_num_gen_batches", 0) or 0),
            max_inflight_gen_batches=int(filter_groups.get("max_inflight_gen_batches", 1) or 0),
            train_batch_size=int(train_batch_size),
        )

    @property
    def max_prompts(self) -> int:
        """Prompts one training step may generate, the first batch included."""
        return self.max_num_gen_batches * self.train_batch_size

    def check(self, reward_keys: tuple[str, ...]) -> None:
        """One line naming the knob and the fix; raises LaunchError. Nothing to check when disabled."""
        if not self.enable:
            return
        if self.metric != REWARD_METRIC and self.metric not in reward_keys:
            raise LaunchError(
                f"{KNOB}.metric={self.metric!r}: use {REWARD_METRIC!r} (the reward's score) or one of the reward's "
                f"keys {', '.join(reward_keys)}"
            )
        if self.max_num_gen_batches <= 0:
            raise LaunchError(
                f"{KNOB}.max_num_gen_batches={self.max_num_gen_batches}: unbounded, a run whose groups all score "
                "the same would refill forever; set a positive bound (the recipe's default is 4)"
            )
        if self.max_inflight_gen_batches <= 0:
            raise LaunchError(f"{KNOB}.max_inflight_gen_batches={self.max_inflight_gen_batches}: must be >= 1")

    def exhausted(self, step: int, generated: int, needed: int) -> str:
        """The message of a step that hit the bound."""
        return (
            f"dynamic sampling: training step {step} generated {generated} prompts ({KNOB}.max_num_gen_batches="
            f"{self.max_num_gen_batches} x data.train_batch_size={self.train_batch_size}) and fewer than {needed} "
            f"groups had {self.metric!r} differ between their samples: the reward does not separate this model's "
            f"answers on this data (check val-aux/dig/reward_error and the format rate in the logs), or raise "
            f"{KNOB}.max_num_gen_batches; rerun the same command to resume from the last checkpoint"
        )


def check_config(cfg) -> None:
    """The launcher's check of a composed config (before anything starts)."""
    from reward_fns.dig_reward import RESULT_KEYS

    settings = DynamicSampling.from_config(cfg.algorithm.filter_groups, cfg.data.train_batch_size)
    settings.check(RESULT_KEYS)
    if settings.enable and cfg.trainer.v1.get("trainer_mode", "sync") != "sync":
        raise LaunchError(
            f"{KNOB}.enable=true needs trainer.v1.trainer_mode=sync (the recipe's bounded replay buffer is the "
            f"synchronous one); found {cfg.trainer.v1.trainer_mode!r}"
        )
