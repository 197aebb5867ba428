"""Dream (Dream-v0-Base / -Instruct-7B): native code in dlrl.models.dream.

Published facts this record holds: Qwen2's config names and tensor layout with q/k/v biases, a 4-D
boolean padding mask (Dream's generation code builds one), logits that lag by one position (hidden
state i predicts token i + 1, as in the Qwen2.5 it starts from), mask token `<|mask|>`.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from dlrl.footprint import ModelShape
from dlrl.models.dream import DreamConfig, DreamDecoderLayer, DreamModel
from dlrl.models.families.family import Family, hf_shape


def published_names(cfg: PretrainedConfig) -> dict[str, str]:
    """modeling_dream.py: DreamModel = {model (DreamBaseModel: embed_tokens, layers[i]
    (DreamDecoderLayer), norm), lm_head}; Qwen2 biases on q/k/v only. Identity map."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            names += [f"{layer}.self_attn.{proj}.weight", f"{layer}.self_attn.{proj}.bias"]
        names.append(f"{layer}.self_attn.o_proj.weight")
        names += [f"{layer}.mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{layer}.{norm}.weight" for norm in ("input_layernorm", "post_attention_layernorm")]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return {name: name for name in names}


def shape(cfg: dict) -> ModelShape:
    """Hugging Face names; Qwen2-shaped, so q, k and v carry biases (no config flag says so)."""
    return hf_shape(cfg, qkv_bias=True)


FAMILY = Family(
    name="dream",
    model_types=(DreamConfig.model_type,),
    architectures=(DreamModel.__name__,),
    config_class=DreamConfig,
    model_class=DreamModel,
    published_names=published_names,
    optional_tensors=frozenset({"lm_head.weight"}),
    padding_mask="4d",
    logit_shift=1,
    mask_token="<|mask|>",
    lora_targets="all-linear",  # every nn.Linear but the output head: the Qwen2 projections
    block_class=DreamDecoderLayer,
    shape=shape,
)
