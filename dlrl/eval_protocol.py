"""A written-down evaluation protocol (deploy/eval/*.toml) and the eval examples it names.

The schema lives in the core because the job spec (dlrl.config: eval.protocol), the job API's
admission (services.admission) and the rollout side (rollout.evaluation runs it) all read it.
Its `[decoding]` table is dlrl.decoding.Decoding, the type rollouts use too.

Published numbers for the same model move by tens of points between harnesses (BGPO's Countdown
87.5 in its paper, 10.0 in another framework's), because decoding, prompt and answer reading all
differ. So every setting that can move a score lives in one small TOML file, the file's sha256
goes into every result, and nothing here has a default that a benchmark protocol relies on
silently: `EvalProtocol.from_toml` rejects unknown fields and names the field of any bad value.

    protocol = EvalProtocol.from_toml("deploy/eval/gsm8k.toml")
    examples = load_examples(protocol, task)      # the fixed, ordered eval set

Data: `format = "task"` takes the task's own test split (`n`, `seed`); the other formats read a
pinned file (path relative to the protocol file, sha256 checked): "math" (JSONL/parquet rows of
GSM8K / MATH-500, read by dlrl.tasks.math_task), "d1_sudoku_csv" (d1's 4x4 test set: Puzzle,
Solution with '0' for a blank) and "d1_countdown_jsonl" (d1's Countdown test set: input
"a,b,c", output target).
"""

from __future__ import annotations

import csv
import hashlib
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dlrl.decoding import Decoding
from dlrl.tasks import Example
from dlrl.tasks.answer_format import answer_region
from dlrl.tasks.math_task import last_boxed, load_rows, to_examples


class ProtocolError(ValueError):
    """A protocol file that is missing, not TOML, or has a bad field (the message names it)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Prompt(_Section):
    style: Literal["compact", "chat"]
    """The task's prompt style; 'chat' goes through the tokenizer's chat template."""
    template: str = "{prompt}"
    """Text around the task's prompt; `{prompt}` (exactly once) is replaced by it."""

    @model_validator(mode="after")
    def _one_slot(self) -> "Prompt":
        if self.template.count("{prompt}") != 1:
            raise ValueError("template must contain '{prompt}' exactly once")
        return self


class Answer(_Section):
    extraction: Literal["task", "answer_tag", "boxed"] = "task"
    """What the reward reads: 'task' the whole completion (the task's own reader); 'answer_tag'
    only the last <answer>…</answer> region; 'boxed' only the last \\boxed{…} (rewrapped)."""


class Sampling(_Section):
    n_samples: int = Field(1, ge=1, le=1024)
    """Completions per example; pass@k needs n_samples >= k."""
    k: list[int] = Field(default_factory=lambda: [1], min_length=1)
    """The k of each reported pass@k (unbiased estimator of Chen et al. 2021, eq. 1)."""
    seed: int = Field(0, ge=0)
    """Seeds the sampling noise of each batch (mixed with the batch index, so resuming at a
    batch draws the same noise as the uninterrupted run)."""
    batch_size: int = Field(8, ge=1, le=4096)
    """Examples per batch (one generate call of batch_size * n_samples rows; the unit of resume)."""


