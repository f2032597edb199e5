"""Property tests: whatever the model writes, the reward returns the contract's dict."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_fns.dig_reward import RESULT_KEYS, compute_score

GT = json.dumps({"boxes": [[10, 20, 110, 120], [200, 100, 260, 180]], "width": 480, "height": 320})
EMPTY_GT = json.dumps({"boxes": [], "width": 480, "height": 320})

numbers = st.one_of(st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True))
box_like = st.one_of(
    st.lists(numbers, min_size=0, max_size=6),
    st.fixed_dictionaries({"bbox_2d": st.lists(numbers, min_size=4, max_size=4)}, optional={"label": st.text()}),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
)
answers = st.lists(box_like, max_size=8).map(json.dumps)
wrappers = st.sampled_from(
    ["{}", "<think>x</think>{}", "```json\n{}\n```", "<answer>{}</answer>", "[{}", "{}]", "a [b] {}"]
)
texts = st.one_of(st.text(max_size=300), st.text(alphabet='[]{}",:0123456789.e-<>/thinkaswr ', max_size=300))


def check(result):
    assert tuple(result) == RESULT_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())
    assert 0.0 <= result["score"] <= 1.0
    for key in ("acc", "format", "f1", "precision", "recall", "miou"):
        assert 0.0 <= result[key] <= 1.0, key
    if result["format"] == 0.0:
        assert result["score"] == 0.0 and result["num_pred"] == 0.0


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(texts, st.booleans(), st.sampled_from(["rel1000", "abs_resized", "abs", "rel1"]))
def test_any_text(text, require_think, coord_mode):
    check(compute_score("dig", text, GT, require_think=require_think, coord_mode=coord_mode))
    check(compute_score("dig", text, EMPTY_GT, require_think=require_think, coord_mode=coord_mode))


@SETTINGS
@given(answers, wrappers)
def test_any_box_list(answer, wrapper):
    check(compute_score("dig", wrapper.replace("{}", answer), GT))


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(1, 500), st.integers(1, 500)),
        min_size=0,
        max_size=8,
    ),
    st.randoms(),
)
def test_valid_boxes_permutation_invariant(raw, rnd):
    boxes = [[x, y, min(x + w, 1000), min(y + h, 1000)] for x, y, w, h in raw]
    boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
    result = compute_score("dig", json.dumps(boxes), GT)
    check(result)
    assert result["format"] == 1.0 and result["num_pred"] == len(boxes)
    shuffled = boxes[:]
    rnd.shuffle(shuffled)
    again = compute_score("dig", json.dumps(shuffled), GT)
    for key in RESULT_KEYS:
        assert abs(again[key] - result[key]) < 1e-9, key
