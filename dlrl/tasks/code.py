"""Code tasks (HumanEval, MBPP): the reward runs the completion against the problem's tests in
`dlrl.sandbox` → 1.0 if every test passes, 0.0 on any failure, timeout, cap or crash.

Data ship with the package (`dlrl/assets/benchmarks/`, gzipped, byte-identical to upstream once
unzipped; provenance and licences in `SOURCES-code.md` there): HumanEval's 164 problems
(openai/human-eval, MIT; a test split only), MBPP full (974 problems; test = task ids 11-510,
train = 601-974, as the MBPP README splits them) and MBPP sanitized (427; the same id ranges;
google-research, CC-BY-4.0).  `path=` reads another file of the same format instead (a JSONL, or
a JSON list).

Prompts.  HumanEval compact = the problem's own prompt (signature + docstring), which a base
model continues with the function body (Chen et al. 2021); chat = an instruction with that
prompt in a ```python block, asking for the whole function back in one.  MBPP compact = the
zero-shot form of Austin et al. 2021's prompt (task text, its tests, "[BEGIN]"; the paper adds
three solved examples, task ids 2-4, in front), ended by "[DONE]"; chat = the
same text as an instruction asking for a ```python block.  Targets are the reference solutions.

Extraction (`extract_code`): the first fenced block (```python, ```py or bare ```; an unclosed
fence counts to the end) that defines the entry point, else the first block, else the raw text
cut at "[DONE]".  A HumanEval completion that defines the entry point itself is run after the
prompt (so helper functions of the prompt stay defined); a body is appended to the prompt.

Programs.  The completion and the tests run in two interpreters (`sandbox.run_tests`): the
candidate's runs the prompt + completion (HumanEval) or the code (MBPP); the judge's runs the
reference solution, then the tests with the candidate's functions and classes bound by name
(values cross as plain data, see dlrl/judge.py).  HumanEval's tests: the problem's `test` +
`check(entry_point)`.  MBPP's: `test_setup_code` (it builds the solution's classes, e.g. `Node`
trees, through the candidate's class), the sanitized set's `test_imports`, then the asserts of
`test_list`.  A row may carry an optional `extra_tests` list (MBPP+/HumanEval+ style: more
assert statements, run last, with the entry point in scope); `challenge_tests=True` adds MBPP's
`challenge_test_list` too.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from functools import partial
from pathlib import Path

from dlrl import sandbox
from dlrl.tasks.task import Example, Task

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "benchmarks"
FILES = {"humaneval": "HumanEval.jsonl.gz", "mbpp": "mbpp.jsonl.gz",
         "mbpp_sanitized": "sanitized-mbpp.json.gz"}
MBPP_SPLITS = {"test": range(11, 511), "train": range(601, 975)}
"""MBPP task ids of each split (its README: 1-10 few-shot, 11-510 test, 511-600 validation)."""
MAX_COMPLETION_CHARS = 64_000
"""A longer completion is not run (scores 0): real solutions are a few hundred characters."""

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json file (a JSON list or one object per line), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The code in `completion`: a fenced block (preferring one that defines `entry_point`), else
    the raw text up to "[DONE]"."""
    blocks = _FENCE.findall(completion)
    if blocks:
        if entry_point:
            for block in blocks:
                if _defines(block, entry_point):
                    return block
        return blocks[0]
    return completion.split("[DONE]", 1)[0]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


# --- HumanEval -------------------------------------------------------------------------------

def humaneval_examples(rows: list[dict], name: str) -> list[Example]:
    return [Example(id=f"{name}-test-{str(r['task_id']).split('/')[-1]}",
                    question={"prompt": r["prompt"], "entry_point": r["entry_point"]},
                    answer={"solution": r["canonical_solution"], "test": r["test"],
                            "extra_tests": list(r.get("extra_tests") or [])})
            for r in rows]


def humaneval_prompt(ex: Example, style: str) -> str:
    if style == "compact":
        return ex.question["prompt"]
    return ("Complete the following Python function. Reply with the whole function, including "
            "its signature and any imports it needs, in a single ```python code block.\n\n"
            f"```python\n{ex.question['prompt']}```")


def humaneval_target(ex: Example, style: str) -> str:
    body = ex.answer["solution"]
    return body if style == "compact" else f"```python\n{ex.question['prompt']}{body}```"


def humaneval_program(completion: str, ex: Example) -> str:
    """The candidate's program: the prompt with the completion."""
    prompt, entry = ex.question["prompt"], ex.question["entry_point"]
    code = extract_code(completion, entry)
    return f"{prompt}\n{code}" if _defines(code, entry) else prompt + code


def humaneval_judge(ex: Example) -> dict:
    """The judge's side: the reference solution (so the prompt's helpers, e.g. `encode_cyclic`,
    are the trusted ones) and `check(entry_point)` on the candidate's function."""
    prompt, entry = ex.question["prompt"], ex.question["entry_point"]
    extra = "\n".join(ex.answer.get("extra_tests", []))
    return {"reference": prompt + ex.answer["solution"], "names": (entry,),
            "tests": f"{ex.answer['test']}\n\ncheck({entry})\n{extra}\n"}


# --- MBPP ------------------------------------------------------------------------------------

