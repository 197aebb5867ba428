"""The tiny block-diffusion model of the block-ELBO tests: a random SDAR-family model
(dlrl.models.tiny.build_tiny_sdar: the published Qwen3 body, block-causal, block 4) in float64."""

from __future__ import annotations

import torch

from dlrl.models.tiny import build_tiny_sdar

BLOCK = 4


def block_model(seed: int = 0):
    """(model, tokenizer): a 2-layer SDAR model with grouped-query heads, float64, and the char tokenizer."""
    model, tok = build_tiny_sdar(hidden=32, layers=2, heads=4, kv_heads=2, block_size=BLOCK, seed=seed)
    return model.to(torch.float64), tok
