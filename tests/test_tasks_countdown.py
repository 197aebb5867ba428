"""Countdown: the safe parser, the 1.0 / 0.1 / 0.0 reward on hostile text, and the generator."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from dlrl.tasks import Example, get_task
from dlrl.tasks.arithmetic import ParseError, evaluate, literals, parse_expression
from dlrl.tasks.countdown import countdown_task, instance_key, solve, split_of

EX = Example(id="hand", question={"numbers": [2, 3, 4], "target": 5},
             answer={"target": 5, "solution": "2*4-3"})
TASK = get_task("countdown")
GOLDEN_TEST_0 = ({"numbers": [65, 15, 69, 68], "target": 79}, "68+15-69+65")


def _value(text: str) -> Fraction:
    return evaluate(parse_expression(text))


def test_parser_precedence_associativity_and_exactness():
    assert _value("2+3*4") == 14
    assert _value("(2+3)*4") == 20
    assert _value("10-3-2") == 5
    assert _value("8/4/2") == 1
    assert _value("8/3*3") == 8  # exact: no float rounding
    assert _value("7/2") == Fraction(7, 2)
    assert _value("-3+2*4") == 5
    assert _value(" ( 1 +\n2 ) ") == 3
    assert literals(parse_expression("(50-25)*3-7")) == [50, 25, 3, 7]


@pytest.mark.parametrize("text", ["", "2+", "(2+3", "2+3)", "2 3", "2**3", "2^3", "1.5+1",
                                  "x+1", "__import__('os').system('x')", "2*4-3=5", "²+1",
                                  "(" * 40 + "1" + ")" * 40, "-" * 40 + "1", "9" * 201])
def test_parser_rejects(text):
    with pytest.raises(ParseError):
        parse_expression(text)


@pytest.mark.parametrize("completion, reward", [
    ("2*4-3", 1.0),
    ("<reasoning>4*2 is 8, minus 3</reasoning>\n<answer>\n2*4-3\n</answer>", 1.0),
    ("<answer>(4*2)-3</answer>", 1.0),
    ("<answer>4 × 2 − 3</answer>", 1.0),        # typographic operators
    ("<answer>-3+2*4</answer>", 1.0),            # unary minus is allowed
    ("<answer>2+3+4</answer>", 0.1),             # right numbers, wrong value
    ("<answer>1+1+3</answer>", 0.1),             # right value, numbers not given
    ("<answer>2+3</answer>", 0.1),               # a number left out
    ("<answer>2*4-3+3-3</answer>", 0.1),         # a number used twice
    ("<answer>2+3+4</answer> ... <answer>2*4-3</answer>", 1.0),  # the last answer counts
    ("<answer>2*4-3</answer> ... <answer>2+3+4</answer>", 0.1),
    ("<answer>\n2*4-3", 1.0),                    # truncated before </answer>
    ("<answer></answer>", 0.0),
    ("", 0.0),
    ("<reasoning>I think 2*4-3 works</reasoning>", 0.0),  # no answer, text does not parse
    ("<answer>2*4-3=5</answer>", 0.0),
    ("<answer>__import__('os').system('x')</answer>", 0.0),
    ("__import__('os').system('touch /tmp/pwned')", 0.0),
    ("<answer>2**4-3</answer>", 0.0),
    ("<answer>10**9**9</answer>", 0.0),
])
def test_reward_table(completion, reward):
    assert TASK.reward(completion, EX) == reward


def test_division_by_zero_parses_so_it_scores_the_wrong_value_credit():
    ex = Example(id="z", question={"numbers": [4, 2, 2], "target": 1}, answer={})
    assert TASK.reward("<answer>4/(2-2)</answer>", ex) == 0.1
    assert TASK.reward("<answer>(2+2)/4</answer>", ex) == 1.0


def test_fraction_intermediates_are_exact():
    ex = Example(id="f", question={"numbers": [7, 2, 4], "target": 14}, answer={})
    assert TASK.reward("7/2*4", ex) == 1.0
    ex = Example(id="g", question={"numbers": [1, 3, 3], "target": 1}, answer={})
    assert TASK.reward("1/3*3", ex) == 1.0  # would be 0.9999999999999999 in floats


def test_adversarial_sizes_are_cheap():
    deep = "(" * 100_000 + "1" + ")" * 100_000
    huge = "9" * 10**7
    start = time.perf_counter()
    for text in (deep, huge, f"<answer>{huge}</answer>", "(" * 33 + "2*4-3" + ")" * 33,
                 "-" * 33 + "2*4-3"):
        assert TASK.reward(text, EX) == 0.0
    assert time.perf_counter() - start < 2.0
    assert TASK.reward("(" * 20 + "2*4-3" + ")" * 20, EX) == 1.0  # under the depth cap


def test_every_generated_instance_is_solvable_and_in_range():
    task = countdown_task(sizes=(3, 4), max_number=99, max_target=100)
    examples = task.examples("train", 400, seed=0)
    assert len({instance_key(e.question["numbers"], e.question["target"]) for e in examples}) == 400
    assert {len(e.question["numbers"]) for e in examples} == {3, 4}
    for ex in examples:
        numbers, target = ex.question["numbers"], ex.question["target"]
        assert all(1 <= x <= 99 for x in numbers) and 1 <= target <= 100
        # the stored solution is checked by the reward's own parser, not by the generator
        assert task.reward(task.target(ex, "compact"), ex) == 1.0
        assert task.reward(task.target(ex, "chat"), ex) == 1.0
    for ex in examples[:40]:  # and an independent brute-force search agrees it is solvable
        found = solve(ex.question["numbers"], ex.question["target"])
        assert found is not None and task.reward(found, ex) == 1.0


def test_solver_reports_impossible_instances():
    assert solve([1, 1, 1], 100) is None
    assert solve([25, 50, 75, 100], 925) is None
    assert _value(solve([4, 7, 8, 8], 24)) == 24


def test_splits_are_disjoint_and_deterministic():
    train = TASK.examples("train", 500, seed=0)
    test = TASK.examples("test", 200, seed=0)
    key = lambda e: instance_key(e.question["numbers"], e.question["target"])  # noqa: E731
    assert {key(e) for e in train}.isdisjoint(key(e) for e in test)
    assert all(split_of(e.question["numbers"], e.question["target"], 0.1) == "test" for e in test)
    assert TASK.examples("test", 200, seed=0) == test
    assert TASK.examples("test", 200, seed=1) != test
    # golden value: the generator must not change between machines or versions
    assert (test[0].question, test[0].answer["solution"]) == GOLDEN_TEST_0
    assert len(TASK.examples("test", None)) == 500


def test_compact_formats():
    assert TASK.prompt(EX, "compact") == "2 3 4 -> 5\n"
    assert TASK.target(EX, "compact") == "2*4-3"
    assert TASK.target(EX, "chat") == "<answer>\n2*4-3\n</answer>"
    chat = TASK.prompt(EX, "chat")
    assert "[2, 3, 4]" in chat and "exactly 5" in chat and "<answer>" in chat


def test_bad_options():
    for options in ({"sizes": (1,)}, {"sizes": ()}, {"test_fraction": 0.0},
                    {"min_target": 5, "max_target": 4}):
        with pytest.raises(ValueError):
            countdown_task(**options)

