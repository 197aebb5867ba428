"""The two types every verifiable task shares: an `Example` and the `Task` that owns it.

A task is a bundle of four plain functions (make examples, write a prompt, write the ideal
completion, score a completion) rather than a class hierarchy: each concrete task module builds one
`Task` in a factory (`sudoku_task`, `countdown_task`, `math_task`) and the registry in
`dlrl.tasks` looks factories up by name.  The methods here add the checks every task needs once:
valid split/style names, and a reward that never raises and always lands in [0, 1] — a reward
runs on model text inside rollout workers, where one exception would drop a whole group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from collections.abc import Callable

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
STYLES = ("compact", "chat")
"""`compact`: terse text for tiny character-level models; `chat`: an instruction for instruct LLMs
(the text of the user turn; applying a chat template is the caller's job)."""


@dataclass(frozen=True)
class Example:
    """One task instance. `question` and `answer` are JSON-able so they can ride on the wire."""

    id: str
    """Stable id, e.g. "sudoku-train-3f2a9c01d4" or "gsm8k-test-000123"."""
    question: dict
    """Task input, e.g. {"puzzle": "1.3....."}, {"numbers": [..], "target": ..}, {"problem": ".."}."""
    answer: dict
    """Reference, e.g. {"solution": "1234..."} or {"answer": "42"}."""


@dataclass(frozen=True)
class Task:
    """A named verifiable task: examples, prompts, SFT targets and a reward."""

    name: str
    make_examples: Callable[[str, "int | None", int], list[Example]]
    """(split, n, seed) -> examples; must be a pure function of its arguments."""
    make_prompt: Callable[[Example, str], str]
    """(example, style) -> prompt text."""
    score: Callable[[str, Example], float]
    """(completion, example) -> reward; may raise, `Task.reward` catches."""
    make_target: Callable[[Example, str], "str | None"] | None = None
    """(example, style) -> ideal completion for SFT, or None where the task has none (math)."""

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """`n` examples of `split` ("train" or "test"); n=None means the task's whole split."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0 or None, got {n}")
        return self.make_examples(split, n, seed)

    def prompt(self, ex: Example, style: str = "compact") -> str:
        """The prompt text for `ex` in `style` ("compact" or "chat")."""
        _check_style(style)
        return self.make_prompt(ex, style)

    def target(self, ex: Example, style: str = "compact") -> str | None:
        """The ideal completion of `prompt(ex, style)` (for SFT), or None if the task has none."""
        _check_style(style)
        return None if self.make_target is None else self.make_target(ex, style)

    def reward(self, completion: str, ex: Example) -> float:
        """Score `completion` in [0, 1]. Never raises: anything unexpected scores 0.0."""
        if not isinstance(completion, str):
            return 0.0
        try:
            value = float(self.score(completion, ex))
        except Exception:  # model text is adversarial by nature; a crash must not kill a worker
            logger.debug("reward of task %s raised; scoring 0.0", self.name, exc_info=True)
            return 0.0
        if math.isnan(value):
            return 0.0
        return min(1.0, max(0.0, value))


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