def mbpp_examples(rows: list[dict], name: str, challenge_tests: bool) -> list[Example]:
    examples = []
    for r in rows:
        tests = list(r["test_list"])
        if challenge_tests:
            tests += list(r.get("challenge_test_list") or [])
        examples.append(Example(
            id=f"{name}-{r['task_id']}",
            question={"text": r.get("text") or r.get("prompt"), "tests": list(r["test_list"]),
                      "entry_point": _entry_point(r["code"], r["test_list"])},
            answer={"solution": r["code"].replace("\r\n", "\n"), "tests": tests,
                    "setup": (r.get("test_setup_code") or "").replace("\r\n", "\n"),
                    "imports": list(r.get("test_imports") or []),
                    "extra_tests": list(r.get("extra_tests") or [])}))
    return examples


def _entry_point(code: str, tests: list[str]) -> str | None:
    """The reference solution's function that the tests call (MBPP names it nowhere else)."""
    called = "\n".join(tests)
    for fn in re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", code, re.M):
        if re.search(rf"\b{fn}\s*\(", called):
            return fn
    return None


def mbpp_prompt(ex: Example, style: str) -> str:
    tests = "\n".join(ex.question["tests"])
    if style == "compact":
        return (f"You are an expert Python programmer, and here is your task: "
                f"{ex.question['text']} Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")
    return (f"{ex.question['text']}\n\nYour code should pass these tests:\n\n```python\n{tests}\n"
            "```\n\nReply with the complete Python solution in a single ```python code block.")


def mbpp_target(ex: Example, style: str) -> str:
    code = ex.answer["solution"]
    return f"{code}\n[DONE]" if style == "compact" else f"```python\n{code}\n```"


def mbpp_program(completion: str, ex: Example) -> str:
    """The candidate's program: the extracted code alone."""
    return extract_code(completion, ex.question.get("entry_point"))


def mbpp_judge(ex: Example) -> dict:
    """The judge's side: the reference solution (its imports and helpers), then the setup code
    and asserts, with each function or class the reference defines and they use (the entry
    point, a `Node` or `Pair` class) bound to the candidate's."""
    tests = "\n".join([ex.answer["setup"], *ex.answer["imports"], *ex.answer["tests"],
                       *ex.answer["extra_tests"]]) + "\n"
    defined = re.findall(r"^(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w*)", ex.answer["solution"],
                         re.MULTILINE)
    names = tuple(dict.fromkeys(n for n in defined if re.search(rf"\b{n}\b", tests)))
    return {"reference": ex.answer["solution"], "names": names, "tests": tests}


# --- the task --------------------------------------------------------------------------------

def code_reward(program_of, judge_of, completion: str, ex: Example,
                limits: sandbox.Limits) -> float:
    """1.0 if the tests pass against the program built from `completion`, else 0.0: the program
    and the tests run in two sandboxed interpreters, and only the tests' one gives the verdict
    (dlrl/judge.py)."""
    if not completion.strip() or len(completion) > MAX_COMPLETION_CHARS:
        return 0.0
    result = sandbox.run_tests(program_of(completion, ex), limits=limits, **judge_of(ex))
    return 1.0 if result.passed else 0.0


def code_task(dataset: str = "humaneval", path: str | None = None, name: str | None = None,
              challenge_tests: bool = False, timeout_s: float = 10.0,
              memory_mb: int = 1024) -> Task:
    """A HumanEval-format (`dataset="humaneval"`) or MBPP-format ("mbpp", "mbpp_sanitized")
    task from the shipped file or `path`.  `timeout_s` is the wall-clock limit of one reward
    (CPU seconds are capped at the same value), `memory_mb` the memory of one run: the address
    space of each process, and all processes together where a memory cgroup can be made
    (`sandbox.memory_cgroup`); at most this host's memory.

    Raises `sandbox.SandboxUnavailable` here, at construction, when the host cannot contain the
    programs (rather than every reward quietly scoring 0)."""
    if dataset not in FILES:
        raise ValueError(f"unknown code dataset {dataset!r}; known: {sorted(FILES)}")
    if not 0 < timeout_s <= 300 or not 16 <= memory_mb <= sandbox.host_memory_mb():
        raise ValueError(f"timeout_s must be in (0, 300] and memory_mb in [16, "
                         f"{sandbox.host_memory_mb()}] (this host's memory), got {timeout_s}, "
                         f"{memory_mb}")
    sandbox.require()
    task_name = name or dataset
    limits = sandbox.Limits(wall_s=timeout_s, cpu_s=max(1, int(timeout_s)),
                            memory_bytes=memory_mb << 20)
    source = Path(path) if path is not None else ASSETS / FILES[dataset]
    is_humaneval = dataset == "humaneval"

    def make_examples(split: str, n: int | None, seed: int) -> list[Example]:
        rows = load_rows(source)
        if is_humaneval:
            if split != "test":
                raise ValueError(f"{task_name} has only a test split")
            examples = humaneval_examples(rows, task_name)
        else:
            ids = MBPP_SPLITS[split]
            examples = mbpp_examples([r for r in rows if int(r["task_id"]) in ids],
                                     f"{task_name}-{split}", challenge_tests)
        if n is None:
            return examples
        if n > len(examples):
            raise ValueError(f"asked for {n} {split} examples, {task_name} has {len(examples)}")
        return random.Random(f"{task_name}:{split}:{seed}").sample(examples, n)

    program_of = humaneval_program if is_humaneval else mbpp_program
    judge_of = humaneval_judge if is_humaneval else mbpp_judge
    return Task(name=task_name, make_examples=make_examples,
                make_prompt=humaneval_prompt if is_humaneval else mbpp_prompt,
                score=partial(code_reward, program_of, judge_of, limits=limits),
                make_target=humaneval_target if is_humaneval else mbpp_target)
