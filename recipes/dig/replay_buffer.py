"""verl 0.9.1's synchronous V1 replay buffer with a bound on dynamic sampling's refills.

Plugged in through verl's custom-sampler hook (``trainer.v1.sampler.custom_sampler``, read in
``verl/trainer/ppo/v1/trainer_base.py`` line 146), so every run of the recipe uses it; with
``algorithm.filter_groups.enable=false`` it is verl's ``ReplayBuffer`` with the arguments verl itself would pass
(``trainer_base.py`` lines 165-184; a custom sampler receives only ``sampler_kwargs``, so the recipe's YAML passes
``algorithm.filter_groups`` and ``data.train_batch_size`` there). With it on, verl evicts each finished group whose
metric is equal across its samples and calls ``refill_fn`` for 2 new prompts per evicted one
(``replay_buffer.py`` ``ReplayBuffer.sample``); this class counts the prompts a training step has generated and,
past ``max_num_gen_batches`` x ``train_batch_size``, raises ``DynamicSamplingExhausted`` instead of refilling
(verl's own buffer ignores ``max_num_gen_batches``: ``trainer_base.py`` line 205). Everything else is verl's.
"""

from __future__ import annotations

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from recipes.dig.dynamic_sampling import DynamicSampling, DynamicSamplingExhausted

__all__ = ["BoundedReplayBuffer", "DynamicSamplingExhausted"]

TRAIN = "train"


class BoundedReplayBuffer(ReplayBuffer):
    def __init__(
        self,
        trainer_mode,
        trainer_config,
        max_off_policy_threshold,
        max_off_policy_strategy,
        sampler_kwargs,
        poll_interval: float = 2.0,
        refill_fn=None,
    ):
        if trainer_mode != "sync":
            raise ValueError(f"recipes.dig.replay_buffer: trainer.v1.trainer_mode={trainer_mode!r}; expected 'sync'")
        self.dynamic = DynamicSampling.from_config(sampler_kwargs["filter_groups"], sampler_kwargs["train_batch_size"])
        metric = self.dynamic.metric if self.dynamic.enable else None
        refill_failed = bool(sampler_kwargs.get("sync_refill_failed_groups", False))
        gen_batch_size = sampler_kwargs.get("gen_batch_size") or self.dynamic.train_batch_size
        self._refill = refill_fn
        self._step = 0
        self._generated = 0
        super().__init__(
            trainer_mode,
            trainer_config,
            max_off_policy_threshold,
            max_off_policy_strategy,
            sampler_kwargs,
            poll_interval=poll_interval,
            refill_fn=None if refill_fn is None else self._bounded_refill,
            filter_groups_metric=metric,
            sync_refill_failed_groups=refill_failed,
            train_batch_size=self.dynamic.train_batch_size,
            gen_batch_size=1 if metric is not None or refill_failed else gen_batch_size,
            max_inflight_gen_batches=self.dynamic.max_inflight_gen_batches if metric is not None else 1,
        )

    def _bounded_refill(self, num_prompts: int):
        if self.dynamic.enable and self._generated + num_prompts > self.dynamic.max_prompts:
            raise DynamicSamplingExhausted(
                self.dynamic.exhausted(self._step, self._generated, self.dynamic.train_batch_size)
            )
        self._generated += num_prompts
        return self._refill(num_prompts)

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        if partition_id == TRAIN:  # the trainer submitted this step's first batch before sampling
            self._step, self._generated = global_steps, batch_size
        return super().sample(global_steps, partition_id, batch_size)
