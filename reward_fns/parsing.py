"""Answer extraction and box-list parsing (docs/contracts.md, reward steps 1-2). Shared by the reward and eval.

Model text is data, never code: it is scanned with a bracket matcher and parsed with ``json.loads``
only, and the work is capped before parsing so a hostile or runaway response costs microseconds.
"""

from __future__ import annotations

import json
import math
import re

THINK_CLOSE = "</think>"
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BRACKET_EVENTS = re.compile(r'[\[\]"\\\n]')

# A box list is at most 3 levels deep: [ {"bbox_2d": [..]} ] or [ [..] ]. Deeper spans are never parsed,
# which also keeps json.loads far from its recursion limit.
MAX_LIST_DEPTH = 3


class ParseError(ValueError):
    """The answer has no valid box list (format fails). The message says why, for eval reports."""


def extract_answer(solution_str: str, require_think: bool) -> str:
    """Step 1: the text after the last ``</think>`` (required for thinking models), then the last
    ``<answer>…</answer>`` block if there is one."""
    cut = solution_str.rfind(THINK_CLOSE)
    if cut >= 0:
        answer = solution_str[cut + len(THINK_CLOSE) :]
    elif require_think:
        raise ParseError("no </think> in the response of a thinking model")
    else:
        answer = solution_str
    if "<answer>" in answer:
        blocks = _ANSWER_BLOCK.findall(answer)
        if blocks:
            answer = blocks[-1]
    return answer


def _top_level_lists(text: str) -> list[tuple[int, int, int]]:
    """Maximal balanced ``[...]`` spans as (start, end, depth), in order of appearance.

    A span is maximal when no balanced span contains it; an unmatched ``[`` (a stray bracket in prose,
    or a list cut off by the length limit) does not swallow the spans after it. Quotes are tracked only
    inside brackets, where they delimit JSON strings (a label may hold brackets).
    """
    spans: list[tuple[int, int, int]] = []
    stack: list[int] = []  # open positions
    deepest: list[int] = []  # max depth reached inside each open bracket, relative to it
    in_string = False
    skip_pos = -1  # position of the character a backslash escapes inside a JSON string
    for match in _BRACKET_EVENTS.finditer(text):
        ch, pos = match.group(), match.start()
        if pos == skip_pos:
            continue
        if in_string:
            if ch == "\\":
                skip_pos = pos + 1
            elif ch in '"\n':  # JSON strings never span lines: a stray quote cannot swallow the answer
                in_string = False
            continue
        if ch == '"':
            in_string = bool(stack)
        elif ch == "\n":
            continue
        elif ch == "[":
            stack.append(pos)
            deepest.append(1)
        elif ch == "]" and stack:
            start = stack.pop()
            depth = deepest.pop()
            if deepest:
                deepest[-1] = max(deepest[-1], depth + 1)
            # drop spans this one contains: they were only maximal until now
            while spans and spans[-1][0] > start:
                spans.pop()
            spans.append((start, pos + 1, depth))
    return spans


def last_json_list(answer: str, max_answer_chars: int) -> list:
    """Step 2: the last complete (closed and JSON-parseable) top-level list in the answer."""
    if len(answer) > max_answer_chars:
        raise ParseError(f"answer has {len(answer)} characters, more than max_answer_chars={max_answer_chars}")
    # Fast path (the usual answer, fenced or not): if everything from the first '[' to the last ']' is one
    # JSON list, it contains every other span, so it is the only top-level list.
    first, last = answer.find("["), answer.rfind("]")
    if first < 0 or last < first:
        raise ParseError("no JSON list in the answer")
    try:
        value = json.loads(answer[first : last + 1])
        if isinstance(value, list):
            return value
    except (ValueError, RecursionError):
        pass
    for start, end, depth in reversed(_top_level_lists(answer)):
        if depth > MAX_LIST_DEPTH:
            continue
        try:
            value = json.loads(answer[start:end])
        except (ValueError, RecursionError):
            continue
        if isinstance(value, list):
            return value
    raise ParseError("no complete JSON list in the answer")


def _coordinate(value) -> float:
    kind = type(value)  # exact types: a JSON true/false (bool) is not a coordinate
    if kind is int:
        try:
            value = float(value)
        except OverflowError as err:
            raise ParseError("a box coordinate overflows a float") from err
    elif kind is not float:
        raise ParseError(f"box coordinate {str(value)[:40]!r} is not a number")
    if not math.isfinite(value):
        raise ParseError("a box coordinate is not finite (NaN or Infinity)")
    return value


def boxes_from_list(items: list, max_boxes: int) -> list[list[float]]:
    """Elements are ``[x1, y1, x2, y2]`` or ``{"bbox_2d": [x1, y1, x2, y2], ...}`` (other keys ignored).
    Returns the boxes as lists of 4 finite floats. Plain Python: a handful of boxes is faster without numpy."""
    if len(items) > max_boxes:
        raise ParseError(f"{len(items)} boxes, more than max_boxes={max_boxes}")
    boxes = []
    for item in items:
        if type(item) is dict:
            if "bbox_2d" not in item:
                raise ParseError("an object in the list has no 'bbox_2d' key")
            item = item["bbox_2d"]
        if type(item) is not list or len(item) != 4:
            raise ParseError(f"a box must be 4 numbers, got {str(item)[:80]}")
        boxes.append([_coordinate(v) for v in item])
    return boxes


def parse_boxes(
    solution_str: str,
    *,
    require_think: bool,
    max_boxes: int,
    max_answer_chars: int,
) -> list[list[float]]:
    """Steps 1-2: the predicted boxes in the model's own frame. Raises ParseError when format fails.
    The limits are reward knobs (``reward_fns.knobs.RewardKnobs``)."""
    if not isinstance(solution_str, str):
        raise ParseError(f"response is a {type(solution_str).__name__}, not a string")
    answer = extract_answer(solution_str, require_think=require_think)
    return boxes_from_list(last_json_list(answer, max_answer_chars), max_boxes)
