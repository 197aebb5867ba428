"""The task registry, the `Task` wrapper's guarantees, and the shared answer format.

Task-specific tests live in tests/test_tasks_{sudoku,countdown,math}.py.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrl.tasks import TASKS, Example, Task, get_task
from dlrl.tasks.answer_format import answer_region

DATA = "tests/data"


def _task_scoring(score) -> Task:
    return Task(name="t", make_examples=lambda s, n, seed: [], make_prompt=lambda e, s: "",
                score=score)


EX = Example(id="x", question={}, answer={})


def test_registry_builds_every_named_task():
    assert {"sudoku", "countdown", "gsm8k", "math500", "math"} <= set(TASKS)
    assert get_task("sudoku", max_blanks=8).name == "sudoku"
    assert get_task("countdown").name == "countdown"
    # gsm8k/math500 are lazy: naming them does not touch the network
    assert get_task("gsm8k").name == "gsm8k"
    assert get_task("math500").name == "math500"
    assert get_task("math", path=f"{DATA}/math_tiny.jsonl").name == "math_tiny"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_task("sudokku")
    for name in TASKS:
        assert name in str(err.value)


def test_math_without_a_source_is_an_error():
    with pytest.raises(ValueError):
        get_task("math")


def test_reward_never_raises_and_stays_in_unit_interval():
    def boom(c, e):
        raise RuntimeError("bad reward")

    assert _task_scoring(boom).reward("x", EX) == 0.0
    assert _task_scoring(lambda c, e: 7.0).reward("x", EX) == 1.0
    assert _task_scoring(lambda c, e: -1.0).reward("x", EX) == 0.0
    assert _task_scoring(lambda c, e: math.nan).reward("x", EX) == 0.0
    assert _task_scoring(lambda c, e: 0.25).reward("x", EX) == 0.25
    assert _task_scoring(lambda c, e: 1.0).reward(None, EX) == 0.0  # type: ignore[arg-type]


def test_split_and_style_are_checked():
    task = get_task("sudoku")
    ex = task.examples("test", 1)[0]
    with pytest.raises(ValueError):
        task.examples("validation", 1)
    with pytest.raises(ValueError):
        task.examples("train", -1)
    with pytest.raises(ValueError):
        task.prompt(ex, "fancy")
    assert task.target(ex, "compact") is not None
    assert get_task("math", path=f"{DATA}/math_tiny.jsonl").target(ex, "chat") is None


def test_answer_region_reads_the_last_tag_and_tolerates_truncation():
    assert answer_region("<answer>1</answer> then <answer>2</answer>") == "2"
    assert answer_region("<answer> 3 </answer> trailing") == " 3 "
    assert answer_region("reasoning <answer>\n4") == "\n4"  # cut off before </answer>
    assert answer_region("no tags 5") == "no tags 5"
    assert answer_region("</answer><answer>6") == "6"


_SUDOKU = get_task("sudoku")
_SUDOKU_EX = _SUDOKU.examples("test", 1)[0]
_COUNTDOWN = get_task("countdown")
_COUNTDOWN_EX = _COUNTDOWN.examples("test", 1)[0]


_PIECES = ["<answer>", "</answer>", "<reasoning>", "\\boxed{", "{", "}", "(", ")", "+", "-", "*",
           "/", "**", "=", " ", "\n", "|", ".", "×", "²", "0", "1", "2", "3", "4", "9", "99"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=120).map("".join) | st.text(max_size=300))
def test_synthetic_rewards_are_total_on_arbitrary_text(text):
    for task, ex in ((_SUDOKU, _SUDOKU_EX), (_COUNTDOWN, _COUNTDOWN_EX)):
        value = task.reward(text, ex)
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert _COUNTDOWN.reward(text, _COUNTDOWN_EX) in (0.0, 0.1, 1.0)
