"""Which masked positions of the current block a cached step commits: schedule, threshold, factor.

Each policy gets the step's ordering score (B, T) — the remasking confidence of the reference
sampler: the model's probability of x0 under "low_confidence", a uniform draw under "random";
-inf where a position may not be committed (not masked, or outside the block) — and returns a
(B, T) bool. Each commits at least one position per row that still has a masked one, so a block
always finishes.

* `commit_scheduled`: the reference sampler's fixed schedule — the k best by score, k from
  `rollout.sampler.num_transfer_tokens` (LLaDA Algorithm 5). Same decision as `select_transfer`.
* `commit_threshold`: every position whose model probability exceeds tau, and at least the best
  one by score (Fast-dLLM, Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of Diffusion LLM
  by Enabling KV Cache and Parallel Decoding", Sec. 3.3). Their Theorem 1 — greedy parallel
  decoding of tokens that are each confident enough agrees with sequential decoding — is about the
  model's probabilities, so the parallel set is judged by probability whatever the remasking;
  the remasking only picks the one position a step must commit when none is confident.
* `commit_factor`: the n most probable positions, n the largest with (n + 1) (1 - p_(n)) <= f for
  every n' <= n, where p_(n) is the n-th largest probability (Fast-dLLM's factor-based strategy,
  `get_transfer_index_dynamic` in NVlabs/Fast-dLLM llada/generate.py): the more tokens committed
  at once, the more confident the least of them must be. At least the best one by score.

Under "low_confidence" the score is the probability, and both rules are exactly Fast-dLLM's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rollout.sampler import select_transfer


def _eligible(score: Tensor) -> Tensor:
    return score > float("-inf")  # (B, T)


def _top(score: Tensor, n: Tensor) -> Tensor:
    """The n (B,) best eligible positions of each row by `score`, as (B, T) bool."""
    return select_transfer(score, n) & _eligible(score)


def _best(score: Tensor) -> Tensor:
    return _top(score, torch.ones(score.shape[0], dtype=torch.long, device=score.device))


def commit_scheduled(score: Tensor, num_transfer_tokens: Tensor) -> Tensor:
    """The reference decision: the `num_transfer_tokens` (B,) best eligible positions by score."""
    return _top(score, num_transfer_tokens)


def commit_threshold(score: Tensor, prob: Tensor, threshold: float) -> Tensor:
    """Every eligible position with probability > threshold, and at least each row's best by score."""
    return ((prob > threshold) & _eligible(score)) | _best(score)


def commit_factor(score: Tensor, prob: Tensor, factor: float) -> Tensor:
    """The n most probable eligible positions with (n + 1)(1 - p_(n)) <= factor, and the best by score."""
    prob = prob.masked_fill(~_eligible(score), float("-inf"))  # (B, T)
    ranked = prob.sort(dim=-1, descending=True).values  # (B, T), -inf last
    n = torch.arange(1, prob.shape[-1] + 1, device=prob.device, dtype=ranked.dtype)  # (T,)
    ok = ((n + 1) * (1 - ranked) <= factor) & (ranked > float("-inf"))  # (B, T)
    count = ok.long().cumprod(dim=-1).sum(dim=-1)  # (B,) the longest good prefix
    return _top(prob, count) | _best(score)
