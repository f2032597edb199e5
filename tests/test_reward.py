"""docs/contracts.md, reward, rule by rule, with expected values computed by hand in the comments."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from pathlib import Path

import pytest
import yaml

from dig_common.models import load_model_spec
from eval import refcoco
from eval import scoring as eval_scoring
from reward_fns import dig_reward, geometry, parsing, scoring
from reward_fns.dig_reward import RESULT_KEYS, RewardKnobs, check_reward_kwargs, compute_score

W, H = 1000, 1000  # 1000 x 1000 so that rel1000 values equal pixels and the arithmetic stays readable


def gt_json(boxes, width=W, height=H, **extra):
    return json.dumps({"boxes": boxes, "width": width, "height": height, **extra})


def score(answer, boxes, **kwargs):
    return compute_score("dig", answer, gt_json(boxes), None, **kwargs)


def boxes_text(boxes, style="list"):
    if style == "bbox_2d":
        return json.dumps([{"bbox_2d": b, "label": "colour"} for b in boxes])
    return json.dumps(boxes)


A = [100, 100, 200, 200]
B = [400, 400, 500, 600]
C = [700, 100, 900, 300]


# Every metric of a perfect answer but the counts; every metric of an answer that fails format but num_gt.
PERFECT = {"score": 1.0, "acc": 1.0, "format": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0, "miou": 1.0}
FORMAT_FAILED = dict.fromkeys(["score", "acc", "format", "f1", "precision", "recall", "miou", "num_pred"], 0.0)


def assert_result(result, **expected):
    assert tuple(result) == RESULT_KEYS
    assert all(isinstance(v, float) for v in result.values())
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


# ---- perfect, empty, counts -------------------------------------------------------------------------


def test_perfect_answer_scores_one():
    assert_result(score(boxes_text([A, B]), [A, B]), **PERFECT, num_pred=2.0, num_gt=2.0)


def test_empty_gt_and_empty_answer_scores_one():
    assert_result(score("[]", []), score=1.0, f1=1.0, precision=1.0, recall=1.0, miou=1.0, num_pred=0.0, num_gt=0.0)


def test_empty_gt_with_a_box_gets_format_only():
    # P = 0/1 = 0, R: M = 0 and N > 0 -> 0, F1 = 0, no pairs -> mIoU 0; score = 0.9 * 0 + 0.1
    assert_result(score(boxes_text([A]), []), score=0.1, acc=0.0, format=1.0, precision=0.0, recall=0.0, num_pred=1.0)


def test_empty_answer_with_gt_gets_format_only():
    # N = 0, M = 1: P = 0, R = 0, mIoU = 0 -> score 0.1
    assert_result(score("[]", [A]), score=0.1, f1=0.0, precision=0.0, recall=0.0, miou=0.0, num_gt=1.0)


def test_permutation_invariance():
    gt = [A, B, C]
    pred = [[110, 100, 200, 210], [400, 420, 500, 600], [700, 100, 880, 300]]
    reference = score(boxes_text(pred), gt)
    for order in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        assert score(boxes_text([pred[i] for i in order]), gt) == pytest.approx(reference)
        assert score(boxes_text(pred), [gt[i] for i in order]) == pytest.approx(reference)


def test_duplicates_do_not_help():
    # N = 2, M = 1: one assigned pair (IoU 1) -> P = 1/2, R = 1, F1 = 2/3, mIoU = 1
    # acc = 0.5 * 2/3 + 0.5 = 5/6; score = 0.9 * 5/6 + 0.1 = 0.85
    once, twice = score(boxes_text([A]), [A]), score(boxes_text([A, A]), [A])
    assert_result(twice, score=0.85, precision=0.5, recall=1.0, f1=2 / 3, miou=1.0, num_pred=2.0)
    assert twice["score"] < once["score"] == 1.0


def test_over_prediction_lowers_precision_and_f1():
    # an exact box plus a far one: P = 1/2, R = 1
    result = score(boxes_text([A, C]), [A])
    assert_result(result, precision=0.5, recall=1.0, f1=2 / 3, miou=1.0, score=0.85)


def test_under_prediction_lowers_recall_and_f1():
    result = score(boxes_text([A]), [A, B])
    assert_result(result, precision=1.0, recall=0.5, f1=2 / 3, miou=1.0, score=0.85)


def test_iou_threshold_and_miou_by_hand():
    # pred [150,100,250,200] vs A: inter 50*100 = 5000, union 15000 -> IoU 1/3 < 0.5 -> no match
    # F1 = 0, mIoU = 1/3, acc = 1/6, score = 0.9/6 + 0.1 = 0.25
    assert_result(score(boxes_text([[150, 100, 250, 200]]), [A]), f1=0.0, miou=1 / 3, acc=1 / 6, score=0.25)
    # pred [100,100,200,150]: IoU exactly 0.5 -> a match (>=): F1 = 1, mIoU = 0.5, acc = 0.75, score = 0.775
    half = boxes_text([[100, 100, 200, 150]])
    assert_result(score(half, [A]), f1=1.0, miou=0.5, acc=0.75, score=0.775)
    # the threshold is a knob
    assert_result(score(half, [A], iou_threshold=0.6), f1=0.0, miou=0.5, score=0.9 * 0.25 + 0.1)


def test_hungarian_assignment_beats_greedy():
    # GT A'=[0,0,100,100], B'=[100,0,200,100]; p1=[50,0,150,100] overlaps both by 1/3, p2 = A'.
    # Greedy in prediction order would give p1 -> A' and leave p2 with B' (IoU 0). The minimum-cost
    # assignment pairs p2 -> A' (IoU 1) and p1 -> B' (IoU 1/3): n = 1, P = R = F1 = 1/2,
    # mIoU = (1 + 1/3) / 2 = 2/3, acc = 0.25 + 1/3, score = 0.9 * acc + 0.1 = 0.625
    gt = [[0, 0, 100, 100], [100, 0, 200, 100]]
    result = score(boxes_text([[50, 0, 150, 100], [0, 0, 100, 100]]), gt)
    assert_result(result, precision=0.5, recall=0.5, f1=0.5, miou=2 / 3, score=0.625)


def test_weights_are_knobs():
    # the F1-only reward with no format bonus: score == F1
    result = score(boxes_text([A, C]), [A], w_format=0.0, w_f1=1.0, w_iou=0.0)
    assert result["score"] == pytest.approx(2 / 3)


def test_matching_cost_weights_change_the_assignment():
    # A thin prediction [0,0,10,100] between GT1 [0,0,10,50] (IoU 0.5, L1 = 50/1000 = 0.05) and
    # GT2 [20,0,30,100] (IoU 0, GIoU = 0 - (3000 - 2000)/3000 = -1/3, L1 = 40/1000 = 0.04).
    # L1 alone prefers GT2, GIoU alone GT1; the default cost 5 L1 - 2 GIoU: GT1 -0.75 < GT2 0.867.
    gt, pred = [[0, 0, 10, 50], [20, 0, 30, 100]], boxes_text([[0, 0, 10, 100]])
    assert score(pred, gt, w_l1=1.0, w_giou=0.0)["miou"] == pytest.approx(0.0)
    assert score(pred, gt, w_l1=0.0, w_giou=1.0)["miou"] == pytest.approx(0.5)
    assert score(pred, gt)["miou"] == pytest.approx(0.5)


# ---- answer syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["list", "bbox_2d"])
def test_both_element_syntaxes(style):
    assert score(boxes_text([A, B], style), [A, B])["score"] == 1.0


def test_mixed_element_syntaxes_and_extra_keys():
    answer = json.dumps([{"bbox_2d": A, "label": "x", "confidence": 0.3}, B])
    assert score(answer, [A, B])["score"] == 1.0


def test_code_fence_and_answer_block():
    fenced = f"Here they are:\n```json\n{boxes_text([A], 'bbox_2d')}\n```\nDone."
    assert score(fenced, [A])["score"] == 1.0
    blocks = f"<answer>{boxes_text([C])}</answer> then <answer>```json\n{boxes_text([A])}\n```</answer>"
    assert score(blocks, [A])["score"] == 1.0  # the last <answer> block counts


def test_last_complete_list_counts():
    assert score(f"first guess {boxes_text([C])}, final {boxes_text([A])}", [A])["score"] == 1.0
    # a trailing bracketed remark that is not JSON is not a list
    assert score(f"{boxes_text([A])} [see above]", [A])["score"] == 1.0
    # a stray unmatched '[' before the answer does not swallow it
    assert score(f"compare [ left and right: {boxes_text([A])}", [A])["score"] == 1.0
    # a list cut off by the length limit is not complete: format fails
    assert score(boxes_text([A, B])[:-8], [A, B])["format"] == 0.0


EDGE = [900, 850, 1000, 1000]  # touches the right and bottom edges of the 1000 x 1000 image
# Transcripts shaped like real model output, each with several <think> blocks or boxes in several places, and
# chosen so that a plausible wrong rule (the first </think>, the first list, ignoring <answer>, no clipping)
# gives another result: (response, GT, require_think, expected format, num_pred, f1)
TRANSCRIPTS = {
    "two_thoughts_then_fenced_answer": (
        "<think>\nIn A the mug is white; in B it looks red, around [[120, 80, 200, 160]].\n</think>\n\n"
        "<think>Let me check the lamp again. It moved left.</think>\n\n```json\n"
        + json.dumps([{"bbox_2d": B, "label": "lamp moved"}, {"bbox_2d": A, "label": "mug [colour]"}])
        + "\n```\nThese are the two differences.",
        [A, B],
        True,
        1.0,
        2.0,
        1.0,
    ),
    "answer_then_a_thought_with_nothing_after": (
        f"<think>first look</think>{boxes_text([A])}<think>wait, let me look again</think>\n",
        [A],
        True,
        0.0,
        0.0,
        0.0,  # the answer follows the LAST </think>: empty
    ),
    "answer_block_then_an_earlier_guess_in_prose": (
        f"<think>x</think><answer>{boxes_text([A, B])}</answer>\nEarlier I thought {boxes_text([C])}.",
        [A, B],
        True,
        1.0,
        2.0,
        1.0,
    ),
    "numbered_items_then_the_final_list": (
        f"1) the cup {json.dumps(A)}\n2) the book {json.dumps(C)}\nFinal: {boxes_text([A, B])}",
        [A, B],
        False,
        1.0,
        2.0,
        1.0,
    ),
    "unclosed_thought_of_a_non_thinking_model": (
        f"<think>I believe {boxes_text([C])}",
        [A],
        False,
        1.0,
        1.0,
        0.0,
    ),
    "box_past_the_bottom_right_edge_is_clipped": (
        f"<think>a</think><think>b</think>{boxes_text([[900, 850, 1005, 1003]])}",
        [EDGE],
        True,
        1.0,
        1.0,
        1.0,
    ),
}


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_realistic_transcripts(name):
    response, gt, require_think, fmt, num_pred, f1 = TRANSCRIPTS[name]
    result = score(response, gt, require_think=require_think)
    assert (result["format"], result["num_pred"], result["f1"]) == (fmt, num_pred, f1), result
    if f1 == 1.0:
        assert result["score"] == pytest.approx(1.0)


def test_labels_with_brackets_and_quotes():
    answer = json.dumps([{"bbox_2d": A, "label": 'a "red] cube [x'}])
    assert score(answer, [A])["score"] == 1.0


def test_think_block():
    wrong, right = boxes_text([C]), boxes_text([A])
    assert score(f"<think>maybe {wrong}</think>{right}", [A])["score"] == 1.0
    assert score(f"<think>a</think>x<think>b {wrong}</think>{right}", [A])["score"] == 1.0
    # a thinking model must close its thought
    assert_result(score(f"<think>{right}", [A], require_think=True), **FORMAT_FAILED, num_gt=1.0)
    assert score(right, [A], require_think=True)["format"] == 0.0
    assert score(f"<think>x</think>{right}", [A], require_think=True)["score"] == 1.0
    # a non-thinking model may answer directly
    assert score(right, [A], require_think=False)["score"] == 1.0


# ---- validity: format fails -> every metric 0 ---------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "no boxes here",
        "[[1, 2, 3]]",  # three numbers
        "[[1, 2, 3, 4, 5]]",
        '[["1", 2, 3, 4]]',  # a string is not a number
        "[[true, 2, 3, 4]]",  # nor is a boolean
        "[[null, 2, 3, 4]]",
        "[[NaN, 100, 200, 200]]",
        "[[Infinity, 100, 200, 200]]",
        "[[-Infinity, 100, 200, 200]]",
        "[[1e999, 100, 200, 200]]",
        "[[1" + "0" * 400 + ", 100, 200, 200]]",  # an integer too large for a float
        "[[200, 100, 100, 200]]",  # inverted x
        "[[100, 200, 200, 100]]",  # inverted y
        "[[100, 100, 100, 200]]",  # zero width
        "[[1100, 1100, 1200, 1200]]",  # outside the frame: empty after clipping
        "[[-300, 100, -100, 200]]",
        '[{"box": [100, 100, 200, 200]}]',  # no bbox_2d key
        '[{"bbox_2d": [100, 100, 200]}]',
        "[1, 2, 3, 4]",  # a flat list is not a list of boxes
        '{"bbox_2d": [100, 100, 200, 200]}',  # not a list at all -> its inner list is flat
        "[[100, 100, 200, 200],",  # unterminated
        "(100, 100, 200, 200)",
        "[[100, 100, 200, 200]]".replace("]]", "]"),
    ],
)
def test_malformed_answers_fail_format(answer):
    assert_result(score(answer, [A]), **FORMAT_FAILED, num_gt=1.0)


def test_partly_outside_boxes_are_clipped():
    assert score("[[900, 900, 1100, 1100]]", [[900, 900, 1000, 1000]])["score"] == 1.0
    assert score("[[-50, -50, 100, 100]]", [[0, 0, 100, 100]])["score"] == 1.0


def test_max_boxes():
    fifty = boxes_text([A] * 50)
    assert score(fifty, [A])["format"] == 1.0
    assert score(boxes_text([A] * 51), [A])["format"] == 0.0
    assert score(boxes_text([A] * 3), [A], max_boxes=2)["format"] == 0.0


def test_overlong_answer_fails_before_parsing():
    padded = "x" * 40_000 + boxes_text([A])
    assert score(padded, [A])["format"] == 0.0
    assert score(padded, [A], max_answer_chars=50_000)["score"] == 1.0
    # the cap applies to the answer, not to the thinking before it
    assert score("<think>" + "y" * 100_000 + "</think>" + boxes_text([A]), [A])["score"] == 1.0


@pytest.mark.parametrize("response", [None, b"[[1,2,3,4]]", 42, ["[[1,2,3,4]]"]])
def test_non_string_responses_never_raise(response):
    assert_result(compute_score("dig", response, gt_json([A])), **FORMAT_FAILED, num_gt=1.0, reward_error=0.0)


@pytest.mark.parametrize(
    "ground_truth",
    [
        "",
        "not json",
        "{}",
        '{"boxes": [[1, 2, 3]], "width": 10, "height": 10}',
        '{"boxes": [], "width": 0, "height": 10}',
        None,
    ],
)
def test_broken_ground_truth_never_raises(ground_truth):
    assert_result(compute_score("dig", boxes_text([A]), ground_truth), score=0.0, reward_error=1.0)


MALFORMED_ANSWERS = [
    "no boxes here",
    "<think>the cup moved</think>[[1, 2, 3]]",
    "<think>a</think><think>b</think>[[300, 300, 200, 200]]",  # inverted box
    "[[1, 2, 3, 4]",  # cut off
    json.dumps([A] * 51),  # over max_boxes
]


@pytest.mark.parametrize("answer", MALFORMED_ANSWERS)
def test_a_malformed_answer_scores_zero_quietly(answer, caplog):
    with caplog.at_level(logging.DEBUG, logger="dig.reward"):
        assert_result(score(answer, [A]), **FORMAT_FAILED, num_gt=1.0, reward_error=0.0)
    assert not caplog.records


def test_an_internal_error_is_counted_and_logged_once_with_its_traceback(monkeypatch, caplog):
    """A bug in the reward scores 0 like a format failure would, but the sample says so (reward_error, a key
    verl logs with the others) and the first of its kind is logged with the traceback; samples keep one key list."""

    def broken_match(pred, gt, knobs):
        raise IndexError("hungarian: row 3 out of range")

    monkeypatch.setattr(scoring, "match", broken_match)
    monkeypatch.setattr(dig_reward, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="dig.reward"):
        results = [score(boxes_text([A]), [A]) for _ in range(3)]
    for result in results:
        assert_result(result, **FORMAT_FAILED, num_gt=1.0, reward_error=1.0)
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert "reward_error" in record.getMessage()
    assert "IndexError: hungarian: row 3 out of range" in record.getMessage()
    assert "broken_match" in record.getMessage()  # the traceback, not only the message
    monkeypatch.undo()
    assert_result(score(boxes_text([A]), [A]), **PERFECT, reward_error=0.0)


def test_a_broken_ground_truth_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(dig_reward, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="dig.reward"):
        for _ in range(3):
            assert compute_score("dig", boxes_text([A]), "not json")["reward_error"] == 1.0
    assert len(caplog.records) == 1 and "JSONDecodeError" in caplog.records[0].getMessage()


def test_ground_truth_as_dict_and_extra_keys():
    gt = {"boxes": [A], "width": W, "height": H, "types": ["colour"]}
    assert compute_score("dig", boxes_text([A]), gt)["score"] == 1.0
    assert compute_score("dig", boxes_text([A]), json.dumps(gt), {"num_turns": 1, "anything": 2})["score"] == 1.0


def test_model_text_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"[[__import__('pathlib').Path({str(marker)!r}).touch(), 1, 2, 3]]"
    assert score(payload, [A])["format"] == 0.0
    assert not marker.exists()


# ---- knobs --------------------------------------------------------------------------------------------


def test_check_reward_kwargs_names_the_culprit():
    assert check_reward_kwargs(coord_mode="abs_resized")["coord_mode"] == "abs_resized"
    with pytest.raises(ValueError, match="iou_thresh"):
        check_reward_kwargs(iou_thresh=0.5)
    with pytest.raises(ValueError, match="coord_mode"):
        check_reward_kwargs(coord_mode="pixels")
    with pytest.raises(ValueError, match="w_format"):
        check_reward_kwargs(w_format=1.5)
    with pytest.raises(ValueError, match="min_pixels"):
        check_reward_kwargs(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="require_think"):
        check_reward_kwargs(require_think="yes")


REPO = Path(__file__).resolve().parents[1]
KNOB_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RewardKnobs)}


def test_knobs_have_one_home():
    """compute_score takes the knobs as **kwargs and no reward function repeats a knob's default."""
    assert check_reward_kwargs() == KNOB_DEFAULTS == RewardKnobs().as_dict()
    params = list(inspect.signature(compute_score).parameters.values())
    assert [p.name for p in params[:4]] == ["data_source", "solution_str", "ground_truth", "extra_info"]
    assert len(params) == 5 and params[4].kind is inspect.Parameter.VAR_KEYWORD
    for module in (scoring, parsing, geometry, eval_scoring, refcoco):
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            for param in inspect.signature(fn).parameters.values():
                if param.name in KNOB_DEFAULTS:
                    assert param.default in (inspect.Parameter.empty, None), (
                        f"{module.__name__}.{name}({param.name}=...)"
                    )


