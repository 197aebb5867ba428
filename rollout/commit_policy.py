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
* `commit_factor`: Fast-dLLM's factor-based strategy as their code publishes it
  (`get_transfer_index_dynamic` in NVlabs/Fast-dLLM `llada/generate.py`, restated from revision
  f6b35ec3f1b16e1b3d3357938046559ae2d350fa): rank the N masked positions of the block by
  probability, p_(1) >= p_(2) >= ...; commit the n most probable, n the largest with
  (n + 1)(1 - p_(n)) <= f (the more tokens committed at once, the more confident the least of
  them must be; the left side only grows with n, so this is the longest passing prefix), and at
  least one (the published loop exempts the most probable from the rule). One more rule, which the
  paper does not state and the published loop does: when that n is N - 1 — every position but the
  lowest-ranked passes, or N = 2 and only the exempt one does — the lowest-ranked one is committed
  too and the block finishes this step. dlrl keeps that rule so that `factor` decodes as published
  (tests/test_cached_engine.py restates the published loop and compares).

How dlrl still departs from the published code, and why:

* Under "random" remasking the published code judges the threshold and the factor rule by the
  random score; dlrl judges them by the model's probability (Theorem 1 is about it) and uses the
  score only for the one position a step must commit. Under "low_confidence" the score is the
  probability and the decisions are the same.
* Probabilities are the float32 softmax that rollout.sampler.predict_x0 computes (the published
  code: float64), and a threshold keeps p > tau (the published: p >= tau). Both can only matter
  at a probability equal to tau, or within float32 rounding of it.
* Ties in probability are broken by position (a stable sort), the published code by torch.topk.
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
    """The n >= 1 most probable eligible positions with (n + 1)(1 - p_(n)) <= factor — all N of
    them when n >= N - 1, as Fast-dLLM's code does (module docstring) — and the best by score."""
    eligible = _eligible(score)  # (B, T)
    prob = prob.masked_fill(~eligible, float("-inf"))  # (B, T)
    ranked = prob.sort(dim=-1, descending=True).values  # (B, T), -inf last
    n = torch.arange(1, prob.shape[-1] + 1, device=prob.device, dtype=ranked.dtype)  # (T,)
    ok = ((n + 1) * (1 - ranked) <= factor) & (ranked > float("-inf"))  # (B, T)
    count = ok.long().cumprod(dim=-1).sum(dim=-1).clamp(min=1)  # (B,) the longest good prefix, >= 1
    masked = eligible.sum(dim=-1)  # (B,) N
    count = torch.where(count >= masked - 1, masked, count)  # all but the last pass: all N
    return _top(prob, count) | _best(score)
