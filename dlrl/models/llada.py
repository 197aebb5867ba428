"""Native LLaDA (LLaDA-8B-Base / -Instruct, LLaDA-1.5): the published architecture as our own code.

LLaDA ships its modeling code with the weights (`modeling_llada.py`, an OLMo derivative), and that
code does not load under transformers 5. This module restates the architecture the published
checkpoints use (`block_type = "llama"`, RMSNorm, half-split RoPE, SwiGLU, non-causal attention)
with the published `config.json` fields, and keeps the published module tree
(`model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj,
up_proj, ff_out}, ln_f, ff_out}`) so the published safetensors load by name and a saved checkpoint
is in the published layout. The family record (`dlrl.models.families.llada`) holds the explicit
name map that checks it.

Differences from the published file, none of which change its logits: positions may be given
(`position_ids`, so a left-padded row equals the row alone exactly; the published code always uses
0..T-1, which RoPE makes equal up to rounding), a 4-D mask is accepted, and attention can go
through a `KVCache`. Padding in the published convention is a 2-D (B, T) mask that only masks keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from dlrl.models.attention import apply_rope, attend, default_positions, keep_logits, rope_cos_sin, sdpa_mask
from dlrl.models.kv_cache import KVCache


class LLaDAConfig(PretrainedConfig):
    """The published LLaDA config.json fields (GSAI-ML/LLaDA-8B-Instruct); defaults are its values.

    Only the variant the published checkpoints use is built: block_type "llama", RMS norm, RoPE,
    SiLU-gated MLP, no ALiBi; other values are rejected by the model with a clear error.
    """

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = 32,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = 12288,
        activation_type: str = "silu",
        block_type: str = "llama",
        block_group_size: int = 1,
        alibi: bool = False,
        alibi_bias_max: float = 8.0,
        rope: bool = True,
        rope_full_precision: bool = True,
        rope_theta: float = 500000.0,
        flash_attention: bool = False,
        attention_dropout: float = 0.0,
        multi_query_attention: bool | None = None,
        attention_layer_norm: bool = False,
        attention_layer_norm_with_affine: bool = True,
        residual_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        input_emb_norm: bool = False,
        layer_norm_type: str = "rms",
        layer_norm_with_affine: bool = True,
        bias_for_layer_norm: bool | None = False,
        rms_norm_eps: float = 1e-5,
        max_sequence_length: int = 4096,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        scale_logits: bool = False,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        weight_tying: bool = False,
        init_device: str | None = "meta",
        init_fn: str = "mitchell",
        init_std: float = 0.02,
        init_cutoff_factor: float | None = None,
        precision: str | None = "amp_bf16",
        mask_token_id: int = 126336,
        pad_token_id: int = 126081,
        eos_token_id: int = 126081,
        **kwargs,
    ) -> None:
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_ratio, self.mlp_hidden_size, self.activation_type = mlp_ratio, mlp_hidden_size, activation_type
        self.block_type, self.block_group_size = block_type, block_group_size
        self.alibi, self.alibi_bias_max = alibi, alibi_bias_max
        self.rope, self.rope_full_precision, self.rope_theta = rope, rope_full_precision, rope_theta
        self.flash_attention, self.attention_dropout = flash_attention, attention_dropout
        self.multi_query_attention = multi_query_attention
        self.attention_layer_norm = attention_layer_norm
        self.attention_layer_norm_with_affine = attention_layer_norm_with_affine
        self.residual_dropout, self.embedding_dropout = residual_dropout, embedding_dropout
        self.input_emb_norm = input_emb_norm
        self.layer_norm_type, self.layer_norm_with_affine = layer_norm_type, layer_norm_with_affine
        self.bias_for_layer_norm, self.rms_norm_eps = bias_for_layer_norm, rms_norm_eps
        self.max_sequence_length = max_sequence_length
        self.include_bias, self.include_qkv_bias = include_bias, include_qkv_bias
        self.scale_logits = scale_logits
        self.vocab_size, self.embedding_size, self.weight_tying = vocab_size, embedding_size, weight_tying
        self.init_device, self.init_fn, self.init_std = init_device, init_fn, init_std
        self.init_cutoff_factor, self.precision = init_cutoff_factor, precision
        self.mask_token_id = mask_token_id
        # The published auto_map points at modeling files a native checkpoint does not carry.
        kwargs.pop("auto_map", None)
        kwargs["tie_word_embeddings"] = False  # LLaDA's own flag is weight_tying (handled here)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads as the published code counts them (multi-query -> 1)."""
        if self.multi_query_attention:
            return 1
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def output_size(self) -> int:
        return self.embedding_size or self.vocab_size


