"""verl entry point of the DiG reward (docs/contracts.md, reward):

    reward.custom_reward_function.path=<repo>/reward_fns/dig_reward.py
    reward.custom_reward_function.name=compute_score
    reward.custom_reward_function.reward_kwargs.<knob>=<value>

verl imports this file by path, without registering it as a module. The scoring itself lives in
``reward_fns.scoring`` (a normal package module that eval imports too); this file adds what only a training run
needs: an internal error (a bug in the reward, a broken ground-truth string) still scores 0 so that one bad row
does not kill the step, but it is not silent: the first of each kind is logged with its traceback, and every
sample carries ``reward_error`` (1.0 for such a sample, else 0.0), which verl logs with the other keys.
A model's malformed answer is a format failure, not an error: it scores 0 quietly.
"""

import logging
import os
import sys
import traceback

try:
    from reward_fns import scoring
except ImportError:  # the package is not installed where this runs: fall back to this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from reward_fns import scoring

from reward_fns.knobs import RewardKnobs, check_reward_kwargs, knobs_from_call

__all__ = ["ERROR_KEY", "RESULT_KEYS", "RewardKnobs", "check_reward_kwargs", "compute_score"]

ERROR_KEY = "reward_error"
RESULT_KEYS = (*scoring.RESULT_KEYS, ERROR_KEY)  # the same keys, in this order, for every sample

log = logging.getLogger("dig.reward")
_logged: set[tuple[str, str]] = set()  # (exception type, where it was raised): each kind is logged once


def _report(err: BaseException) -> None:
    frames = traceback.extract_tb(err.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    kind = (type(err).__name__, where)
    if kind in _logged:
        return
    _logged.add(kind)
    text = "".join(traceback.format_exception(err))
    log.error(
        "DiG reward: internal error, the sample scores 0 and counts in %s (logged once per kind):\n%s",
        ERROR_KEY,
        text,
    )


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **knobs) -> dict[str, float]:
    """Score one response against ``ground_truth`` (JSON string ``{"boxes", "width", "height"}``).

    ``knobs``: ``RewardKnobs`` fields (``reward_kwargs``). A wrong knob is a configuration error and raises
    ``ValueError``; nothing in a response or a ground truth does."""
    settings = knobs_from_call(knobs)
    num_gt = 0
    try:
        gt = scoring.load_ground_truth(ground_truth)
        num_gt = len(gt.boxes)
        result = scoring.score_answer(solution_str, gt, settings).metrics
    except Exception as err:  # not the model's fault (that is a format failure inside score_answer)
        _report(err)
        result = scoring.failed_metrics(num_gt)
        result[ERROR_KEY] = 1.0
        return result
    return {**result, ERROR_KEY: 0.0}
