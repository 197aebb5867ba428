"""The `PreTrainedModel` shell shared by the native Dream, SDAR and LLaDA2.x models.

The three published trees have one shape: `model` = {an embedding, `layers` (each
`layer(x, cos, sin, mask, kv_cache, cache_start)`), a final `norm`}, then `lm_head`, absent when
the config ties it to the embedding (`tie_word_embeddings`). `NativeLM` is that shape once: it
builds the body and the optional head, initialises them, and runs the forward every family runs
(RoPE tables, SDPA mask, the layers, the final norm over the kept positions, the head). A family
names its body class, its norm class, the attribute its body keeps the embedding under, and its
RoPE width. Module names are the published ones (`model.*`, `lm_head`), so checkpoints load
strictly by name; nothing here adds a tensor.

The native LLaDA 8B (`dlrl.models.llada`) keeps the head inside its body (`transformer.ff_out`),
scales logits and drops embeddings, and the built-in model (`dlrl.models.bidirectional`) rotates
channel pairs: each keeps its own shell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from dlrl.models.attention import default_positions, keep_logits, rope_cos_sin, sdpa_mask
from dlrl.models.kv_cache import KVCache


class NativeLM(PreTrainedModel):
    """`model(input_ids, attention_mask, position_ids).logits` is (B, q, V), RAW (whether logit i
    predicts token i or i + 1 is the family's `logit_shift`, applied by `dlrl.models.forward`).

    attention_mask: None (every query sees every key), (B, T) padding, or (B, 1, q, T) bool
    (True = may attend) / additive; block-causal attention is such a mask
    (`dlrl.models.block_mask`), the model adds none of its own. kv_cache / cache_start: the
    `dlrl.models.kv_cache` contract. logits_to_keep: which of the q positions reach the head.

    A subclass sets `config_class`, `body_class` (a module with the embedding, `layers`, `norm`),
    `norm_class` (initialised to ones), `_input_embed_layer` (HF's name for the attribute of the
    body holding the embedding), `_no_split_modules`, and `rope_dim`.
    """

    base_model_prefix = "model"
    _supports_sdpa = True
    body_class: type[nn.Module]
    norm_class: type[nn.Module]

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.model = self.body_class(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def rope_dim(self) -> int:
        """How many channels of each head RoPE rotates."""
        raise NotImplementedError

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights, zero biases and padding row, unit norm gains:
        what the published files do, for a model built from a config rather than loaded."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if getattr(module, "padding_idx", None) is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, self.norm_class):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self.model, self._input_embed_layer)

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        setattr(self.model, self._input_embed_layer, value)

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.lm_head

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
        m, embed = self.model, self.get_input_embeddings()
        if position_ids is None:
            position_ids = default_positions(input_ids, cache_start)
        cos, sin = rope_cos_sin(position_ids, self.rope_dim, self.config.rope_theta)
        x = embed(input_ids)
        mask = sdpa_mask(attention_mask, x.dtype)
        for layer in m.layers:
            x = layer(x, cos, sin, mask, kv_cache, cache_start)
        x = m.norm(keep_logits(x, logits_to_keep))
        logits = F.linear(x, embed.weight) if self.lm_head is None else self.lm_head(x)
        return MaskedLMOutput(logits=logits)
