"""verl entry point of the DiG reward (docs/contracts.md, reward):

    reward.custom_reward_function.path=<repo>/reward_fns/dig_reward.py
    reward.custom_reward_function.name=compute_score
    reward.custom_reward_function.reward_kwargs.<knob>=<value>

verl imports this file by path, without registering it as a module, so it only re-exports: the
implementation lives in ``reward_fns.scoring`` (a normal package module that eval imports too).
"""

import os
import sys

try:
    from reward_fns.scoring import RESULT_KEYS, RewardKnobs, check_reward_kwargs, compute_score
except ImportError:  # the package is not installed where this runs: fall back to this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from reward_fns.scoring import RESULT_KEYS, RewardKnobs, check_reward_kwargs, compute_score

__all__ = ["RESULT_KEYS", "RewardKnobs", "check_reward_kwargs", "compute_score"]