class Data(_Section):
    format: Literal["task", "math", "d1_sudoku_csv", "d1_countdown_jsonl"] = "task"
    path: str | None = None
    """File of the eval set, relative to the protocol file (formats other than 'task')."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """Expected sha256 of the file: a changed file is an error, not a silently different number."""
    n: int | None = Field(None, ge=1)
    """Examples (None: all of them; 'task' format: the task's whole test split)."""
    seed: int = 0
    """'task' format only: the seed of task.examples('test', n, seed)."""

    @model_validator(mode="after")
    def _path(self) -> "Data":
        if self.format != "task" and self.path is None:
            raise ValueError(f"format {self.format!r} needs a path")
        if self.format == "task" and self.path is not None:
            raise ValueError("format 'task' reads the task's own test split and takes no path")
        return self


class TaskRef(_Section):
    name: str = Field(min_length=1)
    """The registered task the protocol is written for (`dlrl eval --task` must agree)."""
    options: dict = Field(default_factory=dict)
    """Keyword options of the task factory."""


class EvalProtocol(_Section):
    name: str = Field(min_length=1)
    metric: Literal["mean_reward", "accuracy", "pass@k"]
    """The headline number and what best-checkpoint selection maximises ('pass@k': the first k)."""
    task: TaskRef
    decoding: Decoding
    prompt: Prompt
    answer: Answer = Answer()
    sampling: Sampling = Sampling()
    data: Data = Data()
    path: str | None = Field(None, exclude=True)
    """Where the protocol was read from (not part of the protocol)."""
    sha256: str | None = Field(None, exclude=True)
    """sha256 of the protocol file's bytes: what a result cites."""

    @model_validator(mode="after")
    def _samples(self) -> "EvalProtocol":
        if max(self.sampling.k) > self.sampling.n_samples or min(self.sampling.k) < 1:
            raise ValueError(f"sampling.k {self.sampling.k} must lie in 1..n_samples ({self.sampling.n_samples})")
        greedy = self.decoding.temperature == 0.0 and self.decoding.remasking == "low_confidence"
        if self.sampling.n_samples > 1 and greedy:
            raise ValueError("n_samples > 1 with greedy decoding (temperature 0, low_confidence) "
                             "repeats one completion: set decoding.temperature > 0")
        return self

    @classmethod
    def from_toml(cls, path: str | Path) -> "EvalProtocol":
        """Read and validate a protocol file; any problem is a `ProtocolError` naming the field."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ProtocolError(f"cannot read protocol {path}: {exc}") from exc
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ProtocolError(f"protocol {path} is not valid TOML: {exc}") from exc
        for key in ("path", "sha256"):
            if key in data:
                raise ProtocolError(f"protocol {path}: {key}: set by the loader, not the file")
        try:
            return cls.model_validate({**data, "path": str(path), "sha256": hashlib.sha256(raw).hexdigest()})
        except ValidationError as exc:
            lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(protocol)'}: {e['msg']}" for e in exc.errors()]
            raise ProtocolError(f"invalid protocol {path}:\n" + "\n".join(lines)) from None

    def data_path(self) -> Path | None:
        """The eval file, resolved against the protocol file's folder."""
        if self.data.path is None:
            return None
        base = Path(self.path).parent if self.path else Path.cwd()
        return (base / self.data.path).resolve()


# ------------------------------------------------------------------------------ answer extraction

def extract(completion: str, extraction: str) -> str:
    """The text the reward scores under `extraction` (see `Answer.extraction`)."""
    if extraction == "task":
        return completion
    if extraction == "answer_tag":
        return answer_region(completion)
    if extraction == "boxed":  # only the boxed content, rewrapped so a boxed-reading reward sees it
        boxed = last_boxed(completion)
        return "" if boxed is None else f"\\boxed{{{boxed}}}"
    raise ValueError(f"unknown answer extraction {extraction!r}")


# ------------------------------------------------------------------------------ eval examples

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def d1_sudoku_examples(path: Path, name: str = "sudoku") -> list[Example]:
    """d1's 4x4 test CSV (Puzzle, Solution; '0' = blank) as sudoku-task examples ('.' = blank)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for i, row in enumerate(rows):
        puzzle, solution = row["Puzzle"].strip(), row["Solution"].strip()
        if len(puzzle) != 16 or len(solution) != 16:
            raise ValueError(f"{path} row {i + 1}: a 4x4 puzzle and solution are 16 digits each")
        out.append(Example(id=f"{name}-d1-{i:06d}", question={"puzzle": puzzle.replace("0", ".")},
                           answer={"solution": solution}))
    return out


def d1_countdown_examples(path: Path, name: str = "countdown") -> list[Example]:
    """d1's Countdown test JSONL ({"input": "a,b,c", "output": "t"}) as countdown-task examples.

    The file has no solution equations, so `answer` holds only the target."""
    out = []
    for i, row in enumerate(load_rows(path)):
        numbers = [int(x) for x in str(row["input"]).split(",")]
        target = int(row["output"])
        out.append(Example(id=f"{name}-d1-{i:06d}", question={"numbers": numbers, "target": target},
                           answer={"target": target}))
    return out


def load_examples(protocol: EvalProtocol, task, limit: int | None = None) -> list[Example]:
    """The protocol's eval set, in a fixed order: its first `limit` examples when a limit is given."""
    d = protocol.data
    if d.format == "task":
        examples = task.examples("test", d.n, d.seed)
    else:
        path = protocol.data_path()
        if not path.is_file():
            raise ProtocolError(f"protocol {protocol.path}: data.path: no file {path}")
        if d.sha256 and file_sha256(path) != d.sha256:
            raise ProtocolError(f"protocol {protocol.path}: data.sha256: {path} has sha256 "
                                f"{file_sha256(path)}, the protocol pins {d.sha256}")
        if d.format == "math":
            examples = to_examples(load_rows(path), task.name, "test")
        elif d.format == "d1_sudoku_csv":
            examples = d1_sudoku_examples(path, task.name)
        else:
            examples = d1_countdown_examples(path, task.name)
        if d.n is not None:
            examples = examples[:d.n]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"protocol {protocol.name} selects no examples")
    return examples