UNSUPPORTED = {
    "block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",),
    "alibi": (False,), "rope": (True,), "block_group_size": (1,), "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
}


def check_supported(config: LLaDAConfig) -> None:
    """Reject config values of variants no published LLaDA checkpoint uses (and this code omits)."""
    for field, allowed in UNSUPPORTED.items():
        if getattr(config, field) not in allowed:
            raise ValueError(f"native LLaDA supports {field} in {allowed}, got {getattr(config, field)!r}")


class LLaDARMSNorm(nn.Module):
    """RMSLayerNorm of modeling_llada.py: normalise in float32, cast back, then weight (+ bias)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        d = config.d_model
        self.weight = nn.Parameter(torch.ones(d)) if config.layer_norm_with_affine else None
        use_bias = config.bias_for_layer_norm
        if use_bias is None:
            use_bias = config.include_bias
        self.bias = nn.Parameter(torch.zeros(d)) if (config.layer_norm_with_affine and use_bias) else None

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if self.weight is None:
            return x
        return self.weight * x + self.bias if self.bias is not None else self.weight * x


class LLaDABlock(nn.Module):
    """One LLaDA "llama" block: x + attn(norm(x)), then + ff_out(silu(ff_proj(h)) · up_proj(h)).

    Linear biases follow the published flags: q/k/v carry one if include_bias or include_qkv_bias,
    attn_out / ff_proj / up_proj / ff_out only if include_bias.
    """

    def __init__(self, config: LLaDAConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        d, heads, kv_heads = config.d_model, config.n_heads, config.effective_n_kv_heads
        if d % heads:
            raise ValueError(f"d_model {d} is not a multiple of n_heads {heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.theta, self.dropout = config.rope_theta, config.attention_dropout
        qkv_bias = config.include_bias or config.include_qkv_bias
        bias = config.include_bias
        self.attn_norm = LLaDARMSNorm(config)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = LLaDARMSNorm(config)
        self.ff_proj = nn.Linear(d, config.mlp_width, bias=bias)
        self.up_proj = nn.Linear(d, config.mlp_width, bias=bias)
        self.ff_out = nn.Linear(config.mlp_width, d, bias=bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
        kv_cache: KVCache | None = None, cache_start: int = 0,
    ) -> Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = attend(q, k, v, mask, layer=self.layer, kv_cache=kv_cache, cache_start=cache_start,
                   dropout=self.dropout if self.training else 0.0)
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, t, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """The published `LLaDAModel` tree: transformer.{wte, blocks, ln_f, ff_out (untied only)}."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        check_supported(config)
        modules = {
            "wte": nn.Embedding(config.output_size, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
            "ln_f": LLaDARMSNorm(config),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.output_size, bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)


class LLaDAModelLM(PreTrainedModel):
    """LLaDA masked-diffusion LM: `model(input_ids, attention_mask).logits` is (B, T, V), non-causal.

    attention_mask: (B, T) 1/0 padding (the published convention), or (B, 1, q, T) bool / additive.
    position_ids: (B, q), default cache_start .. cache_start + q - 1.
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LLaDARMSNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int = 0,
        logits_to_keep: int | slice | Tensor = 0,
        **kwargs,
    ) -> MaskedLMOutput:
        t = self.model.transformer
        if position_ids is None:
            position_ids = default_positions(input_ids, cache_start)
        cos, sin = rope_cos_sin(position_ids, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        x = t.wte(input_ids)
        if self.config.embedding_dropout and self.training:
            x = F.dropout(x, self.config.embedding_dropout)
        mask = sdpa_mask(attention_mask, x.dtype)
        for block in t.blocks:
            x = block(x, cos, sin, mask, kv_cache, cache_start)
        x = t.ln_f(keep_logits(x, logits_to_keep))
        logits = F.linear(x, t.wte.weight) if self.config.weight_tying else t.ff_out(x)
        if self.config.scale_logits:
            logits = logits * self.config.d_model ** -0.5
        return MaskedLMOutput(logits=logits)
