"""The family record: everything that differs between model families, in one frozen value.

Generic code (loading, the forward, special ids, LoRA, per-block sharding, `dlrl plan`) asks the
registry (`dlrl.models.families`) for the record of a config and reads these fields; it never
compares a `model_type` itself. Adding a family is one module that builds a `Family` plus one line
in the registry. A checkpoint no record answers to (remote code, or a plain transformers class)
gets `REMOTE`, whose fields are the generic fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from dlrl.footprint import ModelShape


def hf_shape(cfg: dict, *, qkv_bias: bool | None = None) -> ModelShape:
    """ModelShape from a config.json with Hugging Face names (hidden_size, num_hidden_layers, ...).

    qkv_bias: whether q, k, v carry biases; None reads Llama's `attention_bias` flag (absent = no).
    """
    heads = cfg["num_attention_heads"]
    return ModelShape(
        vocab=cfg["vocab_size"], hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
        heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads, ffn=cfg["intermediate_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)) if qkv_bias is None else qkv_bias,
    )


@dataclass(frozen=True)
class Family:
    """One model family: what it answers to, its code, its published layout and its conventions."""

    name: str
    """Registry key, for messages and tests."""
    model_types: tuple[str, ...] = ()
    """config.json `model_type` values this family answers to (the registry's primary key)."""
    architectures: tuple[str, ...] = ()
    """config.json `architectures` names it answers to, for a config.json without `model_type`."""
    config_class: type[PretrainedConfig] | None = None
    """Native config class (registered with AutoConfig); None: no native code."""
    model_class: type[PreTrainedModel] | None = None
    """Native model class: loaded strictly, by name, without remote code; None: no native code."""
    published_names: Callable[[PretrainedConfig], dict[str, str]] | None = None
    """config -> {published tensor name: native parameter name}: the exact layout a checkpoint of
    this config must have. transformers only warns about a missing tensor and initialises it at
    random, so loading checks the checkpoint against this first."""
    optional_tensors: frozenset[str] = frozenset()
    """Published tensors a checkpoint may carry although the config ties them (dropped on load)."""
    attention: Literal["full", "block_causal"] = "full"
    """Attention pattern: "full" = bidirectional over the whole sequence (LLaDA, Dream);
    "block_causal" = bidirectional inside a block, causal across blocks (block diffusion)."""
    block_size: int | None = None
    """Block length of a block-causal family (the published default); None for full attention."""
    padding_mask: Literal["2d", "4d"] = "4d"
    """How the model takes left padding: a "2d" (B, T) key-padding mask, or a "4d" boolean
    (B, 1, T, T) one. A 2-D mask silently turns many transformers models causal, so unknown
    families get "4d"."""
    logit_shift: int = 0
    """By how many positions the raw logits lag the token they predict (Dream, from Qwen2: 1)."""
    final_norm: str | None = "model.norm"
    """The module whose output the vocabulary head projects (the last hidden states), by its path
    in the model: the learner's ELBO pass captures it there and projects only the rows it sums
    over (dlrl.models.output_head). Hugging Face's Llama/Qwen layout names it `model.norm`.
    None: the layout is not known (a remote-code model), so the ELBO pass takes the model's own
    logits, whatever its forward does after the head (soft-capping, scaling), and only gathers them."""
    logit_scale: Callable[[PretrainedConfig], float] = field(default=lambda config: 1.0)
    """config -> the factor the model's forward multiplies the head's output by (LLaDA's
    `scale_logits`: d_model^-0.5); 1.0 for a plain head."""
    mask_token: str | None = None
    """The [MASK] token's string, for a checkpoint whose config and tokenizer do not declare its id.
    The config's `mask_token_id` wins, then the tokenizer's mask token, then this."""
    lora_targets: tuple[str, ...] | str = "all-linear"
    """Default LoRA targets: module-name suffixes, a full-match regex, or "all-linear"."""
    block_class: type[nn.Module] | None = None
    """The transformer block (the unit FSDP shards and activation checkpointing recomputes);
    None: the classes the model names in `_no_split_modules`."""
    shape: Callable[[dict], ModelShape] = field(default=hf_shape)
    """config.json dict -> the sizes `dlrl plan` and `mc_chunk = "auto"` compute memory from."""

    def __post_init__(self) -> None:
        if (self.attention == "block_causal") != (self.block_size is not None):
            raise ValueError(f"family {self.name}: a block size goes with block-causal attention, and only there")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"family {self.name}: block_size must be >= 1, got {self.block_size}")
        if (self.model_class is None) != (self.config_class is None) or (
            self.model_class is not None and self.published_names is None
        ):
            raise ValueError(f"family {self.name}: native code needs a config class, a model class "
                             "and its published names")

    def block_size_for(self, config: PretrainedConfig | Mapping | None) -> int | None:
        """The block length to run a model of this family with: the config's `block_size` where
        config.json carries one (SDAR's training configs do: 4), else the family's published
        default; None for a full-attention family (a block size there means nothing)."""
        if self.attention != "block_causal":
            return None
        get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
        size = get("block_size") if config is not None else None
        if size is None:
            return self.block_size
        if int(size) < 1:
            raise ValueError(f"family {self.name}: block_size must be >= 1, got {size}")
        return int(size)

    @property
    def native(self) -> bool:
        """Whether dlrl has its own code for this family (no remote code runs)."""
        return self.model_class is not None


REMOTE = Family(name="remote", final_norm=None)
"""Any checkpoint no registered family answers to: a 4-D padding mask, logits at their own
position and taken from its own forward (no head split off), LoRA on every linear layer, blocks from `_no_split_modules`, Hugging Face config names."""
