"""Which masked positions of the current block a cached step commits: schedule, threshold, factor.

All three take the step's confidences (B, T) — -inf where a position may not be committed (not
masked, or outside the block) — and return a (B, T) bool. Each commits at least one position per
row that still has a masked one, so a block always finishes.

* `commit_scheduled`: the reference sampler's fixed schedule — the k most confident, k from
  `rollout.sampler.num_transfer_tokens` (LLaDA Algorithm 5). Same decision as `select_transfer`.
* `commit_threshold`: every position whose confidence exceeds tau, and at least the most confident
  one (Fast-dLLM, Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of Diffusion LLM by
  Enabling KV Cache and Parallel Decoding", Sec. 3.3, threshold strategy). Under their Theorem 1
  greedy parallel decoding of tokens each above a high confidence agrees with sequential decoding.
* `commit_factor`: the largest n such that the n most confident positions all satisfy
  (n + 1) (1 - c_(n)) <= f, where c_(n) is the n-th largest confidence (Fast-dLLM's factor-based
  strategy, `get_transfer_index_dynamic` in NVlabs/Fast-dLLM llada/generate.py): the more tokens
  committed at once, the more confident the least of them must be.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rollout.sampler import select_transfer


def _eligible(confidence: Tensor) -> Tensor:
    return confidence > float("-inf")  # (B, T)


def _top(confidence: Tensor, n: Tensor) -> Tensor:
    """The n (B,) most confident eligible positions of each row, as (B, T) bool."""
    return select_transfer(confidence, n) & _eligible(confidence)


def commit_scheduled(confidence: Tensor, num_transfer_tokens: Tensor) -> Tensor:
    """The reference decision: the `num_transfer_tokens` (B,) most confident eligible positions."""
    return _top(confidence, num_transfer_tokens)


def commit_threshold(confidence: Tensor, threshold: float) -> Tensor:
    """Every eligible position with confidence > threshold, and at least each row's best one."""
    above = (confidence > threshold) & _eligible(confidence)  # (B, T)
    best = _top(confidence, torch.ones(confidence.shape[0], dtype=torch.long, device=confidence.device))
    return above | best


def commit_factor(confidence: Tensor, factor: float) -> Tensor:
    """The largest n with (n + 1)(1 - c_(n)) <= factor for every n' <= n, and at least one."""
    ranked = confidence.sort(dim=-1, descending=True).values  # (B, T), -inf last
    n = torch.arange(1, confidence.shape[-1] + 1, device=confidence.device, dtype=ranked.dtype)  # (T,)
    ok = ((n + 1) * (1 - ranked) <= factor) & (ranked > float("-inf"))  # (B, T)
    count = ok.long().cumprod(dim=-1).sum(dim=-1).clamp(min=1)  # (B,) longest good prefix
    return _top(confidence, count)
