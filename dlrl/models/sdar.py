"""Native SDAR (JetLM/SDAR-1.7B/4B/8B-Chat) and TraDo: a Qwen3 body run as a block-diffusion LM.

Restated from the published inference file `yjyddq/DARE@f4999da5cf21e9e4cf69cf7d5fdbb2b02b3a940d:
models/SDAR-1.7B-Chat/modeling_sdar.py` (md5 a6bf7506..., itself Qwen3's transformers 4.52.4
modeling file with SDAR's attention): the module tree `model.{embed_tokens, layers.N.
{input_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, post_attention_layernorm,
mlp.{gate,up,down}_proj}, norm}`, `lm_head`, so the published safetensors load by name. Qwen3's
differences from the Qwen2 body of `dlrl.models.dream`:

- `head_dim` comes from the config and may differ from hidden / heads (Qwen3-4B: 2560 / 32 = 80,
  head_dim 128);
- per-head RMSNorm on q and k (over head_dim, one gain shared by all heads) before RoPE;
- `attention_bias` puts biases on q, k, v *and* o (off in every published config).

Attention is one SDPA call under whatever 4-D mask the caller gives (block-causal for decoding and
scoring, `dlrl.models.block_mask`; the BD3-LM [x_t ; x_0] mask for training): the published file
calls flash-attn when the mask is all True and SDPA with the boolean mask otherwise, which are
the same numbers; its training twin (`JetAstra/SDAR@c2041a8:training/model/SDAR-4B-Chat/
modeling_sdar.py`) runs the same layers under FlexAttention. Each token is predicted at its own
position (no logit shift). RMSNorm follows the flash-attn Triton kernel the published file calls
(`rms_norm_fn`): normalise and scale by the gain in float32, then cast, where Qwen3's eager norm
casts before scaling; the two agree in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from dlrl.models.attention import apply_rope, attend
from dlrl.models.dream import DreamMLP
from dlrl.models.kv_cache import KVCache
from dlrl.models.native_lm import NativeLM


class SDARConfig(PretrainedConfig):
    """The published SDAR config.json fields; defaults are SDAR-1.7B-Chat's.

    `block_size` and `mask_token_id` are in the training config (SDAR's own training folder and
    DARE's SDAR-1dot7B-Chat: 4 and 151669) and absent from the original inference config; None
    means "not in config.json" (`Family.block_size_for` and `special_ids` then fall back to the
    family record). Training-only keys of the published config (fuse_cross_entropy, ep_size,
    micro_forward, ...) are kept as plain attributes; `attn_implementation` is dropped: the native
    model always runs SDPA.
    """

    model_type = "sdar"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 2048,
        intermediate_size: int = 6144,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 8,
        head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        block_size: int | None = None,
        mask_token_id: int | None = None,
        bos_token_id: int = 151643,
        eos_token_id: int = 151643,
        **kwargs,
    ) -> None:
        if hidden_act != "silu":
            raise ValueError(f"native SDAR supports hidden_act 'silu', got {hidden_act!r}")
        if rope_scaling not in (None, {}) and (rope_scaling or {}).get("rope_type", "default") != "default":
            raise ValueError(f"native SDAR supports plain RoPE only, got rope_scaling {rope_scaling!r}")
        if use_sliding_window and sliding_window is not None:
            raise ValueError("native SDAR does not implement sliding-window attention (off in every published config)")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps, self.use_cache = initializer_range, rms_norm_eps, use_cache
        self.rope_theta, self.attention_bias = rope_theta, attention_bias  # rope_scaling: plain RoPE, checked above
        self.use_sliding_window, self.sliding_window = use_sliding_window, sliding_window
        self.max_window_layers, self.attention_dropout = max_window_layers, attention_dropout
        self.block_size, self.mask_token_id = block_size, mask_token_id
        kwargs.pop("auto_map", None)  # points at modeling files a native checkpoint does not carry
        kwargs.pop("attn_implementation", None)  # "flex_attention" in the training config; we run SDPA
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class SDARRMSNorm(nn.Module):
    """RMSNorm as flash-attn's `rms_norm_fn` computes it: (x · rsqrt(mean x² + eps) · w) in
    float32, cast back to x's dtype once."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class SDARAttention(nn.Module):
    """GQA with per-head q/k RMSNorm before half-split RoPE, SDPA under the given mask."""

    def __init__(self, config: SDARConfig, layer: int) -> None:
        super().__init__()
        d, bias = config.hidden_size, config.attention_bias
        self.layer, self.heads, self.kv_heads = layer, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)
        self.q_norm = SDARRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = SDARRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: KVCache | None, cache_start: int) -> Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = attend(q, k, v, mask, layer=self.layer, kv_cache=kv_cache, cache_start=cache_start,
                   dropout=self.dropout if self.training else 0.0)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, -1))


class SDARDecoderLayer(nn.Module):
    """x + self_attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)); the mask decides
    which keys each query sees."""

    def __init__(self, config: SDARConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = SDARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SDARAttention(config, layer)
        self.post_attention_layernorm = SDARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config)  # the same SwiGLU (gate_proj, up_proj, down_proj, no bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: KVCache | None = None, cache_start: int = 0) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class SDARModel(nn.Module):
    """The published `SDARModel`: embed_tokens, layers, norm (its rotary buffer is not a tensor
    of the checkpoint)."""

    def __init__(self, config: SDARConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SDARDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SDARRMSNorm(config.hidden_size, config.rms_norm_eps)


class SDARForCausalLM(NativeLM):
    """SDAR LM (`NativeLM`): logits[:, i] predicts token i itself.

    With attention_mask None every query sees every key: pass a block-causal mask for SDAR's own
    attention, or go through `dlrl.models.forward.diffusion_logits`, which builds it.
    """

    config_class = SDARConfig
    body_class = SDARModel
    norm_class = SDARRMSNorm
    _input_embed_layer = "embed_tokens"
    _no_split_modules = ["SDARDecoderLayer"]

    @property
    def rope_dim(self) -> int:
        return self.config.head_dim  # Qwen3: set apart from hidden / heads
