"""Test-only restatement of the published SDAR forward (not used by the package).

Restated (not copied) from the inference file as first published,
`yjyddq/DARE@f4999da5cf21e9e4cf69cf7d5fdbb2b02b3a940d:models/SDAR-1.7B-Chat/modeling_sdar.py`
(md5 a6bf75065c094e26ed13e64cca838c14, 866 lines; Qwen3 of transformers 4.52.4 with SDAR's
attention), and, for the BD3-LM training mask, from its training twin
`JetAstra/SDAR@c2041a8333333d685f6e15122c84f60f51f85ebd:training/model/SDAR-4B-Chat/modeling_sdar.py`
(md5 6b350956d82ebea0f550606e645eb554). What matters, with the published line numbers:

- SDARRMSNorm (74-98) calls flash-attn's Triton `rms_norm_fn`: x · rsqrt(mean x² + eps) · w,
  computed in float32 and stored in x's dtype (restated here in torch).
- SDARAttention (198-303): q = q_norm(q_proj(x) viewed per head), k = k_norm(k_proj(x) ...),
  v = v_proj(x); half-split RoPE (`rotate_half`, 123-154) with cos/sin from SDARRotaryEmbedding
  (399-436: inv_freq = 1/theta^(2j/head_dim), float32, cast to the hidden dtype); biases on all
  four projections iff `attention_bias`; head_dim from the config; scale head_dim^-0.5.
- The cache (264-276): with `store_kv` the layer's k/v are appended to the cache and the full
  cached k/v are used; without it, the cached k/v are read and the fresh ones concatenated but
  not stored.
- The mask (278-299) is used as given, cast to bool: all True -> flash_attn_func(causal=False),
  else SDPA(attn_mask=mask, enable_gqa=True); both are the same attention over the same keys, so
  the flash branch is restated as SDPA without a mask. SDARModel.forward never builds a mask
  (`_update_causal_mask` is commented out, 518-520), position ids default to cache positions.
- SDARForCausalLM (741-859): lm_head on the final norm, `logits_to_keep` slices the hidden states.
- Training (JetAstra/SDAR@c2041a8, 286-347): `block_diff_mask` / `block_attn_mask` build the
  [x_t ; x_0] mask per packed sample; the 2L forward is the same layers under FlexAttention.
- The sampler's mask (`JetAstra/SDAR@c2041a8:generate.py:83-86`): a lower-triangular block
  matrix repeat-interleaved by the block length over prompt + generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PublishedRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        # flash_attn.ops.triton.layer_norm.rms_norm_fn: float32 x_hat * float32 w, stored in x's dtype
        x = hidden_states.to(torch.float32)
        rstd = 1 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * rstd * self.weight.to(torch.float32)).to(hidden_states.dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class PublishedCache:
    """The part of transformers' DynamicCache the published attention uses: per-layer k/v,
    `update` appends and returns the whole, indexing reads, len = layers filled."""

    def __init__(self) -> None:
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []

    def update(self, k, v, layer_idx):
        if len(self.key_cache) <= layer_idx:
            self.key_cache.append(k)
            self.value_cache.append(v)
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], k], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], v], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def __getitem__(self, layer_idx):
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def __len__(self) -> int:
        return len(self.key_cache)


class PublishedSDARAttention(nn.Module):
    def __init__(self, c, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = PublishedRMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = PublishedRMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_value=None, store_kv=False):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_value is not None and store_kv:
            key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx)
        elif past_key_value is not None and not store_kv and len(past_key_value) > self.layer_idx:
            past_k, past_v = past_key_value[self.layer_idx]
            key_states = torch.cat([past_k, key_states], dim=-2)
            value_states = torch.cat([past_v, value_states], dim=-2)
        attention_mask = attention_mask.bool() if attention_mask is not None else None
        if torch.all(attention_mask):  # the published flash_attn_func(causal=False) branch
            attn_output = F.scaled_dot_product_attention(
                query_states, key_states, value_states, is_causal=False, scale=self.scaling, enable_gqa=True)
        else:
            attn_output = F.scaled_dot_product_attention(
                query_states, key_states, value_states, attn_mask=attention_mask, is_causal=False,
                scale=self.scaling, enable_gqa=True)
        attn_output = attn_output.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class PublishedSDARMLP(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PublishedSDARDecoderLayer(nn.Module):
    def __init__(self, c, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = PublishedSDARAttention(c, layer_idx)
        self.mlp = PublishedSDARMLP(c)
        self.input_layernorm = PublishedRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = PublishedRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, hidden_states, attention_mask, position_embeddings, past_key_value=None, store_kv=False):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                       past_key_value, store_kv)
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class PublishedSDARModel(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        self.layers = nn.ModuleList(PublishedSDARDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = PublishedRMSNorm(c.hidden_size, c.rms_norm_eps)

    def rotary(self, x, position_ids):
        c = self.c
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv_freq_expanded @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # attention_scaling = 1 (default RoPE)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, store_kv=False):
        hidden_states = self.embed_tokens(input_ids)
        if position_ids is None:
            past = past_key_values.key_cache[0].shape[-2] if past_key_values is not None and len(past_key_values) else 0
            position_ids = torch.arange(past, past + input_ids.shape[1]).unsqueeze(0)
        position_embeddings = self.rotary(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, position_embeddings, past_key_values, store_kv)
        return self.norm(hidden_states)


class PublishedSDARForCausalLM(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.model = PublishedSDARModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, store_kv=False,
                logits_to_keep=0):
        hidden_states = self.model(input_ids, attention_mask, position_ids, past_key_values, store_kv)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.lm_head(hidden_states[:, slice_indices, :])


def generate_block_mask(num_blocks: int, block_length: int) -> torch.Tensor:
    """generate.py:83-86: (1, T, T) with T = num_blocks · block_length, 1 where key block <= query block."""
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks))
    return block_mask.repeat_interleave(block_length, dim=0).repeat_interleave(block_length, dim=1).unsqueeze(0)


def block_diff_mask(q_idx, kv_idx, block_size, n):
    """Training file 286-327: M_BD | M_OBC | M_BC for [x_t ; x_0] of two halves of length n."""
    x0_flag_q = q_idx >= n
    x0_flag_kv = kv_idx >= n
    block_q = torch.where(x0_flag_q == 1, (q_idx - n) // block_size, q_idx // block_size)
    block_kv = torch.where(x0_flag_kv == 1, (kv_idx - n) // block_size, kv_idx // block_size)
    block_diagonal = (block_q == block_kv) & (x0_flag_q == x0_flag_kv)
    offset_block_causal = (block_q > block_kv) & (x0_flag_kv == 1) & (x0_flag_q == 0)
    block_causal = (block_q >= block_kv) & (x0_flag_kv == 1) & (x0_flag_q == 1)
    return block_diagonal | offset_block_causal | block_causal


def block_attn_mask(num_tokens, block_size):
    """Training file 330-347: per batch row, the block-diagonal stack of each packed sample's
    (2n, 2n) mask; (B, sum 2n, sum 2n) bool."""
    masks = []
    for row in num_tokens:
        cur = [block_diff_mask(torch.arange(n * 2)[:, None], torch.arange(n * 2)[None, :], block_size, n)
               for n in row]
        masks.append(torch.block_diag(*cur))
    return torch.stack(masks, dim=0)
