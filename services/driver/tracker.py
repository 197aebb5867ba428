"""The optional experiment tracker: every metrics record also goes to TensorBoard.

`runtime.tracker = "tensorboard"` opens a `torch.utils.tensorboard.SummaryWriter` on
<run>/tensorboard/ (the ecosystem's own writer: it needs the `tensorboard` package, the `tracker`
extra of pyproject.toml) and logs the records metrics.jsonl gets, as they are written: each numeric
field of a train record as the scalar `train/<field>`, of an eval record as `eval/<field>`, at the
record's step (the learner steps done, the same number as metrics.jsonl, the console and
reward.png). Non-numeric fields (the staleness histogram, transport names) stay in metrics.jsonl.
`tensorboard --logdir runs/` shows every run side by side.

A resumed run writes a new events file beside the old ones; TensorBoard keeps the last value
written for a step, which is the resumed run's for the steps it redid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
SKIPPED = {"time", "kind", "step"}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields under `<kind>/<field>` (booleans and non-finite values left out)."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in SKIPPED or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoardTracker:
    """Sends metrics records to a SummaryWriter; `log` takes the record metrics.jsonl gets."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch imports tensorboard lazily, only here
            raise RuntimeError("runtime.tracker = 'tensorboard' needs the tensorboard package: "
                               "pip install 'dlrl[tracker]' (or pip install tensorboard)") from e
        self.logdir = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=record.get("time"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(name: str | None, run_dir: Path) -> TensorBoardTracker | None:
    """The tracker `runtime.tracker` names (None: no tracker)."""
    if name is None:
        return None
    if name == "tensorboard":
        return TensorBoardTracker(run_dir)
    raise ValueError(f"runtime.tracker: unknown tracker {name!r}")
