"""Test-only restatement of the published LLaDA forward (not used by the package).

Restated (not copied) from GSAI-ML/LLaDA-8B-Instruct `modeling_llada.py`, the batch-inference
revision of October 2025 that passes the attention bias to SDPA; structure checked against the
public copy in YoungNoOne/dLLMs@a40e1eb7fa2689442fca19943f5deb034b6b4341 (`modeling_llada.py`):
`LLaDALlamaBlock`, `RotaryEmbedding`, `RMSLayerNorm`, `LLaDAModel.forward`. What matters:

- RoPE: a (1, 1, T, D) sin/cos table of positions 0..T-1 built as cat(freqs, freqs), applied as
  t·cos + rotate_half(t)·sin with rotate_half splitting the head in two halves; in float32
  (`rope_full_precision`); no position ids: every row uses positions 0..T-1.
- RMSLayerNorm with eps = config.rms_norm_eps, weight after the cast back.
- Attention bias: a (B, T) mask becomes (1 - mask)[:, None, None, :] · finfo(float32).min, added
  to the scores only when some entry is 0; never causal. Keys/values repeat_interleave'd for GQA.
- Biases: q/k/v iff include_bias or include_qkv_bias; the other linears iff include_bias.
- MLP: ff_out(silu(ff_proj(x)) · up_proj(x)). Head: transformer.ff_out, or wte when weight_tying.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PublishedRMSLayerNorm(nn.Module):
    """Bias iff bias_for_layer_norm, or include_bias when that is None (LayerNormBase)."""

    def __init__(self, c) -> None:
        super().__init__()
        self.eps = c.rms_norm_eps
        self.weight = nn.Parameter(torch.ones(c.d_model))
        use_bias = c.include_bias if c.bias_for_layer_norm is None else c.bias_for_layer_norm
        self.bias = nn.Parameter(torch.zeros(c.d_model)) if use_bias else None

    def forward(self, x):
        og = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = x.to(og)
        return self.weight * x + self.bias if self.bias is not None else self.weight * x


def rotary_tables(seq_len: int, dim: int, theta: float):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = torch.einsum("i,j->ij", torch.arange(seq_len, dtype=torch.float), inv_freq)
    positions = torch.cat((freqs, freqs), dim=-1)
    return positions.sin()[None, None], positions.cos()[None, None]


def rotate_half(x):
    b, nh, t, hs = x.size()
    x1, x2 = x.view(b, nh, t, 2, hs // 2).unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


class PublishedLLaDABlock(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.c = c
        d, hd = c.d_model, c.d_model // c.n_heads
        kv = c.effective_n_kv_heads
        qkv_bias = c.include_bias | c.include_qkv_bias
        self.attn_norm = PublishedRMSLayerNorm(c)
        self.ff_norm = PublishedRMSLayerNorm(c)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=c.include_bias)
        self.ff_proj = nn.Linear(d, c.mlp_width, bias=c.include_bias)
        self.up_proj = nn.Linear(d, c.mlp_width, bias=c.include_bias)
        self.ff_out = nn.Linear(c.mlp_width, d, bias=c.include_bias)

    def attention(self, q, k, v, attention_bias):
        c = self.c
        b, t, C = q.size()
        q = q.view(b, t, c.n_heads, C // c.n_heads).transpose(1, 2)
        k = k.view(b, t, c.effective_n_kv_heads, C // c.n_heads).transpose(1, 2)
        v = v.view(b, t, c.effective_n_kv_heads, C // c.n_heads).transpose(1, 2)
        q_, k_ = q.float(), k.float()
        sin, cos = rotary_tables(k_.shape[-2], C // c.n_heads, c.rope_theta)
        q_ = (q_ * cos[:, :, -t:]) + rotate_half(q_) * sin[:, :, -t:]
        k_ = (k_ * cos) + rotate_half(k_) * sin
        q, k = q_.type_as(q), k_.type_as(k)
        if attention_bias is not None:
            attention_bias = attention_bias[:, :, :t, :t].to(q.dtype)
        if k.size(1) != q.size(1):
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, is_causal=False)
        return self.attn_out(att.transpose(1, 2).contiguous().view(b, t, C))

    def forward(self, x, attention_bias):
        x_normed = self.attn_norm(x)
        att = self.attention(self.q_proj(x_normed), self.k_proj(x_normed), self.v_proj(x_normed), attention_bias)
        x = x + att
        og_x = x
        x = self.ff_norm(x)
        x, x_up = self.ff_proj(x), self.up_proj(x)
        x = F.silu(x) * x_up
        return og_x + self.ff_out(x)


class PublishedLLaDAModel(nn.Module):
    """Holds `transformer` exactly as the published LLaDAModel does."""

    def __init__(self, c) -> None:
        super().__init__()
        mods = dict(
            wte=nn.Embedding(c.embedding_size or c.vocab_size, c.d_model),
            blocks=nn.ModuleList(PublishedLLaDABlock(c) for _ in range(c.n_layers)),
            ln_f=PublishedRMSLayerNorm(c),
        )
        if not c.weight_tying:
            mods["ff_out"] = nn.Linear(c.d_model, c.embedding_size or c.vocab_size, bias=c.include_bias)
        self.transformer = nn.ModuleDict(mods)


class PublishedLLaDAModelLM(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.c = c
        self.model = PublishedLLaDAModel(c)

    def forward(self, input_ids, attention_mask=None):
        c, t = self.c, self.model.transformer
        b = input_ids.shape[0]
        x = t.wte(input_ids)
        bias = None
        if attention_mask is not None and 0.0 in attention_mask:
            m = attention_mask.to(dtype=torch.float).view(b, -1)[:, None, None, :]
            bias = (1.0 - m) * torch.finfo(m.dtype).min
        for block in t.blocks:
            x = block(x, bias)
        x = t.ln_f(x)
        logits = F.linear(x, t.wte.weight) if c.weight_tying else t.ff_out(x)
        if c.scale_logits:
            logits = logits * (1 / math.sqrt(c.d_model))
        return logits
