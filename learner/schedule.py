"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay.

A pure function of the learner step, so a resumed learner (whose LambdaLR restores only its step
count) continues on exactly the same curve.
"""

from __future__ import annotations

import math
from typing import Literal

Decay = Literal["constant", "linear", "cosine"]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay: Decay, final_ratio: float) -> float:
    """Multiplier of the base learning rate at learner step `step` (0-based).

    Warm-up ramps (step + 1) / (warmup_steps + 1) up to 1 at step `warmup_steps`; then `decay`
    takes it from 1 to `final_ratio` at the last step (`total_steps - 1`) and holds it there.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == "constant":
        return 1.0
    span = max(total_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if decay == "linear":
        return 1.0 - (1.0 - final_ratio) * progress
    if decay == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr decay {decay!r}")