@pytest.mark.parametrize("knob", sorted(KNOB_DEFAULTS))
def test_compute_score_rejects_a_bad_value_of_every_knob(knob):
    bad = {str: "pixels", bool: "yes", int: 0, float: 1.5 if knob.startswith(("w_f", "w_i", "iou")) else -1.0}
    value = bad[type(KNOB_DEFAULTS[knob])]
    with pytest.raises(ValueError, match=f"reward knob.* {knob}=|{knob}"):
        compute_score("dig", "[]", gt_json([A]), None, **{knob: value})
    with pytest.raises(ValueError, match=knob):
        check_reward_kwargs(**{knob: value})
    # verl's own keys pass through; a typo does not
    assert compute_score("dig", "[]", gt_json([]), None, reward_router_address=None)["score"] == 1.0
    with pytest.raises(ValueError, match="unknown reward knob"):
        compute_score("dig", "[]", gt_json([]), None, iou_thresh=0.5)


def test_recipe_yaml_reward_kwargs_agree_with_the_knobs():
    """recipes/dig/config/dig_grpo.yaml: every key is a knob; a literal value is the knob's default; the
    model-dependent ones interpolate the model file's dig: block, exactly the keys ModelSpec.reward_kwargs has."""
    raw = yaml.safe_load((REPO / "recipes/dig/config/dig_grpo.yaml").read_text())
    kwargs = raw["reward"]["custom_reward_function"]["reward_kwargs"]
    assert set(kwargs) <= set(KNOB_DEFAULTS), set(kwargs) - set(KNOB_DEFAULTS)
    interpolated = {k for k, v in kwargs.items() if isinstance(v, str) and v.startswith("${")}
    for key in interpolated:
        assert kwargs[key] == f"${{dig.{key}}}", key
    assert interpolated == set(load_model_spec("qwen3_vl_8b_thinking").reward_kwargs())
    for key in set(kwargs) - interpolated:
        assert kwargs[key] == KNOB_DEFAULTS[key] and type(kwargs[key]) is type(KNOB_DEFAULTS[key]), key


