"""Policy-gradient losses for masked diffusion LMs: BGPO, the naive ELBO ratio, diffu-GRPO.

Pure functions: tensors and numbers in, a scalar loss out. Advantages are per completion
(dlrl.batch.group_advantages); each objective's use of its loss is in learner/objectives/.
Notation of BGPO (arXiv 2510.11683, Sec. 3): for MC sample j of completion i, with the SAME mask
under both policies, d_ij = l_theta^(j) - l_old^(j) (ELBO terms, `dlrl.diffusion.elbo_term`).

    ELBO objective   R_i   = exp((1/n_t) sum_j d_ij) * A_i                         (Eq. 6)
    BGPO bound       g_ij  = (1 + d_ij) * A_i / n_t   if A_i >= 0   (e^x >= 1 + x)  (Eq. 8)
                     g_ij  = exp(d_ij) * A_i / n_t    if A_i <  0   (Jensen)
                     sum_j g_ij <= R_i, with equality of value and gradient at d = 0.

The bound is linear in j, so the learner back-propagates each MC sample on its own and its
memory does not grow with n_t; `naive_elbo_ratio_loss` needs all n_t graphs at once and is kept
as the memory baseline ("VRPO-OL" in the paper).
"""

from __future__ import annotations

import torch


def bgpo_ratio(d: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The per-sample surrogate ratio: 1 + d where A >= 0, exp(d) where A < 0.

    (1 + d) is used directly; going through log(1 + d) would be NaN for d <= -1.
    """
    return torch.where(advantages >= 0, 1.0 + d, torch.exp(d))


def bgpo_loss(
    elbo: torch.Tensor,
    elbo_old: torch.Tensor,
    advantages: torch.Tensor,
    n_mc: int,
    clip_eps: float | None = None,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """BGPO loss of ONE MC sample j: -mean_i g_ij (Eq. 8), a scalar.

    elbo (B,), elbo_old (B,) (no grad), advantages (B,). Summed over the n_mc samples this is
    -mean_i R_lb(i). With clip_eps the ratio is PPO-clipped to [1 - eps, 1 + eps] (the loss is the
    max of the unclipped and clipped losses); with dual_clip = c, the loss of a sample with A < 0
    is capped at -c * A (before the 1/n_mc factor), as in the reference implementation. On-policy
    (d = 0) neither clip changes value or gradient.
    """
    d = elbo - elbo_old.detach()
    ratio = bgpo_ratio(d, advantages)
    per_seq = -ratio * advantages
    if clip_eps is not None:
        clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
        per_seq = torch.maximum(per_seq, clipped)
    if dual_clip is not None:
        capped = torch.minimum(per_seq, -dual_clip * advantages)
        per_seq = torch.where(advantages < 0, capped, per_seq)
    return per_seq.mean() / n_mc


def naive_elbo_ratio_loss(
    elbo: torch.Tensor, elbo_old: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """The ELBO-ratio objective -mean_i exp(mean_j d_ij) A_i (Eq. 6), a scalar.

    elbo, elbo_old: (B, n_mc). Every one of the n_mc terms must be alive in the graph: memory
    grows linearly with n_mc. This is the baseline BGPO is measured against.
    """
    d = (elbo - elbo_old.detach()).mean(-1)
    return -(torch.exp(d) * advantages).mean()


def diffu_grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> torch.Tensor:
    """diffu-GRPO (d1, arXiv 2504.12216, Eq. 4): token-level clipped ratio on one-step log-probs.

    logp, logp_old: (B, L) per-token log-probabilities from `one_step_input` forwards;
    valid: (B, L) bool, tokens that count (the response up to and including its first EOS).
    Per sequence the clipped surrogate is averaged over its valid tokens, then over sequences.
    clip_eps None: no clip, the surrogate is ratio * A (as in `bgpo_loss`).
    """
    ratio = torch.exp(logp - logp_old.detach())
    adv = advantages.unsqueeze(-1)
    surrogate = ratio * adv
    if clip_eps is not None:
        surrogate = torch.minimum(surrogate, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    valid = valid.to(surrogate.dtype)
    per_seq = (surrogate * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)
    return -per_seq.mean()
