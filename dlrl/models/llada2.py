"""Native LLaDA2.x (LLaDA2.0-mini / LLaDA2.1-mini, `llada2_moe`): a block-diffusion MoE as our own code.

Restated from the published modeling file as DARE copied it from the hub,
`yjyddq/DARE@7016e0e21ad5f77a66ee97cae39f418d27bd852d:models/LLaDA2.0-mini/modeling_llada2_moe.py`
(md5 aa88b089a5b73a194a26becdf5389e15) and its `configuration_llada2_moe.py`
(89d13acd3a8118e30ab0b24a54696d91). LLaDA2.1-mini's files
(`yjyddq/DARE@5877371d92af220cb4d220a06fd56f4078447ace:models/LLaDA2.1-mini/`) have the same model
body and config class; only `generate` differs (an argmax at temperature 0, token editing), which
is the sampler's business, not the model's. Its `config.json` is byte-identical to 2.0-mini's.

The architecture (a Ling/Bailing-style MoE, 16B total, 1.4B active):
- attention: one fused `query_key_value` projection (q heads, then k, then v heads along the
  output), RMSNorm on every q and k head (`use_qk_norm`, default on), RoPE on the first half of
  each head only (`partial_rotary_factor` 0.5: 64 of 128 channels; the config's `rotary_dim` is
  not read by the published code), non-causal SDPA under the 4-D mask the caller gives, an output
  projection called `dense`;
- MLP: the first `first_k_dense_replace` layers have a SwiGLU of width `intermediate_size`; the
  others a MoE block: `num_experts` routed SwiGLU experts of width `moe_intermediate_size`, plus
  one shared SwiGLU of width `moe_intermediate_size x num_shared_experts` that every token runs;
- router (`gate`): logits in float32, sigmoid scores; routing adds a per-expert bias
  (`expert_bias`, a buffer: aux-loss-free load balancing adjusts it during pre-training, nothing
  trains it here) and picks `topk_group` of `n_group` expert groups by the sum of each group's two
  best biased scores, then the `num_experts_per_tok` best experts inside them; the weights are
  the *unbiased* scores of those experts, normalised to sum 1 and scaled by `routed_scaling_factor`;
- each token is predicted at its own position (no shift); the final norm, then `lm_head`.

Differences from the published file, none of which changes its logits: a mask may be None (full
attention), 2-D (key padding) or 4-D (the published code demands (B, 1, L, L)); attention can go
through a `KVCache`; `logits_to_keep`; logits come back in the model's dtype (the published code
upcasts them to float32, a lossless cast the caller can make); the router runs with autocast off,
so under bf16 autocast it still scores in float32 as the config's `router_dtype` says (the
published F.linear would be autocast to bf16). The experts run as a plain loop over experts on
the tokens sorted by expert, which is exact and clear; a grouped GEMM (one kernel over all
experts' token groups) is where speed would come from on a GPU, at the marked line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

from dlrl.models.attention import apply_partial_rope, attend
from dlrl.models.dream import DreamRMSNorm
from dlrl.models.kv_cache import KVCache
from dlrl.models.native_lm import NativeLM


class LLaDA2MoeConfig(PretrainedConfig):
    """The published `configuration_llada2_moe.py` fields; defaults are LLaDA2.0-mini's config.json.

    `use_qk_norm` is not in that config.json: the published class's default (True) applies, and the
    published checkpoint carries the q/k norm weights. Fields the published modeling code does not
    read (`rotary_dim`, `norm_topk_prob`, `score_function`, `router_dtype`, ...) are kept as given;
    a value that contradicts what that code does is refused rather than silently ignored.
    """

    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int | None = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_qk_norm: bool = True,
        use_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        norm_head: bool = False,
        tie_word_embeddings: bool = False,
        embedding_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        output_dropout: float = 0.0,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 32768,
        rope_theta: float = 600000.0,
        use_cache: bool = False,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        rope_scaling: dict | None = None,
        pad_token_id: int | None = 156892,
        num_experts: int | None = 256,
        num_shared_experts: int | None = 1,
        num_experts_per_tok: int = 8,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        moe_intermediate_size: int | None = 512,
        first_k_dense_replace: int = 1,
        head_dim: int | None = 128,
        output_router_logits: bool = False,
        partial_rotary_factor: float = 0.5,
        rotary_dim: int | None = None,
        norm_topk_prob: bool = True,
        norm_softmax: bool = False,
        score_function: str = "sigmoid",
        router_dtype: str = "fp32",
        moe_router_enable_expert_bias: bool = True,
        **kwargs,
    ) -> None:
        if hidden_act != "silu":
            raise ValueError(f"native LLaDA2 supports hidden_act 'silu', got {hidden_act!r}")
        if rope_scaling not in (None, {}) and (rope_scaling or {}).get("rope_type", "default") != "default":
            raise ValueError(f"native LLaDA2 supports plain RoPE only, got rope_scaling {rope_scaling!r}")
        if score_function != "sigmoid" or router_dtype not in ("fp32", "float32"):
            raise ValueError("the published LLaDA2 router scores with a float32 sigmoid; got score_function "
                             f"{score_function!r}, router_dtype {router_dtype!r}")
        head_dim = head_dim or hidden_size // num_attention_heads
        if rotary_dim is not None and rotary_dim != int(head_dim * partial_rotary_factor):
            raise ValueError(f"rotary_dim {rotary_dim} disagrees with head_dim x partial_rotary_factor = "
                             f"{int(head_dim * partial_rotary_factor)} (what the published code rotates)")
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.hidden_act = num_key_value_heads, hidden_act
        self.use_qkv_bias, self.use_qk_norm, self.use_bias = use_qkv_bias, use_qk_norm, use_bias
        self.rms_norm_eps, self.norm_head = rms_norm_eps, norm_head
        self.embedding_dropout, self.attention_dropout, self.output_dropout = (
            embedding_dropout, attention_dropout, output_dropout)
        self.initializer_range, self.max_position_embeddings = initializer_range, max_position_embeddings
        self.rope_theta, self.use_cache = rope_theta, use_cache  # rope_scaling: checked above, plain RoPE only
        self.use_sliding_window, self.sliding_window, self.max_window_layers = (
            use_sliding_window, sliding_window, max_window_layers)
        self.head_dim, self.partial_rotary_factor, self.rotary_dim = head_dim, partial_rotary_factor, rotary_dim
        self.num_experts, self.num_shared_experts = num_experts, num_shared_experts
        self.num_experts_per_tok, self.n_group, self.topk_group = num_experts_per_tok, n_group, topk_group
        self.routed_scaling_factor, self.moe_intermediate_size = routed_scaling_factor, moe_intermediate_size
        self.first_k_dense_replace, self.output_router_logits = first_k_dense_replace, output_router_logits
        self.norm_topk_prob, self.norm_softmax = norm_topk_prob, norm_softmax
        self.score_function, self.router_dtype = score_function, router_dtype
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        kwargs.pop("auto_map", None)  # points at modeling files a native checkpoint does not carry
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def rope_dim(self) -> int:
        """Channels of each head that RoPE rotates: int(head_dim x partial_rotary_factor), as published."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        """The published rule: a MoE block iff num_experts is set and layer >= first_k_dense_replace."""
        return self.num_experts is not None and layer >= self.first_k_dense_replace


# The published LLaDA2 RMSNorm (T5LayerNorm: normalise in float32, cast back, then scale) is Qwen2's.
LLaDA2MoeRMSNorm = DreamRMSNorm


class LLaDA2MoeAttention(nn.Module):
    """Fused q/k/v, per-head q/k RMSNorm, partial RoPE, non-causal SDPA, `dense` out projection."""

    def __init__(self, config: LLaDA2MoeConfig, layer: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer, self.heads, self.kv_heads = layer, config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.dropout = config.head_dim, config.attention_dropout
        self.query_key_value = nn.Linear(d, (self.heads + 2 * self.kv_heads) * self.head_dim,
                                         bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.heads * self.head_dim, d, bias=config.use_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: KVCache | None, cache_start: int) -> Tensor:
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = (part.transpose(1, 2) for part in qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2))
        if hasattr(self, "query_layernorm"):  # (B, H, T, D): normalised per head, before RoPE
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        a = attend(q, k, v, mask, layer=self.layer, kv_cache=kv_cache, cache_start=cache_start,
                   dropout=self.dropout if self.training else 0.0)
        return self.dense(a.transpose(1, 2).reshape(b, t, -1))


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers', each expert's and the shared one's."""

    def __init__(self, config: LLaDA2MoeConfig, width: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.gate_proj = nn.Linear(d, width, bias=False)
        self.up_proj = nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def group_limited_topk(scores: Tensor, n_group: int, topk_group: int, top_k: int) -> Tensor:
    """Indices (N, top_k) of the experts a token routes to, from biased scores (N, E).

    DeepSeek-V3-style group-limited routing (LLaDA2MoeGate.group_limited_topk): a group's score is
    the sum of its two best experts'; only the `topk_group` best groups stay eligible, and the
    `top_k` best experts among them are chosen (highest first).
    """
    n, e = scores.shape
    group_scores = scores.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
    groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    eligible = eligible[:, :, None].expand(n, n_group, e // n_group).reshape(n, e)
    return scores.masked_fill(~eligible, float("-inf")).topk(top_k, dim=-1).indices


class LLaDA2MoeGate(nn.Module):
    """The router: float32 sigmoid scores, biased group-limited top-k, normalised scaled weights."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, d) -> expert indices (N, k), float32 weights (N, k)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (N, E), float32 as published
        scores = torch.sigmoid(logits)
        idx = group_limited_topk(scores + self.expert_bias, self.n_group, self.topk_group, self.top_k)
        weights = scores.gather(1, idx)  # the unbiased scores of the chosen experts
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weights * self.scaling


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (k per token, weighted) + the shared expert (every token)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList(LLaDA2MoeMLP(config, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.gate = LLaDA2MoeGate(config)
        if config.num_shared_experts is not None:  # published: present even at 0 (then 0 wide)
            self.shared_experts = LLaDA2MoeMLP(config, config.moe_intermediate_size * config.num_shared_experts)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)  # (N, d)
        idx, weights = self.gate(flat)  # (N, k) each
        k = idx.shape[1]
        slots = idx.reshape(-1)  # (N k,) the expert of each (token, slot)
        order = slots.argsort(stable=True)  # slots grouped by expert, in token order inside a group
        counts = torch.bincount(slots, minlength=len(self.experts)).tolist()
        groups = flat[order // k].split(counts)  # each expert's tokens
        # A grouped GEMM over all experts' groups would replace this loop on a GPU.
        out = torch.cat([expert(group) for expert, group in zip(self.experts, groups)])  # (N k, d), sorted
        y = torch.empty_like(out).index_copy(0, order, out).view(-1, k, d)  # back in (token, slot) order
        y = (y.float() * weights[..., None]).sum(dim=1).to(x.dtype)  # combined in float32, as published
        y = y.view(b, t, d)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y


class LLaDA2MoeDecoderLayer(nn.Module):
    """x + attention(input_layernorm(x)), then + mlp(post_attention_layernorm(x))."""

    def __init__(self, config: LLaDA2MoeConfig, layer: int) -> None:
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer)
        self.mlp = (LLaDA2MoeSparseMoeBlock(config) if config.is_moe_layer(layer)
                    else LLaDA2MoeMLP(config, config.intermediate_size))
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: KVCache | None = None, cache_start: int = 0) -> Tensor:
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2MoeModel(nn.Module):
    """The published `LLaDA2MoeModel` tree: word_embeddings, layers, norm."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2MoeModelLM(NativeLM):
    """LLaDA2.x LM (`NativeLM`): each token's logits at its own position."""

    config_class = LLaDA2MoeConfig
    body_class = LLaDA2MoeModel
    norm_class = LLaDA2MoeRMSNorm
    _input_embed_layer = "word_embeddings"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]

    @property
    def rope_dim(self) -> int:
        return self.config.rope_dim

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LLaDA2MoeGate):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.expert_bias)
