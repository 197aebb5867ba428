"""Pieces shared by the native LLaDA and Dream blocks: half-split RoPE, masks, SDPA with a cache.

Both published families (modeling_llada.py, Llama-style; modeling_dream.py, Qwen2-style) rotate
the two halves of each head (`rotate_half`, GPT-NeoX layout), not interleaved channel pairs as the
built-in model does, so a checkpoint only gives its published logits with this variant. Attention
is one `F.scaled_dot_product_attention` call, non-causal, under a 4-D mask in the convention of
`dlrl.models.forward` (bool, True = may attend, or additive float), optionally through a
`dlrl.models.kv_cache.KVCache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dlrl.models.kv_cache import KVCache


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin (B, 1, T, D) for positions (B, T): angle_j = pos · theta^(-2j/D), halves repeated.

    Computed in float32 whatever the model dtype (LLaDA's `rope_full_precision`; Qwen2 likewise).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None, :, None] * inv_freq  # (B, 1, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by (cos, sin): x·cos + rotate_half(x)·sin, in float32, back to x's dtype."""
    xf = x.float()
    first, second = xf.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Partial RoPE: rotate the first r = cos.shape[-1] channels of x (B, H, T, D) as `apply_rope`
    does, pass the other D - r through (GPT-NeoX `rotary_pct`; LLaDA2.x rotates half of each head:
    `apply_rotary_pos_emb` in modeling_llada2_moe.py splits at the width of its cos)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)


def sdpa_mask(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A mask SDPA takes: (B, T) 1/0 padding -> (B, 1, 1, T) bool; 4-D bool kept; 4-D float cast.

    A 2-D padding mask masks keys only (every query, padded or not, sees every real key), as
    LLaDA's published code does with its additive (1 - mask) · finfo.min bias.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool()[:, None, None, :]
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be (B, T) or (B, 1, q, T), got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask.to(dtype)


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *,
    layer: int, kv_cache: KVCache | None, cache_start: int, dropout: float = 0.0,
) -> Tensor:
    """Non-causal SDPA of q (B, H, q, D) over k, v (B, H_kv, q, D), after the cache's update.

    With a cache, k/v of positions [cache_start, cache_start + q) are written into it and the
    queries attend to the whole cached sequence (the kv_cache contract). Grouped-query heads are
    repeated to H (both published files repeat_interleave / repeat_kv the same way).
    """
    if kv_cache is not None:
        k, v = kv_cache.update(layer, k, v, cache_start)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=False)


def default_positions(input_ids: Tensor, start: int = 0) -> Tensor:
    """(B, q) positions start .. start + q - 1 of every row."""
    b, t = input_ids.shape
    return torch.arange(start, start + t, device=input_ids.device).expand(b, t)


def keep_logits(hidden: Tensor, logits_to_keep: int | slice | Tensor) -> Tensor:
    """hidden (B, T, d) restricted to the positions whose logits are wanted (0 = all), as in HF."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]
