"""What the model writes: a few held-out prompts with their completions and rewards at each evaluation.

A mean reward hides what moved it: a model that learns to emit a well-formed but wrong grid, or
one that collapses to a single answer, can hold the same mean for a while. TRL, verl and
OpenRLHF log sample completions next to their metrics for this reason. Every periodic
evaluation returns its first `eval.samples` held-out examples (the same prompts every time, so a
prompt can be followed across the run; rollout.completion.evaluate and
rollout.evaluation.sample_records) and the driver appends them to <run>/samples.jsonl, one line per
completion:

    {"step": 20, "index": 0, "id": "...", "prompt": "...", "completion": "...", "reward": 0.75}

and prints the first at the console.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLES = "samples.jsonl"
SHOWN_CHARS = 160
"""A console sample longer than this is cut (the file keeps it whole)."""


def one_line(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` on one console line: newlines shown as ' / ', cut at `limit` characters."""
    flat = " / ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def write_samples(run_dir: Path, step: int, samples: list[dict[str, Any]]) -> None:
    """Append the evaluation of `step`'s samples to <run>/samples.jsonl."""
    with (run_dir / SAMPLES).open("a", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            f.write(json.dumps({"step": step, "index": i, **s}, ensure_ascii=False) + "\n")


def console_line(samples: list[dict[str, Any]]) -> str | None:
    """The first sample as the console shows it (None when there are none)."""
    if not samples:
        return None
    s = samples[0]
    return (f"[sample] reward {s['reward']:.3f}  prompt: {one_line(s['prompt'], 80)}"
            f"  ->  {one_line(s['completion'])}")


def truncate_samples(run_dir: Path, step: int) -> None:
    """Drop the samples of evaluations at steps >= `step` (a resumed or rewound run redoes them)."""
    path = run_dir / SAMPLES
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) < step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
