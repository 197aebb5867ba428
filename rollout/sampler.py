"""Masked-diffusion sampling: LLaDA's semi-autoregressive block remasking sampler.

The reference sampler of the project (`engine = "reference"`, reached through
rollout/engines/reference.py; the cached engine reuses its pieces and is tested against it). It
restates the reference `generate` of ML-GSAI/LLaDA (`generate.py`,
Algorithm 5 of Nie et al. 2025, "Large Language Diffusion Models"):

* the response is initialised to `gen_length` copies of `mask_id`;
* it is split into `gen_length // block_length` blocks, decoded left to right;
* inside a block, `steps // num_blocks` steps each unmask `num_transfer_tokens` tokens — the
  block's masked count shared equally over the steps;
* at each step the model predicts every position at once (Gumbel-max with `temperature`,
  argmax at 0), and only the `num_transfer_tokens` most confident masked positions of the
  current block keep their prediction ("low_confidence" remasking: confidence = softmax
  probability of the chosen token; "random" remasking: uniform random scores); all others stay
  masked.

Differences from the reference, all deliberate:

* Batches of prompts of different lengths are left-padded by the caller and described by a
  (B, P) `attention_mask`. Padded positions are never masked, never unmasked and never attended,
  and classifier-free guidance masks only the real prompt tokens, so a padded row decodes exactly
  as the same prompt alone. (The reference derives the prompt from `x != mask_id`, which would
  count padding as prompt.)
* The prediction x0 is never `mask_id` (see `predict_x0`), so every response token is unmasked
  exactly once, in its own block, even with an untrained model.
* Randomness comes from an optional `torch.Generator`, so sampling is reproducible.
* Uniform noise is clamped away from 0 and the logits are shifted by their row maximum before
  `exp`, so the Gumbel ratio never overflows; the argmax is that of the reference form.
* `generate_with_steps` also returns the step at which each response token was unmasked (the
  decoding order), which trajectory-aware objectives and diagnostics need.

Seam for the fast path (Fast-dLLM: block prefix/dual KV cache, confidence-threshold parallel
unmasking): the loop in `generate_with_steps` only composes pure pieces — `guided_logits` (the
one forward, with optional CFG), `predict_x0` (Gumbel-max and confidence) and `select_transfer`
(which positions to commit this step). rollout/engines/cached.py writes its own block loop that
replaces `guided_logits` with a forward of the current block against cached keys/values of the
rest, and rollout/commit_policy.py adds threshold and factor variants of `select_transfer`;
`num_transfer_tokens`, `add_gumbel_noise` and `predict_x0` are shared unchanged.

Run the tests with `pytest tests/test_sampler.py -q`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlrl.models.forward import diffusion_logits

REMASKING = ("low_confidence", "random")


@dataclass
class Sample:
    """Output of `generate_with_steps`.

    tokens: (B, P + L) prompt (as given, padding included) followed by the generated response.
    unmask_step: (B, L) int64, the global step index (0..steps-1, counted across blocks) at which
        each response token was unmasked.
    """

    tokens: Tensor
    unmask_step: Tensor


def num_transfer_tokens(mask_index: Tensor, steps: int) -> Tensor:
    """How many tokens each step unmasks: (B, L) bool -> (B, steps) int64.

    The masked count of each row is shared equally over the steps, the first `count % steps`
    steps taking one extra token — LLaDA's linear noise schedule makes the expected number of
    tokens unmasked per step constant, and this is its deterministic version.
    """
    count = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, remainder = count // steps, count % steps  # (B, 1)
    step = torch.arange(steps, device=mask_index.device)  # (steps,)
    return base + (step[None, :] < remainder).long()  # (B, steps)


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Scores whose argmax is a sample from softmax(logits / temperature); same shape as logits.

    The reference's form: exp(logits) / (-log u)^temperature, u ~ U(0, 1), in float64 because
    low-precision Gumbel-max is measurably biased (LLaDA reports worse generations in bf16).
    Two guards that leave the argmax unchanged: u is clamped away from 0 (no inf from log 0),
    and logits are shifted by their maximum over the vocabulary before exp (no overflow).
    Temperature 0 returns the logits themselves: plain argmax.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    u = u.clamp(min=torch.finfo(torch.float64).eps)
    gumbel_noise = (-torch.log(u)) ** temperature
    return (logits - logits.amax(dim=-1, keepdim=True)).exp() / gumbel_noise


def predict_x0(
    logits: Tensor,
    *,
    mask_id: int,
    temperature: float,
    remasking: str,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One-step prediction of the clean sequence and a confidence for each position.

    logits: (B, T, V). Returns x0 (B, T) int64 and confidence (B, T) float32: the softmax
    probability of x0 under the (unnoised) logits for "low_confidence", a uniform random score for
    "random". The confidence decides which predictions are kept this step; low-confidence ones are
    remasked and predicted again later with more context.

    x0 is never `mask_id`: the clean-data distribution has no mask tokens (a trained MDM puts
    ~0 mass there, so this changes nothing for it), and "unmasking" a position to mask_id would
    leave it masked after its block and break the one-step-per-token accounting. The reference
    allows it; an untrained model does predict it.
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    candidates = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    x0 = add_gumbel_noise(candidates, temperature, generator).argmax(dim=-1)  # (B, T)
    if remasking == "low_confidence":
        p = F.softmax(logits.float(), dim=-1)  # (B, T, V)
        confidence = p.gather(-1, x0[..., None]).squeeze(-1)  # (B, T)
    else:
        confidence = torch.rand(x0.shape, generator=generator, device=x0.device)  # (B, T)
    return x0, confidence


def select_transfer(confidence: Tensor, num_transfer_tokens: Tensor) -> Tensor:
    """Which positions to unmask this step: the k most confident per row.

    confidence: (B, T), -inf where a position may not be unmasked (not masked, or outside the
    current block). num_transfer_tokens: (B,) the k of each row. Returns (B, T) bool.
    This is the decision a Fast-dLLM threshold policy ("every position above tau, at least one")
    replaces.
    """
    order = confidence.argsort(dim=-1, descending=True, stable=True)  # (B, T)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < num_transfer_tokens[:, None]  # (B, T)


def guided_logits(
    model: torch.nn.Module,
    x: Tensor,
    attention_mask: Tensor | None,
    prompt_index: Tensor,
    *,
    cfg_scale: float,
    mask_id: int,
) -> Tensor:
    """Logits (B, T, V) of the current partly-masked sequence, with optional CFG.

    x: (B, T) tokens; attention_mask: (B, T) 1/0 padding mask or None; prompt_index: (B, T) bool,
    True at real (unpadded) prompt tokens. With cfg_scale > 0 the unconditional pass masks the
    prompt and logits = un + (cfg_scale + 1) (cond - un) (LLaDA's classifier-free guidance).
    This is the only place the sampler runs the model; a block-KV-cached engine replaces it.
    """
    if cfg_scale <= 0:
        return diffusion_logits(model, x, attention_mask)
    un_x = x.masked_fill(prompt_index, mask_id)  # (B, T)
    both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    cond, un = diffusion_logits(model, torch.cat([x, un_x]), both_mask).chunk(2)  # (B, T, V) each
    return un + (cfg_scale + 1) * (cond - un)


@torch.no_grad()
def generate_with_steps(
    model: torch.nn.Module,
    prompt: Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    attention_mask: Tensor | None = None,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Sample:
    """Decode `gen_length` tokens after each (left-padded) prompt; return tokens and unmask steps.

    prompt: (B, P); attention_mask: (B, P), 0 at left padding, or None for no padding.
    gen_length must be a multiple of block_length and steps of the number of blocks: checked once,
    by dlrl.decoding.Decoding, before an engine calls this.
    Runs under no_grad, not inference_mode, so the learner may feed the tokens to autograd.
    """
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks

    b, p = prompt.shape
    device = prompt.device
    x = torch.cat([prompt, prompt.new_full((b, gen_length), mask_id)], dim=1)  # (B, P + L)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)  # (B, P + L)
    if attention_mask is None:
        prompt_index[:, :p] = True
    else:
        attention_mask = attention_mask.to(device)
        prompt_index[:, :p] = attention_mask.bool()
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, gen_length)], dim=1)
    unmask_step = torch.full((b, gen_length), -1, dtype=torch.long, device=device)  # (B, L)
    position = torch.arange(p + gen_length, device=device)  # (P + L,)

    for block in range(num_blocks):
        start, end = p + block * block_length, p + (block + 1) * block_length
        in_block = (position >= start) & (position < end)  # (P + L,)
        k = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)  # (B, steps_per_block)
        for i in range(steps_per_block):
            # Only masked response positions of the current block may be unmasked; the prompt
            # (and its padding) is never touched even if a caller pads with mask_id.
            mask_index = (x == mask_id) & in_block  # (B, P + L)
            logits = guided_logits(
                model, x, attention_mask, prompt_index, cfg_scale=cfg_scale, mask_id=mask_id
            )  # (B, P + L, V)
            x0, confidence = predict_x0(
                logits, mask_id=mask_id, temperature=temperature, remasking=remasking, generator=generator
            )
            confidence = confidence.masked_fill(~mask_index, float("-inf"))  # (B, P + L)
            transfer = select_transfer(confidence, k[:, i]) & mask_index  # (B, P + L)
            x = torch.where(transfer, x0, x)
            unmask_step.masked_fill_(transfer[:, p:], block * steps_per_block + i)
    return Sample(tokens=x, unmask_step=unmask_step)


def generate(
    model: torch.nn.Module,
    prompt: Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    attention_mask: Tensor | None = None,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Prompt followed by the decoded response: (B, P + gen_length). See `generate_with_steps`."""
    return generate_with_steps(
        model,
        prompt,
        steps=steps,
        gen_length=gen_length,
        block_length=block_length,
        temperature=temperature,
        remasking=remasking,
        mask_id=mask_id,
        attention_mask=attention_mask,
        cfg_scale=cfg_scale,
        generator=generator,
    ).tokens
