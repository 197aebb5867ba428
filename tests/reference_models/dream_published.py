"""Test-only restatement of the published Dream forward (not used by the package).

Restated (not copied) from Dream-org/Dream-v0-Instruct-7B `modeling_dream.py` (Qwen2-derived,
transformers 4.46 era); structure checked against public copies of that file found through the
code index (`DreamAttention`, `DreamDecoderLayer`, `DreamBaseModel`, `DreamModel`) and the
`generation_utils.py` that shifts logits. What matters:

- Qwen2 layout: input_layernorm -> self_attn (q/k/v with bias, o_proj without) -> residual ->
  post_attention_layernorm -> mlp down(silu(gate) · up) -> residual; final norm; lm_head.
- RoPE from `position_ids`: inv_freq = 1/theta^(2j/D), emb = cat(freqs, freqs), q·cos +
  rotate_half(q)·sin (halves); rope_theta from the config (1e6 for Dream 7B).
- Attention non-causal (`is_causal = False`), SDPA with the given 4-D mask; repeat_kv for GQA.
- The model returns raw logits; generation uses cat([logits[:, :1], logits[:, :-1]], 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Qwen2RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(h, n_rep):
    b, kv, s, d = h.shape
    if n_rep == 1:
        return h
    return h[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class PublishedDreamAttention(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.c = c
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(c.num_attention_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, mask, cos, sin):
        c = self.c
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.num_attention_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
        n_rep = c.num_attention_heads // c.num_key_value_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class PublishedDreamMLP(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PublishedDreamDecoderLayer(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.self_attn = PublishedDreamAttention(c)
        self.mlp = PublishedDreamMLP(c)
        self.input_layernorm = Qwen2RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, mask, cos, sin):
        residual = x
        x = residual + self.self_attn(self.input_layernorm(x), mask, cos, sin)
        residual = x
        return residual + self.mlp(self.post_attention_layernorm(x))


class PublishedDreamBaseModel(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(PublishedDreamDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = Qwen2RMSNorm(c.hidden_size, c.rms_norm_eps)


class PublishedDreamModel(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.c = c
        self.model = PublishedDreamBaseModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        c = self.c
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t).expand(b, t)
        head_dim = c.hidden_size // c.num_attention_heads
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = (inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, attention_mask, cos, sin)
        return self.lm_head(self.model.norm(x))  # raw: logits[:, i] predicts token i + 1


def published_shift(logits):
    """Dream's generation_utils alignment of raw logits."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
