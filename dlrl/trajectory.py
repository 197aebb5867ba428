"""The one wire schema: a `TrajectoryGroup` is what a rollout worker produces and the learner eats.

One group = one prompt and its G sampled completions, scored. The same type travels through the
queue (Ray queue locally; Redis Streams in the distributed runtime, serialised safely, never
pickled), the learner and the API. Token ids are int32 numpy arrays so the group is compact and
framework-neutral; `mask_seed` makes the learner's Monte-Carlo masks reproducible anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrajectoryGroup:
    group_id: str  # unique per (job, step, prompt): makes delivery idempotent
    task: str
    prompt_id: str  # the task example's id
    prompt_ids: np.ndarray  # (P,) int32, unpadded prompt tokens
    completion_ids: np.ndarray  # (G, L) int32, generated tokens (EOS-filled tail included)
    rewards: np.ndarray  # (G,) float32
    policy_version: int  # weights version that generated the completions
    mask_seed: int  # seeds the learner's MC masks: mask(i, j) = f(mask_seed, i, j)
    unmask_steps: np.ndarray | None = None  # (G, L) int16, sampler step that revealed each token
    timings: dict[str, float] = field(default_factory=dict)  # seconds: generate, reward

    def __post_init__(self) -> None:
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int32)
        self.completion_ids = np.asarray(self.completion_ids, dtype=np.int32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        if self.prompt_ids.ndim != 1 or self.completion_ids.ndim != 2:
            raise ValueError("prompt_ids must be (P,) and completion_ids (G, L)")
        if self.rewards.shape != (self.completion_ids.shape[0],):
            raise ValueError(
                f"rewards {self.rewards.shape} do not match {self.completion_ids.shape[0]} completions"
            )
        if self.unmask_steps is not None:
            self.unmask_steps = np.asarray(self.unmask_steps, dtype=np.int16)
            if self.unmask_steps.shape != self.completion_ids.shape:
                raise ValueError("unmask_steps must have the shape of completion_ids")

    @property
    def size(self) -> int:
        return int(self.completion_ids.shape[0])
