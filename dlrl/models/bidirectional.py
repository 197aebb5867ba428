"""The built-in LLaDA-style masked-diffusion transformer.

A small, dependency-free stand-in for LLaDA's architecture (RMSNorm, rotary positions, SwiGLU,
non-causal scaled-dot-product attention) written as a `transformers` `PreTrainedModel`, so that
`save_pretrained` / `from_pretrained` round-trip through safetensors and every code path that
serves an 8B remote-code checkpoint also serves the tiny CPU model used in tests and the
embedded default job.

Attention is bidirectional everywhere. Padding is expressed with a 4-D boolean mask
(B, 1, T, T) (True = may attend); a 2-D (B, T) padding mask is accepted too and expanded here,
together with position ids that start at each row's first real token, so a left-padded batch
gives the same logits as its rows run one by one.

KV cache (the contract of `dlrl.models.kv_cache`, shared with the native LLaDA / Dream code):
`forward(ids, attention_mask=(B, 1, q, T) bool, position_ids=(B, q), kv_cache=cache,
cache_start=s)` treats `ids` (B, q) as positions [s, s + q); each block writes its RoPE'd keys
and values for them into the cache and attends its q queries to all T cached keys. A cached
block step of a sampler thus costs q positions, not T. `logits_to_keep` (HF's name; here a
1-D index tensor or a `slice` into the q forwarded positions) projects only the positions a
sampler can commit onto the vocabulary: at LLaDA's 126,464-token vocabulary the head's output,
not the body, is what dominates a step's memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from dlrl.models.kv_cache import KVCache
from dlrl.models.padding import padding_positions, padding_to_4d


class BidirectionalConfig(PretrainedConfig):
    """Shape of the built-in masked-diffusion transformer; ids of its special tokens."""

    model_type = "dlrl_bidirectional"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 344,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        mask_token_id: int = 2,
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs of channels of x (B, H, T, D) by angles position · theta^(-2i/D)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.float()[:, None, :, None] * inv_freq  # (B, 1, T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: BidirectionalConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.theta = cfg.rope_theta
        self.attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.out = nn.Linear(h, h, bias=False)
        self.mlp_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: tuple[KVCache, int, int] | None = None,
    ) -> torch.Tensor:
        """x (B, q, h) at `positions` (B, q); cache = (kv_cache, layer, start) or None."""
        b, t, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, h // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, q, D)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        if cache is not None:
            kv_cache, layer, start = cache
            k, v = kv_cache.update(layer, k, v, start)  # (B, H, T, D): cached keys + these
        # Non-causal: every token sees every (unpadded) token, as in LLaDA.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, h))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class BidirectionalModel(PreTrainedModel):
    """Masked-diffusion LM: `model(input_ids, attention_mask=None).logits` is (B, T, V)."""

    config_class = BidirectionalConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _no_split_modules = ["Block"]

    def __init__(self, config: BidirectionalConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int = 0,
        logits_to_keep: torch.Tensor | slice | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """Logits (B, q, V) of input_ids (B, q) at positions [cache_start, cache_start + q).

        With a `kv_cache` the attention mask, if given, must be the 4-D (B, 1, q, T) one (a 2-D
        padding mask cannot say which cached keys are padding). `logits_to_keep` selects which of
        the q positions get logits (all of them by default).
        """
        b, t = input_ids.shape
        if kv_cache is not None and attention_mask is not None and attention_mask.dim() == 2:
            raise ValueError("with a kv_cache, pass the 4-D (B, 1, q, T) attention mask, not a 2-D padding mask")
        if labels is not None and logits_to_keep is not None:
            raise ValueError("labels need the logits of every position: do not pass logits_to_keep")
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = padding_to_4d(attention_mask)
            position_ids = padding_positions(attention_mask) if position_ids is None else position_ids
        elif attention_mask is not None:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask > 0
        if position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids)
        for layer, block in enumerate(self.blocks):
            x = block(x, position_ids, mask, None if kv_cache is None else (kv_cache, layer, cache_start))
        if logits_to_keep is not None:
            x = x[:, logits_to_keep]
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            # Masked-token cross entropy (labels = -100 where not masked), as in MDM pre-training.
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
