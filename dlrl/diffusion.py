"""Masked-diffusion math: the forward (masking) process, ELBO terms and Monte-Carlo mask samplers.

Pure functions over tensors and numbers (no model, no config, no I/O). Notation follows LLaDA
and BGPO (arXiv 2510.11683, Sec. 2): a response y of length L, mask token `mask_id`; the forward
process at time t replaces each response token by the mask independently with probability t
(the prompt is never masked). One Monte-Carlo term of the ELBO on log pi(y|x) is

    continuous form:  l(t, y_t) = (1/t)   * sum_i 1[y_t^i = M] log p(y^i | y_t, x)      (Eq. 3)
    discrete form:    l(k, y_k) = (L/k)   * sum_i 1[y_k^i = M] log p(y^i | y_k, x)
                      (exactly k of L positions masked, k uniform on 1..L)
    bernoulli form:   l(t, y_p) = (1/p)   * sum_i 1[y_p^i = M] log p(y^i | y_p, x),  p = (1 - 1e-3) t + 1e-3
                      (SDAR's training noise: every token masked iid with probability p, >= 1 mask)

and B = (1/n_t) sum_j l_j estimates a lower bound on log pi(y|x). Dividing l by L
(``normalize="token"``) turns it into a mean per-token log-likelihood, which keeps the BGPO
ratios of long responses in a sane range; ``"sequence"`` keeps the raw bound.

Masks are a pure function of (group seed, completion index, MC index): the old-policy and the
current-policy ELBO passes must score the *same* masked sequences, otherwise d_j != 0 on-policy
and BGPO's equivalence with the ELBO objective is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MaskScheme = Literal["iid", "stratified", "antithetic"]
TimeForm = Literal["discrete", "continuous", "bernoulli"]
Normalize = Literal["token", "sequence"]

_MASK64 = (1 << 64) - 1

BERNOULLI_EPS = 1e-3
"""SDAR's floor on the mask probability, p = (1 - eps) t + eps (JetAstra/SDAR@c2041a8:
training/model/SDAR-4B-Chat/modeling_sdar.py, `forward_add_noise_packed`, 155-283)."""
BERNOULLI_TRIES = 10
"""Draws at one p before a mask with no masked token is forced to mask one (SDAR's max_tries)."""


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64 rounds); stable across processes."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


@dataclass(frozen=True)
class MCMasks:
    """The n_mc masks of one completion.

    mask:   (n_mc, L) bool, True where the response token is replaced by mask_id
    weight: (n_mc,) float64, the importance weight 1/t (continuous) or L/k (discrete)
    """

    mask: torch.Tensor
    weight: torch.Tensor


def mc_masks(
    seed: int,
    index: int,
    n_mc: int,
    length: int,
    scheme: MaskScheme = "stratified",
    form: TimeForm = "discrete",
) -> MCMasks:
    """Masks for MC samples j = 0..n_mc-1 of completion `index` in a group seeded by `seed`.

    - "iid": each sample draws its own t (or k) uniformly.
    - "stratified" (default): t_j = (j + u)/n_mc (k_j = 1 + floor((j + u) L / n_mc)) with one
      random offset u, so the n_mc samples cover the noise range evenly (lower variance).
    - "antithetic": samples come in complementary pairs: the second masks exactly the
      positions the first kept (t, 1 - t), so every token is scored once per pair
      (coupled sampling as in VRPO / coupled-GRPO). An odd last sample is drawn iid.
    Positions are uniformly random given the count (discrete) or Bernoulli(t) (continuous).
    "bernoulli" (the default of block-diffusion families, dlrl.batch.time_form_for) is SDAR's SFT
    noise: p = (1 - 1e-3) t + 1e-3 from the level t, every token masked iid with probability p,
    weight 1/p. SDAR redraws t and the positions up to 10 times when nothing is masked, then forces
    one random position; here the positions are redrawn at the same p (so stratified levels stay
    stratified) and then one is forced, so every sample scores >= 1 token. An antithetic pair's
    complement (Bernoulli(1 - p), weight 1/(1 - p)) keeps >= 1 mask by unmasking one position of a
    first mask that covers everything.
    Sample j of a given (seed, index) never depends on anything but (seed, index, scheme, form,
    n_mc, length), so any process can rebuild it.
    """
    if length < 1 or n_mc < 1:
        raise ValueError(f"need length >= 1 and n_mc >= 1, got length={length}, n_mc={n_mc}")
    gen = torch.Generator().manual_seed(mix_seed(seed, index))
    u = torch.rand((), generator=gen, dtype=torch.float64).item()
    masks: list[torch.Tensor] = []
    weights: list[float] = []

    def draw(level: float) -> tuple[torch.Tensor, float]:
        """One mask at noise level `level` in (0, 1]."""
        if form == "discrete":
            k = min(max(1 + int(level * length), 1), length)
            perm = torch.randperm(length, generator=gen)
            m = torch.zeros(length, dtype=torch.bool)
            m[perm[:k]] = True
            return m, length / k
        if form == "bernoulli":
            p = (1.0 - BERNOULLI_EPS) * level + BERNOULLI_EPS
            for _ in range(BERNOULLI_TRIES):
                m = torch.rand(length, generator=gen, dtype=torch.float64) < p
                if m.any():
                    break
            else:
                m[torch.randint(length, (1,), generator=gen)] = True
            return m, 1.0 / p
        t = max(level, 1e-3)  # t -> 0 would give an unbounded weight 1/t
        m = torch.rand(length, generator=gen, dtype=torch.float64) < t
        return m, 1.0 / t

    j = 0
    while j < n_mc:
        if scheme == "stratified":
            level = (j + u) / n_mc
        else:
            level = torch.rand((), generator=gen, dtype=torch.float64).item()
        if scheme == "antithetic" and j + 1 < n_mc and length >= 2:
            m, w = draw(level)
            if form == "discrete" and int(m.sum()) == length:  # complement must mask >= 1 token
                m[torch.randint(length, (1,), generator=gen)] = False
                w = length / (length - 1)
            elif form == "bernoulli" and bool(m.all()):  # as discrete; the weight stays 1/p
                m[torch.randint(length, (1,), generator=gen)] = False
            c = ~m
            k_c = int(c.sum())
            w_c = length / k_c if form == "discrete" else 1.0 / max(1.0 - (1.0 / w), 1e-3)
            masks += [m, c]
            weights += [w, w_c]
            j += 2
            continue
        m, w = draw(level)
        masks.append(m)
        weights.append(w)
        j += 1
    return MCMasks(torch.stack(masks), torch.tensor(weights, dtype=torch.float64))


