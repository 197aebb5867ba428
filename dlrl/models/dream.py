"""Native Dream (Dream-v0-Base / -Instruct-7B): Qwen2-shaped, bidirectional, logits lag by one.

Dream starts from Qwen2.5 weights and keeps Qwen2's module tree (`model.{embed_tokens, layers.N.
{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj},
norm}`, `lm_head`), with biases on q/k/v only, half-split RoPE (rope_theta 1e6), RMSNorm and a
SiLU-gated MLP; attention is non-causal. Like the autoregressive model it comes from, its hidden
state i predicts token i + 1: the model returns those raw logits and `dlrl.models.forward` aligns
them (the family record's `logit_shift`), as Dream's published generation code does. Keeping the
published names lets the published safetensors load by name; the family record
(`dlrl.models.families.dream`) holds the explicit map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

from dlrl.models.attention import apply_rope, attend
from dlrl.models.kv_cache import KVCache
from dlrl.models.native_lm import NativeLM


class DreamConfig(PretrainedConfig):
    """The published Dream config.json fields (Dream-org/Dream-v0-Instruct-7B); defaults are its values."""

    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int = 4,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        use_mrope: bool = False,
        mask_token_id: int = 151666,
        pad_token_id: int = 151643,
        bos_token_id: int = 151643,
        eos_token_id: int = 151643,
        **kwargs,
    ) -> None:
        if hidden_act != "silu":
            raise ValueError(f"native Dream supports hidden_act 'silu', got {hidden_act!r}")
        if rope_scaling not in (None, {}) and (rope_scaling or {}).get("rope_type", "default") != "default":
            raise ValueError(f"native Dream supports plain RoPE only, got rope_scaling {rope_scaling!r}")
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps, self.use_cache = initializer_range, rms_norm_eps, use_cache
        self.rope_theta = rope_theta
        self.use_sliding_window, self.sliding_window = use_sliding_window, sliding_window
        self.max_window_layers, self.attention_dropout, self.use_mrope = max_window_layers, attention_dropout, use_mrope
        self.mask_token_id = mask_token_id
        kwargs.pop("auto_map", None)  # points at modeling files a native checkpoint does not carry
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class DreamRMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer, self.heads, self.kv_heads = layer, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d // self.heads
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: KVCache | None, cache_start: int) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = attend(q, k, v, mask, layer=self.layer, kv_cache=kv_cache, cache_start=cache_start,
                   dropout=self.dropout if self.training else 0.0)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, -1))


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d, m = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    """x + self_attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)), non-causal."""

    def __init__(self, config: DreamConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config, layer)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: KVCache | None = None, cache_start: int = 0) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamModel(NativeLM):
    """Dream LM (`NativeLM`): logits[:, i] predicts token i + 1 (use
    `dlrl.models.forward.diffusion_logits` for aligned logits). attention_mask: (B, 1, q, T) bool
    (Dream's convention) / additive, or (B, T) padding.
    """

    config_class = DreamConfig
    body_class = DreamBaseModel
    norm_class = DreamRMSNorm
    _input_embed_layer = "embed_tokens"
    _no_split_modules = ["DreamDecoderLayer"]

    @property
    def rope_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads
