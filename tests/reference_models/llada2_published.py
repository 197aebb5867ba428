"""Test-only restatement of the published LLaDA2.x forward (not used by the package).

Restated (not copied) from `yjyddq/DARE@7016e0e21ad5f77a66ee97cae39f418d27bd852d:
models/LLaDA2.0-mini/modeling_llada2_moe.py` (md5 aa88b089a5b73a194a26becdf5389e15, transformers
4.57 era; the file does not import under transformers 5). LLaDA2.1-mini's copy at `yjyddq/DARE@
5877371d92af220cb4d220a06fd56f4078447ace` has the same model body (it differs in `generate` only).
What is restated, with the published line ranges:

- `LLaDA2MoeRMSNorm` (74–87): float32 normalisation, cast back, then the gain.
- `LLaDA2MoeRotaryEmbedding` + transformers' default rope init (94–139): inv_freq over
  dim = int(head_dim x partial_rotary_factor) channels, emb = cat(freqs, freqs), cos/sin in
  float32 cast to the hidden dtype; `apply_rotary_pos_emb` (150–186) rotates q[..., :dim] with
  rotate_half and concatenates the untouched rest.
- `LLaDA2MoeGate` (205–274): float32 logits, sigmoid, + expert_bias for routing only,
  group-limited top-k (group score = sum of the group's top-2), weights = gathered unbiased
  scores / (sum + 1e-20) when top_k > 1, x routed_scaling_factor.
- `LLaDA2MoeSparseMoeBlock` (277–364): training branch (repeat_interleave, per-expert masked
  assignment, weighted sum) and the eval branch `moe_infer` (tokens sorted by expert, per-expert
  calls, float32 weighted sum); + shared_experts(identity) when num_shared_experts is not None.
- `LLaDA2MoeAttention` (412–538): fused query_key_value split as [heads, kv, kv] along the head
  axis, q/k RMSNorm per head when use_qk_norm, RoPE, SDPA (`is_causal = False`, transformers'
  sdpa_attention_forward: repeat_kv, mask sliced to the keys), `dense`.
- `LLaDA2MoeDecoderLayer` (541–630): MoE iff num_experts is not None and layer >= first_k_dense_replace.
- `LLaDA2MoeModel.forward` (795–955; the mask check 866–876): it accepts only a (B, 1, L, L) mask, which
  `_prepare_4d_causal_attention_mask_for_sdpa` passes through unchanged (a 4-D mask is returned as
  is, no causal mask is added); position ids default to 0..L-1.
- `LLaDA2MoeModelLM.forward` (991–1093; lm_head and the float cast 1068–1069): lm_head, then logits.float().
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PublishedRMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def repeat_kv(h, n_rep):
    b, kv, s, d = h.shape
    if n_rep == 1:
        return h
    return h[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class PublishedMLP(nn.Module):
    def __init__(self, c, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PublishedGate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.top_k, self.num_experts = c.num_experts_per_tok, c.num_experts
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.routed_scaling_factor = c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(c.num_experts))

    def group_limited_topk(self, scores):
        num_tokens, _ = scores.size()
        group_scores = scores.view(num_tokens, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (group_mask.unsqueeze(-1)
                      .expand(num_tokens, self.n_group, self.num_experts // self.n_group)
                      .reshape(num_tokens, -1))
        masked_scores = scores.masked_fill(~score_mask.bool(), float("-inf"))
        probs, top_indices = torch.topk(masked_scores, k=self.top_k, dim=-1)
        return probs, top_indices

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = torch.sigmoid(logits.float()).type_as(logits)
        scores_for_routing = scores + self.expert_bias
        _, topk_idx = self.group_limited_topk(scores_for_routing)
        scores = torch.gather(scores, dim=1, index=topk_idx).type_as(logits)
        topk_weight = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if self.top_k > 1 else scores
        topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight, logits


class PublishedSparseMoeBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.num_experts_per_tok = c.num_experts_per_tok
        self.experts = nn.ModuleList(PublishedMLP(c, c.moe_intermediate_size) for _ in range(c.num_experts))
        self.gate = PublishedGate(c)
        if c.num_shared_experts is not None:
            self.shared_experts = PublishedMLP(c, c.moe_intermediate_size * c.num_shared_experts)

    def forward(self, hidden_states):
        identity = hidden_states
        bsz, seq_len, h = hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.to(hidden_states.dtype).view(bsz, seq_len, h)
        else:
            y = self.moe_infer(hidden_states, topk_idx, topk_weight).view(bsz, seq_len, h)
        if self.c.num_shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0).tolist()
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        outputs, start_idx = [], 0
        for i, num_tokens in enumerate(tokens_per_expert):
            if num_tokens == 0:
                continue
            end_idx = start_idx + num_tokens
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return (new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(dim=-1))
                .sum(dim=1).type(new_x.dtype))


class PublishedAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.num_heads, self.num_key_value_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
        self.query_key_value = nn.Linear(c.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                                         bias=c.use_qkv_bias)
        if c.use_qk_norm:
            self.query_layernorm = PublishedRMSNorm(self.head_dim, c.rms_norm_eps)
            self.key_layernorm = PublishedRMSNorm(self.head_dim, c.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=c.use_bias)

    def forward(self, hidden_states, attention_mask, position_embeddings):
        bsz, q_len, _ = hidden_states.size()
        qkv = self.query_key_value(hidden_states).view(bsz, q_len, self.num_heads + 2 * self.num_key_value_heads,
                                                       self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=-2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.c.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        n_rep = self.num_heads // self.num_key_value_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        mask = attention_mask[:, :, :, : k.shape[-2]]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, scale=self.head_dim ** -0.5)
        return self.dense(out.transpose(1, 2).reshape(bsz, q_len, -1).contiguous())


class PublishedDecoderLayer(nn.Module):
    def __init__(self, c, layer_idx):
        super().__init__()
        self.attention = PublishedAttention(c)
        moe = c.num_experts is not None and layer_idx >= c.first_k_dense_replace
        self.mlp = PublishedSparseMoeBlock(c) if moe else PublishedMLP(c, c.intermediate_size)
        self.input_layernorm = PublishedRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = PublishedRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, hidden_states, attention_mask, position_embeddings):
        residual = hidden_states
        hidden_states = residual + self.attention(self.input_layernorm(hidden_states), attention_mask,
                                                  position_embeddings)
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class PublishedModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        self.layers = nn.ModuleList(PublishedDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = PublishedRMSNorm(c.hidden_size, c.rms_norm_eps)

    def rotary(self, x, position_ids):
        c = self.c
        head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
        dim = int(head_dim * c.partial_rotary_factor)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv_freq_expanded @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def forward(self, input_ids, attention_mask, position_ids=None):
        b, t = input_ids.shape
        if attention_mask is None or attention_mask.size() != (b, 1, t, t):
            raise ValueError("LLaDA2.0 only support block attention mask with shape (B, 1, L, L)")
        if position_ids is None:
            position_ids = torch.arange(t).unsqueeze(0)
        x = self.word_embeddings(input_ids)
        position_embeddings = self.rotary(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask, position_embeddings)
        return self.norm(x)


class PublishedLLaDA2MoeModelLM(nn.Module):
    """forward(input_ids, attention_mask (B, 1, L, L), position_ids) -> float32 logits (B, L, V)."""

    def __init__(self, c):
        super().__init__()
        self.model = PublishedModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask, position_ids=None):
        return self.lm_head(self.model(input_ids, attention_mask, position_ids)).float()


def published_block_mask(length: int, block_length: int) -> torch.Tensor:
    """The additive mask LLaDA2's `generate` builds (1309–1320): block-lower-triangular over
    blocks of the absolute positions 0..L-1, log(0/1) -> -inf / 0 (float32 here, bf16 there)."""
    num_blocks = -(-length // block_length)
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks))
    full = block_mask.repeat_interleave(block_length, dim=0).repeat_interleave(block_length, dim=1)
    return full[:length, :length][None, None].log()
