"""What every part of the recipe shares: base-model specs, the prompt, atomic file writes, box drawing and the
command-line error style. data_prep, reward_fns, eval and recipes import from here, never from each other's
internals for these (docs/contracts.md)."""
