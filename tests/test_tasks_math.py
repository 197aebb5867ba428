"""Math tasks: local JSONL/parquet loading, \\boxed extraction, and a math_verify reward that works
from worker threads and cannot hang.  Nothing here touches the network."""

from __future__ import annotations

import json
import threading
import time

import pytest

from dlrl.tasks import Example, get_task
from dlrl.tasks.math_task import last_boxed, math_task, reference_answer

DATA = "tests/data"


def _ex(answer: str) -> Example:
    return Example(id="m", question={"problem": "?"}, answer={"answer": answer})


@pytest.fixture(scope="module")
def task():
    return math_task(path=f"{DATA}/math_tiny.jsonl")


def test_last_boxed_balances_braces():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed {42}") == "42"
    assert last_boxed(r"\boxed{\{-3, 3\}}") == r"\{-3, 3\}"  # escaped braces do not nest
    assert last_boxed(r"\boxed{\frac{1}{2}") is None          # unbalanced
    assert last_boxed(r"\boxed{3} and \boxed{") is None       # the last one is what counts
    assert last_boxed(r"\boxed 5") is None
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{" + "1" * 10_000 + "}") is None  # over the length cap


def test_reference_answers():
    assert reference_answer("12 * 144 = <<12*144=1728>>1728\n#### 1,728") == "1728"
    assert reference_answer(r"so $x = \boxed{\frac{7}{2}}$.") == r"\frac{7}{2}"
    assert reference_answer(" 42 ") == "42"
    assert reference_answer(1024) == "1024"  # parquet/HF fields need not be strings


def test_gsm8k_jsonl_loads_with_answers_after_the_hashes():
    task = get_task("gsm8k", path=f"{DATA}/gsm8k_tiny.jsonl")
    examples = task.examples("test")
    assert task.name == "gsm8k"
    assert [e.answer["answer"] for e in examples] == ["7", "150", "1728", "35.5", "150"]
    assert examples[0].id == "gsm8k-test-000000"
    assert examples[0].question["problem"].startswith("A baker makes 24 muffins")
    assert task.prompt(examples[0], "compact") == examples[0].question["problem"] + "\n"
    chat = task.prompt(examples[0], "chat")
    assert "\\boxed{}" in chat and "<answer>" in chat and "A baker" in chat


def test_math_jsonl_takes_the_boxed_answer_of_the_solution(task):
    answers = [e.answer["answer"] for e in task.examples("train")]
    assert answers == [r"\frac{1}{2}", r"2\sqrt{3}", "5", r"\frac{7}{2}", r"\{-3, 3\}"]


def test_parquet_loads():
    task = math_task(path=f"{DATA}/math_tiny.parquet")
    examples = task.examples("test")
    assert [e.answer["answer"] for e in examples] == ["1024", r"\frac{1}{4}", r"5\sqrt{2}"]
    assert task.reward(r"It is \boxed{\frac{5}{20}}.", examples[1]) == 1.0


def test_custom_fields_split_paths_and_seeded_subsets(tmp_path):
    for split, count in (("train", 6), ("test", 2)):
        rows = [{"q": f"{split} {i}+{i}?", "a": str(2 * i)} for i in range(count)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = math_task(path=str(tmp_path / "{split}.jsonl"), question_field="q", answer_field="a",
                     name="sums")
    assert len(task.examples("train")) == 6 and len(task.examples("test")) == 2
    assert task.examples("test")[1].question["problem"] == "test 1+1?"
    subset = task.examples("train", 3, seed=5)
    assert len({e.id for e in subset}) == 3 and subset == task.examples("train", 3, seed=5)
    assert task.examples("train", 6, seed=1) != task.examples("train", 6, seed=2)
    with pytest.raises(ValueError):
        task.examples("train", 7)
    with pytest.raises(KeyError):
        math_task(path=str(tmp_path / "{split}.jsonl")).examples("train")  # no q/a defaults


def test_hf_names_are_checked_before_any_download():
    with pytest.raises(ValueError, match="no 'train' split"):
        get_task("math500").examples("train")
    with pytest.raises(ValueError):
        math_task(dataset="not_a_dataset")
    with pytest.raises(ValueError):
        math_task(path=f"{DATA}/notes.txt").examples("train")


@pytest.mark.parametrize("completion, reference, reward", [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1.0),
    (r"<answer>\boxed{1,728}</answer>", "1728", 1.0),
    (r"\boxed{\{3, -3\}}", r"\{-3, 3\}", 1.0),
    (r"first \boxed{4} then \boxed{3}", "4", 0.0),   # the last box is the answer
    (r"\boxed{3}", "4", 0.0),
    ("the answer is 4", "4", 0.0),                   # no box, no credit
    (r"\boxed{4", "4", 0.0),                          # unbalanced
    (r"\boxed{}", "4", 0.0),
    (r"\boxed{\frac{1}{}", "4", 0.0),
    (r"\boxed{__import__('os').system('x')}", "4", 0.0),
])
def test_reward_table(task, completion, reference, reward):
    assert task.reward(completion, _ex(reference)) == reward


def test_reward_from_worker_threads(task):
    cases = [(r"\boxed{\frac{1}{2}}", "0.5", 1.0), (r"\boxed{3}", "4", 0.0),
             (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0), (r"\boxed{7}", "7", 1.0)] * 2
    results: dict[int, float] = {}

    def run(i: int) -> None:
        completion, reference, _ = cases[i]
        results[i] = task.reward(completion, _ex(reference))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {i: expected for i, (_, _, expected) in enumerate(cases)}


def test_reward_cannot_hang_on_a_power_tower():
    # 9^(9^9) has ~370 million digits: sympy would grind for minutes in C, where no signal
    # reaches it; the child process is killed at the deadline instead
    quick = math_task(path=f"{DATA}/math_tiny.jsonl", verify_timeout_s=1.0)
    start = time.perf_counter()
    assert quick.reward(r"\boxed{9^{9^{9}}}", _ex("4")) == 0.0
    assert time.perf_counter() - start < 5.0
    assert quick.reward(r"\boxed{4}", _ex("4")) == 1.0  # the pool recovered


def test_reward_on_huge_completions(task):
    start = time.perf_counter()
    assert task.reward("x" * 10**7 + r"\boxed{5}", _ex("5")) == 1.0
    assert task.reward(r"\boxed{" + "9" * 10**6 + "}", _ex("5")) == 0.0
    assert task.reward("{" * 10**6, _ex("5")) == 0.0
    assert time.perf_counter() - start < 5.0