def readme_knob_table() -> dict[str, str]:
    """knob -> default cell of the README's reward-knob table (a row may name several knobs)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| knob | default | meaning |") :].split("\n\n")[0].splitlines()[2:]
    out = {}
    for row in table:
        names, default = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = [n.strip(" `") for n in names.split(",")]
        defaults = [d.strip(" `") for d in default.split(",")]
        assert len(names) == len(defaults), row
        for name, value in zip(names, defaults, strict=True):
            assert name not in out, f"{name} twice in the README table"
            out[name] = value
    return out


def test_readme_knob_table_is_the_knobs():
    def shown(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:g}" if isinstance(value, float) else str(value)

    assert readme_knob_table() == {name: shown(value) for name, value in KNOB_DEFAULTS.items()}


def test_scores_are_finite_floats_in_unit_interval():
    for answer in ("[]", boxes_text([A]), boxes_text([A, B, C]), "junk"):
        for gt in ([], [A], [A, B]):
            result = score(answer, gt)
            assert all(math.isfinite(v) for v in result.values())
            assert 0.0 <= result["score"] <= 1.0


# ---- non-square images: x is normalised and clipped by W, y by H ----------------------------------------
# Every hand-computed case above uses W = H, where a y-term scaled by W instead of H goes unnoticed.

WIDE = (480, 320)


def wide_score(answer, boxes, width=WIDE[0], height=WIDE[1], **kwargs):
    return compute_score("dig", answer, gt_json(boxes, width, height), None, coord_mode="abs", **kwargs)


def test_l1_cost_scales_y_by_height():
    # On 480 x 320, p = [100,100,200,200]; GT1 is p moved 40 px right, GT2 p moved 30 px down.
    # L1(p, GT1) = (40 + 40) / 480 = 1/6; L1(p, GT2) = (30 + 30) / 320 = 0.1875: L1 alone picks GT1,
    # IoU(p, GT1) = 6000 / 14000 = 3/7. (Dividing the y-terms by W would give GT2 60/480 = 0.125: GT2, IoU 7/13.)
    gt = [[140, 100, 240, 200], [100, 130, 200, 230]]
    result = wide_score(boxes_text([[100, 100, 200, 200]]), gt, w_l1=1.0, w_giou=0.0)
    assert_result(result, miou=3 / 7, f1=0.0, num_pred=1.0, num_gt=2.0)
    # the same on a tall image (320 x 480) with the roles swapped: x moved 30 px (60/320), y 40 px (80/480)
    tall = [[130, 100, 230, 200], [100, 140, 200, 240]]
    result = wide_score(boxes_text([[100, 100, 200, 200]]), tall, width=320, height=480, w_l1=1.0, w_giou=0.0)
    assert result["miou"] == pytest.approx(3 / 7)


@pytest.mark.parametrize(("width", "height"), [WIDE, WIDE[::-1]])
def test_boxes_past_an_edge_clip_to_that_edge(width, height):
    # a box running past the bottom (y > H) or the right edge (x > W), clipped, is exactly the GT
    bottom, right = [100, height - 40, 200, height], [width - 40, 100, width, 200]
    assert wide_score(boxes_text([[100, height - 40, 200, height + 80]]), [bottom], width, height)["score"] == 1.0
    assert wide_score(boxes_text([[width - 40, 100, width + 80, 200]]), [right], width, height)["score"] == 1.0
    # in rel1000 too: y = 1250 is 1.25 H, clipped to H
    y0 = (height - 40) / height * 1000
    answer = boxes_text([[100 / width * 1000, y0, 200 / width * 1000, 1250]])
    result = compute_score("dig", answer, gt_json([bottom], width, height), coord_mode="rel1000")
    assert result["score"] == pytest.approx(1.0)


def test_knob_cache_follows_the_call():
    # compute_score caches the knobs of the last call: alternating knob sets must each take effect
    half = boxes_text([[100, 100, 200, 150]])  # IoU 0.5 with A
    for _ in range(3):
        assert score(half, [A])["f1"] == 1.0
        assert score(half, [A], iou_threshold=0.6)["f1"] == 0.0
        assert score(half, [A], iou_threshold=0.5, w_format=0.0)["score"] == pytest.approx(0.75)
