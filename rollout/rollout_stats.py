"""What a faster sampler changes in the rollouts, as numbers a run logs.

A cached, parallel sampler draws from a different distribution than the reference one (see
rollout/README.md). Three per-batch figures make the difference visible in metrics.jsonl:

* tokens per step — committed response tokens per model forward of the row (the reference
  schedule fixes it at gen_length / steps; threshold decoding raises it when the model is sure);
* mean confidence — the model's probability of each token it committed, averaged over tokens
  (threshold decoding commits only what is above tau, so a rise here with flat reward is the
  over-confidence drift RL users report);
* EOS position — index of the first end-of-text token in the completion (gen_length if none):
  completions that shorten over training show here, and early stop is what makes them cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RolloutStats:
    """Sums over the rows of one or more sampled batches; `metrics` turns them into means."""

    rows: int = 0
    forwards: int = 0
    """Model calls (one per step of the whole batch; a CFG step counts once)."""
    row_steps: int = 0
    """Steps summed over rows (a row that stopped early takes no more steps)."""
    committed: int = 0
    """Response tokens committed by the model (not the early-stop fill)."""
    confidence_sum: float = 0.0
    confidence_count: int = 0
    eos_position_sum: int = 0

    def add(self, other: "RolloutStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def metrics(self, prefix: str = "rollout_") -> dict[str, float]:
        """Means for metrics.jsonl; mean confidence only where the engine recorded it."""
        out = {
            f"{prefix}tokens_per_step": self.committed / max(self.row_steps, 1),
            f"{prefix}eos_position": self.eos_position_sum / max(self.rows, 1),
            f"{prefix}forwards": float(self.forwards),
        }
        if self.confidence_count:
            out[f"{prefix}mean_confidence"] = self.confidence_sum / self.confidence_count
        return out


def eos_positions(completion: Tensor, eos_ids: tuple[int, ...]) -> Tensor:
    """(B, L) tokens -> (B,) index of each row's first EOS token, L where there is none."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))  # (B, L)
    length = completion.shape[1]
    first = torch.where(is_eos, torch.arange(length, device=completion.device), length)  # (B, L)
    return first.min(dim=1).values


def reference_stats(completion: Tensor, steps: int, eos_ids: tuple[int, ...]) -> RolloutStats:
    """Stats of a batch from the reference sampler: every row takes `steps` steps for L tokens.

    The reference sampler is not instrumented (it stays bit-identical), so no confidence is recorded.
    """
    b, length = completion.shape
    return RolloutStats(rows=b, forwards=steps, row_steps=b * steps, committed=b * length,
                        eos_position_sum=int(eos_positions(completion, eos_ids).sum()))
