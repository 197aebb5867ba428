"""Math word problems (GSM8K, MATH-500, or any local JSONL/parquet): the answer is the last
`\\boxed{…}` of the completion, checked against the reference with math_verify → 1.0 / 0.0.

(Named `math_task` so it cannot shadow the standard `math` module.)

Sources: a local file (`path`, ".jsonl" or ".parquet"; a "{split}" in the path is replaced by the
split name, otherwise the one file serves both splits) or, only when no path is given, a Hugging
Face dataset by short name: "gsm8k" → openai/gsm8k (config "main"), "math500" →
HuggingFaceH4/MATH-500 (test split only).  Field names default to the first present of
"question"/"problem" and "answer"/"solution"; a GSM8K answer keeps what follows "####" (commas
dropped), an answer holding \\boxed{…} (a MATH solution) keeps the last boxed content.

Formats: compact = the problem and "\\n"; chat = d1's reasoning/answer format plus a request for
\\boxed{}.  Math has no SFT target (`Task.target` gives None).

The reward never hangs: the boxed content is capped at `MAX_ANSWER_CHARS` and math_verify runs in
a killable child process with a hard deadline (see `dlrl.tasks.verify_process`).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from dlrl.tasks.answer_format import REASONING_FORMAT
from dlrl.tasks.data_root import resolve_data_path
from dlrl.tasks.task import Example, Task
from dlrl.tasks.verify_process import check_answer

logger = logging.getLogger(__name__)

HF_DATASETS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "gsm8k": ("openai/gsm8k", "main", ("train", "test")),
    "math500": ("HuggingFaceH4/MATH-500", None, ("test",)),
}
"""Short name → (hub id, config, splits it has)."""
QUESTION_FIELDS = ("question", "problem")
ANSWER_FIELDS = ("answer", "solution")
MAX_ANSWER_CHARS = 500
"""Longest boxed answer we hand to math_verify; real answers are a few dozen characters."""


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` with balanced braces (escaped `\\{ \\}` do not count),
    or None if there is none or it is unbalanced / longer than `MAX_ANSWER_CHARS`."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] in " \t\n":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, j = 0, i
    stop = min(len(text), i + MAX_ANSWER_CHARS + 2)  # bounded scan, however long the text
    while j < stop:
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


def reference_answer(raw: object) -> str:
    """The final answer inside a reference field: after GSM8K's "####", else the last boxed
    content of a worked solution, else the text itself."""
    text = str(raw).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(text)
    return boxed.strip() if boxed is not None else text


def load_rows(path: str | Path) -> list[dict]:
    """All rows of a local ".jsonl" (one JSON object per line) or ".parquet" file (inside the data
    root when $DLRL_DATA_ROOT is set: see `dlrl.tasks.data_root`)."""
    path = resolve_data_path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"expected a .jsonl or .parquet file, got {path}")


def load_hf_rows(dataset: str, split: str) -> list[dict]:
    """Rows of a known Hugging Face dataset (needs the network or the HF cache)."""
    if dataset not in HF_DATASETS:
        raise ValueError(f"unknown math dataset {dataset!r}; known: {sorted(HF_DATASETS)}")
    hub_id, config, splits = HF_DATASETS[dataset]
    if split not in splits:
        raise ValueError(f"{dataset} has no {split!r} split (it has {splits})")
    import datasets

    return list(datasets.load_dataset(hub_id, config, split=split))


def _field(row: dict, wanted: str | None, candidates: tuple[str, ...]) -> str:
    names = (wanted,) if wanted else candidates
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise KeyError(f"row has none of the fields {names}: {sorted(row)}")


def to_examples(rows: list[dict], name: str, split: str, question_field: str | None = None,
                answer_field: str | None = None) -> list[Example]:
    """Examples of `rows`; ids carry the row index, so they are stable for a given file."""
    return [Example(id=f"{name}-{split}-{i:06d}",
                    question={"problem": str(_field(row, question_field, QUESTION_FIELDS))},
                    answer={"answer": reference_answer(_field(row, answer_field, ANSWER_FIELDS))})
            for i, row in enumerate(rows)]


def prompt(ex: Example, style: str) -> str:
    """Compact: the problem and "\\n". Chat: d1's format plus a request for \\boxed{}."""
    problem = ex.question["problem"]
    if style == "compact":
        return f"{problem}\n"
    return (f"{REASONING_FORMAT}\n\n"
            "Solve the problem below. Put the final answer inside \\boxed{} within the "
            f"<answer></answer> tags.\n\n{problem}")


def reward(completion: str, ex: Example, timeout_s: float = 5.0) -> float:
    """1.0 if the last \\boxed{} of `completion` equals the reference per math_verify, else 0.0
    (no boxed answer, unbalanced braces, over-long answer, timeout or any error)."""
    pred = last_boxed(completion)
    if pred is None or not pred.strip():
        return 0.0
    try:
        return 1.0 if check_answer(ex.answer["answer"], pred, timeout_s) else 0.0
    except TimeoutError:
        logger.debug("math_verify timed out on %r", pred[:100])
        return 0.0
    except Exception:  # math_verify's own errors come back as "no"; this is the child failing
        logger.warning("math_verify child failed; scoring 0.0", exc_info=True)
        return 0.0


def math_task(dataset: str | None = None, path: str | None = None,
              question_field: str | None = None, answer_field: str | None = None,
              name: str | None = None, verify_timeout_s: float = 5.0) -> Task:
    """A math task from a local file (`path`) or, when no path is given, a known HF `dataset`.

    `question_field`/`answer_field` override the default field names; `name` defaults to the
    dataset name or the file stem; `verify_timeout_s` is the hard deadline of one reward call."""
    if path is None and dataset is None:
        raise ValueError("math task needs a local `path` or a `dataset` name "
                         f"({sorted(HF_DATASETS)})")
    if path is None and dataset not in HF_DATASETS:
        raise ValueError(f"unknown math dataset {dataset!r}; known: {sorted(HF_DATASETS)}")
    task_name = name or dataset or Path(str(path)).stem

    def make_examples(split: str, n: int | None, seed: int) -> list[Example]:
        rows = (load_rows(str(path).replace("{split}", split)) if path is not None
                else load_hf_rows(dataset, split))
        examples = to_examples(rows, task_name, split, question_field, answer_field)
        if n is None:
            return examples  # the whole split, in file order
        if n > len(examples):
            raise ValueError(f"asked for {n} {split} examples, {task_name} has {len(examples)}")
        return random.Random(f"{task_name}:{split}:{seed}").sample(examples, n)

    def score(completion: str, ex: Example) -> float:
        return reward(completion, ex, verify_timeout_s)

    return Task(name=task_name, make_examples=make_examples, make_prompt=prompt, score=score)
