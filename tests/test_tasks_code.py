"""HumanEval / MBPP tasks through the real sandbox: every HumanEval canonical solution and a fixed
fifth of MBPP's test split score 1, wrong or hostile completions 0; prompts, extraction, splits,
setup code and extra tests."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dlrl import sandbox
from dlrl.tasks import TASKS, get_task
from dlrl.tasks.code import code_task, extract_code, humaneval_program, load_rows

DATA = Path(__file__).resolve().parent / "data"
pytestmark = pytest.mark.skipif(sandbox.backend() == "none",
                                reason="no sandbox backend works here; code rewards refuse to run")


def rewards(task, examples, style="compact", completions=None):
    completions = completions or [task.target(ex, style) for ex in examples]
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(task.reward, completions, examples))


def test_every_humaneval_canonical_solution_scores_1():
    task = get_task("humaneval")
    examples = task.examples("test")
    assert len(examples) == 164
    scores = rewards(task, examples)
    assert [ex.id for ex, s in zip(examples, scores) if s != 1.0] == []


def test_humaneval_chat_targets_score_1():
    task = get_task("humaneval")
    examples = task.examples("test", n=12, seed=0)
    assert rewards(task, examples, style="chat") == [1.0] * 12


def test_mbpp_canonical_solutions_score_1_on_a_fixed_fifth_of_the_test_split():
    task = get_task("mbpp")
    examples = task.examples("test")
    assert len(examples) == 500  # task ids 11-510
    subset = [ex for ex in examples if int(ex.id.rsplit("-", 1)[1]) % 5 == 1]  # 11, 16, ..., 506
    assert len(subset) == 100
    scores = rewards(task, subset)
    assert [ex.id for ex, s in zip(subset, scores) if s != 1.0] == []


def test_mbpp_sanitized_with_test_imports_scores_1():
    task = get_task("mbpp_sanitized")
    examples = [ex for ex in task.examples("test") if ex.answer["imports"]]
    assert len(examples) >= 8
    assert rewards(task, examples) == [1.0] * len(examples)
    assert rewards(task, examples[:4], style="chat") == [1.0] * 4


def test_mbpp_setup_code_runs_after_the_solution():
    task = code_task("mbpp", path=str(DATA / "mbpp_slice.jsonl"))
    (ex,) = [ex for ex in task.examples("test") if ex.id.endswith("-367")]
    assert "Node(1)" in ex.answer["setup"]
    assert task.reward(task.target(ex), ex) == 1.0
    train = task.examples("train")
    assert sorted(e.id for e in train) == ["mbpp-train-601", "mbpp-train-602", "mbpp-train-927"]
    assert rewards(task, train) == [1.0] * 3


@pytest.mark.parametrize("completion", [
    "    return False\n",  # wrong body: one of the tests expects True
    "    return not any(True for _ in numbers)\n",
    "    retur True\n",  # syntax error
    "",
    "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```",
    "    import sys\n    sys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "    while True:\n        pass\n",
])
def test_wrong_or_hostile_humaneval_completions_score_0(completion):
    task = code_task("humaneval", path=str(DATA / "humaneval_slice.jsonl"), timeout_s=3)
    (ex,) = [ex for ex in task.examples("test") if ex.id.endswith("-0")]
    assert task.reward(completion, ex) == 0.0


def test_a_main_demo_block_after_the_solution_does_not_run():
    task = code_task("humaneval", path=str(DATA / "humaneval_slice.jsonl"), timeout_s=3)
    (ex,) = [ex for ex in task.examples("test") if ex.id.endswith("-0")]
    demo = "\n\nif __name__ == '__main__':\n    input()\n    while True:\n        pass\n"
    assert task.reward(task.target(ex) + demo, ex) == 1.0


def test_wrong_mbpp_solution_scores_0():
    task = code_task("mbpp", path=str(DATA / "mbpp_slice.jsonl"))
    (ex,) = [ex for ex in task.examples("test") if ex.id.endswith("-17")]
    right = task.target(ex)
    assert task.reward(right, ex) == 1.0
    wrong = right.replace("4*a", "3*a")
    assert wrong != right
    assert task.reward(wrong, ex) == 0.0


def test_slice_files_score_1_in_both_styles():
    task = code_task("humaneval", path=str(DATA / "humaneval_slice.jsonl"))
    examples = task.examples("test")
    assert len(examples) == 5
    assert rewards(task, examples) == [1.0] * 5
    assert rewards(task, examples, style="chat") == [1.0] * 5
    sanitized = code_task("mbpp_sanitized", path=str(DATA / "mbpp_slice_sanitized.json"))
    assert rewards(sanitized, sanitized.examples("test")) == [1.0] * 3


def test_full_function_rewrite_keeps_the_prompts_helpers():
    task = code_task("humaneval", path=str(DATA / "humaneval_slice.jsonl"))
    (ex,) = [ex for ex in task.examples("test") if ex.id.endswith("-38")]  # decode_cyclic
    body = ex.answer["solution"]
    reply = f"Here you go:\n```python\ndef decode_cyclic(s: str):\n{body}```\nDone."
    assert "def encode_cyclic" in humaneval_program(reply, ex)  # the prompt's helper survives
    assert task.reward(reply, ex) == 1.0


def test_extra_tests_are_run(tmp_path):
    row = load_rows(DATA / "humaneval_slice.jsonl")[0]  # has_close_elements
    good = {**row, "extra_tests": ["assert has_close_elements([1.0, 1.05], 0.1)"]}
    bad = {**row, "extra_tests": ["assert has_close_elements([1.0, 5.0], 0.1)"]}
    path = tmp_path / "plus.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    task = code_task("humaneval", path=str(path))
    first, second = task.examples("test")
    assert task.reward(task.target(first), first) == 1.0
    assert task.reward(task.target(second), second) == 0.0


def test_mbpp_challenge_tests_are_optional():
    plain = code_task("mbpp", path=str(DATA / "mbpp_slice.jsonl"))
    hard = code_task("mbpp", path=str(DATA / "mbpp_slice.jsonl"), challenge_tests=True)
    (a,) = [e for e in plain.examples("test") if e.id.endswith("-11")]
    (b,) = [e for e in hard.examples("test") if e.id.endswith("-11")]
    assert len(b.answer["tests"]) > len(a.answer["tests"])
    assert hard.reward(hard.target(b), b) == 1.0


def test_extract_code():
    assert extract_code("```python\nx = 1\n```") == "x = 1\n"
    assert extract_code("text\n```py\nx = 1\n") == "x = 1\n"  # unclosed fence runs to the end
    two = "```\nimport math\n```\nthen\n```python\ndef f(a):\n    return a\n```"
    assert extract_code(two, "f") == "def f(a):\n    return a\n"
    assert extract_code(two) == "import math\n"
    assert extract_code("def f():\n    return 1\n[DONE] trailing") == "def f():\n    return 1\n"


def test_prompts_and_targets():
    he = code_task("humaneval", path=str(DATA / "humaneval_slice.jsonl"))
    ex = he.examples("test")[0]
    assert he.prompt(ex, "compact") == load_rows(DATA / "humaneval_slice.jsonl")[0]["prompt"]
    assert "```python\n" in he.prompt(ex, "chat") and he.target(ex, "chat").startswith("```python")
    mb = code_task("mbpp", path=str(DATA / "mbpp_slice.jsonl"))
    ex = mb.examples("test")[0]
    compact = mb.prompt(ex, "compact")
    assert compact.endswith("[BEGIN]\n") and ex.question["tests"][0] in compact
    assert mb.target(ex, "compact").endswith("[DONE]")
    assert "```python" in mb.prompt(ex, "chat")


def test_registry_splits_and_bad_options():
    assert {"humaneval", "mbpp", "mbpp_sanitized"} <= set(TASKS)
    with pytest.raises(ValueError, match="only a test split"):
        get_task("humaneval").examples("train")
    assert len(get_task("mbpp").examples("train")) == 374
    assert get_task("mbpp").examples("test", n=3, seed=1) == get_task("mbpp").examples(
        "test", n=3, seed=1)
    with pytest.raises(ValueError, match="unknown code dataset"):
        code_task("apps")
    with pytest.raises(ValueError, match="timeout_s"):
        code_task("humaneval", timeout_s=float("inf"))


def test_memory_is_bounded_by_what_one_host_has():
    # All processes of a run share one cap (a cgroup where one can be made), so it must fit a
    # host; the API refuses more too.
    from tests.test_api_admission_policy import refusals, small

    too_much = sandbox.host_memory_mb() + 1
    with pytest.raises(ValueError, match="this host's memory"):
        code_task("humaneval", memory_mb=too_much)
    body = small(task={"name": "humaneval", "options": {"memory_mb": too_much}})
    assert "host's memory" in refusals(body)["task.options.memory_mb"]
    assert "task.options.memory_mb" not in refusals(
        small(task={"name": "humaneval", "options": {"memory_mb": 512}}))
