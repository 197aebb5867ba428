"""Block-diffusion attention on the global block grid: the masks SDAR / TraDo and LLaDA2.x use.

Pure functions of a padding mask and a block size. Block ids live on the **global grid**: token k
of the unpadded prompt + response (k from 0) is in block floor(k / B), so the last partial prompt
block is denoised together with the first response tokens (SDAR `generate.py` and its SFT,
JetEngine, LLaDA2 `generate`, dFactory and DARE all use it; ../reference/block-diffusion.md §2).
With left padding, k is the position id counted from each row's first real token
(`dlrl.models.padding.padding_positions`), so a padded row sees exactly what the row alone sees.

Two masks, both 4-D booleans (B, 1, q, k) with True = may attend, the convention of
`dlrl.models.forward`:

* `block_causal_mask` — decoding and scoring one sequence: bidirectional inside a block, causal
  across blocks (query block >= key block).
* `bd3_mask` — the BD3-LM training layout [x_t ; x_0] (2T tokens, the same position ids in both
  halves), LLaDA2.0 report Eq. 3 / SDAR `block_diff_mask`: the union of
  M_BD (noisy -> noisy, same block), M_OBC (noisy -> clean, strictly earlier block) and
  M_BC (clean -> clean, same or earlier block); clean queries never see the noisy half.

Padded keys are never attended. A padded query sits at position 0 (block 0) and so still sees the
row's first real token: an all-False row would give NaN in some SDPA kernels.
"""

from __future__ import annotations

import torch

from dlrl.models.padding import padding_positions


def grid_blocks(attention_mask: torch.Tensor | None, length: int, block_size: int,
                device: torch.device | None = None) -> torch.Tensor:
    """(B, T) block id of every position on the global grid (pads: block 0). attention_mask (B, T)
    1/0 or None (no padding: one row of positions 0..T-1, broadcast as (1, T))."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if attention_mask is None:
        return (torch.arange(length, device=device) // block_size)[None]
    if attention_mask.shape[-1] != length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, not {length}")
    return padding_positions(attention_mask) // block_size


def _keys(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B or 1, 1, 1, T) bool: which keys are real tokens."""
    if attention_mask is None:
        return torch.ones_like(like, dtype=torch.bool)[:, None, None, :]
    return attention_mask.bool()[:, None, None, :]


def block_causal_mask(attention_mask: torch.Tensor | None, length: int, block_size: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: query i may attend key j iff j is real and block(j) <= block(i)."""
    blocks = grid_blocks(attention_mask, length, block_size, device)
    allowed = blocks[:, None, None, :] <= blocks[:, None, :, None]
    return allowed & _keys(attention_mask, blocks)


def bd3_mask(attention_mask: torch.Tensor | None, length: int, block_size: int,
             device: torch.device | None = None, noisy_from: int = 0, clean_to: int | None = None) -> torch.Tensor:
    """(B, 1, N + C, N + C) bool for the input [x_t ; x_0] of two length-T halves with shared positions.

    Rows/columns 0..N-1 are the noisy half's columns noisy_from..T-1, the next C the clean half's
    columns 0..clean_to-1 (the whole layout, 2T, by default; `dlrl.block_elbo` crops the columns no
    scored query depends on): noisy->noisy iff same block (M_BD), noisy->clean iff key block < query
    block (M_OBC), clean->clean iff key block <= query block (M_BC), clean->noisy never.
    """
    blocks = grid_blocks(attention_mask, length, block_size, device)
    keys = _keys(attention_mask, blocks)
    clean_to = length if clean_to is None else clean_to
    noisy, clean = blocks[:, noisy_from:], blocks[:, :clean_to]
    noisy_keys, clean_keys = keys[..., noisy_from:], keys[..., :clean_to]
    noisy_noisy = (noisy[:, None, :, None] == noisy[:, None, None, :]) & noisy_keys
    noisy_clean = (clean[:, None, None, :] < noisy[:, None, :, None]) & clean_keys
    clean_clean = (clean[:, None, None, :] <= clean[:, None, :, None]) & clean_keys
    clean_noisy = torch.zeros(clean_clean.shape[:-1] + (noisy.shape[-1],), dtype=torch.bool, device=blocks.device)
    top = torch.cat([noisy_noisy, noisy_clean], dim=-1)
    bottom = torch.cat([clean_noisy, clean_clean], dim=-1)
    return torch.cat([top, bottom], dim=-2)


__all__ = ["bd3_mask", "block_causal_mask", "grid_blocks"]
