"""Masked-diffusion supervised fine-tuning loss (LLaDA's SFT objective).

Used to build the tiny starting checkpoints of the embedded default job. For each row a time
t ~ U(0, 1) is drawn, every response token is masked with probability t, and the loss is the
negative per-token ELBO term (1/t) * sum_masked log p(y_i | y_t, x) / L (LLaDA, Eq. 5 with the
prompt kept clean), i.e. `-dlrl.diffusion.elbo_term(..., normalize="token")`.
"""

from __future__ import annotations

import torch

from dlrl import diffusion
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
    response = tokens[:, prompt_len:]  # (B, L)
    b, length = response.shape
    t = torch.rand(b, generator=generator).clamp(min=1e-3).to(tokens.device)  # (B,)
    mask = torch.rand(b, length, generator=generator).to(tokens.device) < t[:, None]  # (B, L)
    noisy = diffusion.apply_mask(response, mask, mask_id)
    inputs = torch.cat([tokens[:, :prompt_len], noisy], dim=-1)
    logits = diffusion_logits(model, inputs, attention)[:, prompt_len:]
    return -diffusion.elbo_term(logits, response, mask, 1.0 / t, "token").mean()
