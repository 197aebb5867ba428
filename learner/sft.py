"""Masked-diffusion supervised fine-tuning losses, as each family was trained.

Used to build the tiny starting checkpoints of the embedded jobs (scripts/build_tiny_sudoku*.py).
`sft_loss` dispatches on the model's family:

* full-attention families (LLaDA, the built-in model): LLaDA's SFT objective. For each row a time
  t ~ U(0, 1) is drawn, every response token is masked with probability t, and the loss is the
  negative per-token ELBO term (1/t) * sum_masked log p(y_i | y_t, x) / L (LLaDA, Eq. 5 with the
  prompt kept clean), i.e. `-dlrl.diffusion.elbo_term(..., normalize="token")`.
* block-diffusion families (SDAR, `dlrl.block_elbo.block_size_of` not None): SDAR's SFT loss
  (JetAstra/SDAR@c2041a8:training/model/SDAR-4B-Chat/modeling_sdar.py, noise 155-283, loss
  1155-1185; ../shared/reference/block-diffusion.md §2): one t ~ U(0, 1) per row,
  p = (1 - 1e-3) t + 1e-3, every response token masked iid with probability p (at least one),
  the model run on the BD3-LM layout [noisy ; clean] under the block mask, and
  (1 / N_ans) * sum_masked CE / p with N_ans = every response token of the batch (EOS padding
  included, as SDAR counts block pads). The masks are `dlrl.diffusion.mc_masks`' "bernoulli" form
  and the forward is `dlrl.block_elbo.bd3_logits`, the ones BGPO's block ELBO uses, so the start
  is trained on exactly the terms RL later estimates.
"""

from __future__ import annotations

import torch

from dlrl import diffusion
from dlrl.block_elbo import bd3_logits, block_size_of
from dlrl.models.forward import diffusion_logits


def sft_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    attention: torch.Tensor,
    prompt_len: int,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """tokens (B, P + L) with left-padded prompts and the target response at columns P:."""
    block = block_size_of(model)
    if block is not None:
        return block_sft_loss(model, tokens, attention, prompt_len, mask_id, block, generator)
    response = tokens[:, prompt_len:]  # (B, L)
    b, length = response.shape
    t = torch.rand(b, generator=generator).clamp(min=1e-3).to(tokens.device)  # (B,)
    mask = torch.rand(b, length, generator=generator).to(tokens.device) < t[:, None]  # (B, L)
    noisy = diffusion.apply_mask(response, mask, mask_id)
    inputs = torch.cat([tokens[:, :prompt_len], noisy], dim=-1)
    logits = diffusion_logits(model, inputs, attention)[:, prompt_len:]
    return -diffusion.elbo_term(logits, response, mask, 1.0 / t, "token").mean()


def block_sft_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    attention: torch.Tensor,
    prompt_len: int,
    mask_id: int,
    block_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SDAR's block-diffusion SFT loss (module docstring); tokens as for `sft_loss`.

    Row i's mask is MC sample 0 of `mc_masks(seed, i, 1, L, "iid", "bernoulli")` with one seed
    drawn from `generator` per call: its own t, p and Bernoulli(p) positions, weight 1/p."""
    response = tokens[:, prompt_len:]  # (B, L)
    b, length = response.shape
    seed = int(torch.randint(1 << 62, (), generator=generator))
    draws = [diffusion.mc_masks(seed, i, 1, length, "iid", "bernoulli") for i in range(b)]
    mask = torch.cat([d.mask for d in draws]).to(tokens.device)  # (B, L)
    weight = torch.cat([d.weight for d in draws]).to(tokens.device)  # (B,) 1/p
    noisy = torch.cat([tokens[:, :prompt_len], diffusion.apply_mask(response, mask, mask_id)], dim=-1)
    logits = bd3_logits(model, noisy, tokens, attention, block_size, slice(prompt_len, tokens.shape[1]))
    return -diffusion.elbo_term(logits, response, mask, weight, "token").mean()