def apply_mask(response: torch.Tensor, mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Forward process q(y_t | y): response tokens (..., L) with masked positions set to mask_id."""
    return torch.where(mask, torch.full_like(response, mask_id), response)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits (..., L, V), targets (..., L) -> (..., L), in float32+.

    Computed as gathered logit minus logsumexp, which avoids materialising a full log-softmax.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def elbo_term(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    normalize: Normalize = "token",
) -> torch.Tensor:
    """One MC term l_j of the ELBO per sequence (Eq. 3), shape (B,).

    logits:  (B, L, V) model outputs at the response positions of the masked input
    targets: (B, L)    clean response tokens y
    mask:    (B, L)    bool, positions that were masked in the input
    weight:  (B,)      1/t or L/k of each row's mask
    Only masked positions are scored, so the (B, L, V) log-softmax is never materialised.
    """
    return masked_elbo_term(token_logprobs(logits[mask], targets[mask]), mask, weight, normalize)


def masked_elbo_term(
    logp_masked: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, normalize: Normalize = "token",
) -> torch.Tensor:
    """`elbo_term` from the log-probs of the masked positions alone, shape (B,).

    logp_masked: (K,) log p(y^i | y_t, x) of the K = mask.sum() masked positions, in the order of
                 `mask`'s True entries (row-major), float32 or wider; the learner computes only
                 these (dlrl.models.output_head)
    mask:        (B, L) bool; weight: (B,) as in `elbo_term`
    """
    if normalize not in ("token", "sequence"):
        raise ValueError(f"normalize must be 'token' or 'sequence', got {normalize!r}")
    logp = logp_masked.new_zeros(mask.shape).masked_scatter(mask, logp_masked)  # (B, L)
    term = logp.sum(-1) * weight.to(logp.dtype)
    if normalize == "token":
        term = term / mask.shape[-1]
    return term


def one_step_input(
    prompt: torch.Tensor,
    prompt_valid: torch.Tensor,
    response: torch.Tensor,
    mask_id: int,
    p_mask_prompt: float,
    prompt_noise: torch.Tensor,
) -> torch.Tensor:
    """d1's one-step input for diffu-GRPO (arXiv 2504.12216, Sec. 3.2).

    The whole response is masked and each real prompt token is masked with probability
    p_mask_prompt (a fresh random prompt mask per update acts as regularisation); one forward of
    this input gives a mean-field estimate of every response token's log-probability.
    prompt (B, P), prompt_valid (B, P) bool (False on padding), response (B, L),
    prompt_noise (B, P) uniform in [0, 1) -> (B, P + L).
    """
    hide = (prompt_noise < p_mask_prompt) & prompt_valid
    noisy_prompt = torch.where(hide, torch.full_like(prompt, mask_id), prompt)
    return torch.cat([noisy_prompt, torch.full_like(response, mask_id)], dim=-1)


def first_eos_valid(response: torch.Tensor, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """(B, L) bool: True up to and including each row's first EOS (all True if none)."""
    is_eos = torch.zeros_like(response, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response == e
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~seen_before
