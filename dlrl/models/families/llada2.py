"""LLaDA2.x (LLaDA2.0-mini, LLaDA2.1-mini; `llada2_moe`): native code in dlrl.models.llada2.

Published facts this record holds (../reference/block-diffusion.md §1, §4):
- the tensor layout of `modeling_llada2_moe.py` (yjyddq/DARE@7016e0e:models/LLaDA2.0-mini/), which
  the published `model.safetensors.index.json` lists: `model.word_embeddings`, per layer
  `attention.{query_key_value, query_layernorm, key_layernorm, dense}`, a dense `mlp.{gate,up,down}_proj`
  in the first `first_k_dense_replace` layers and `mlp.{gate.weight, gate.expert_bias,
  experts.J.{gate,up,down}_proj, shared_experts.{gate,up,down}_proj}` after, `model.norm`, `lm_head`;
- block-causal attention with block 32: not in config.json; it is the published `generate`'s
  `block_length` default and DARE's LLaDA2-mini recipe (`recipe/llada2_mini/run_bgpo_llada2_mini.sh`,
  block 32);
- mask token `<|mask|>` (id 156895: `generate`'s `mask_id` default, the tokenizer's mask token, DARE's
  recipe), EOS = pad = `<|endoftext|>` 156892 (`generate`'s `eos_id`, config `pad_token_id`);
- the published forward takes only a 4-D (B, 1, L, L) mask, and each token's logits sit at its
  own position (its SFT loss compares logits and labels position for position).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from dlrl.footprint import ModelShape
from dlrl.models.families.family import Family
from dlrl.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeDecoderLayer, LLaDA2MoeModelLM


def published_names(cfg: PretrainedConfig) -> dict[str, str]:
    """modeling_llada2_moe.py: LLaDA2MoeModelLM = {model (LLaDA2MoeModel: word_embeddings, layers[i]
    (LLaDA2MoeDecoderLayer), norm), lm_head}. The router's `expert_bias` is a persistent buffer, so
    the checkpoint carries it (bf16 in 2.0-mini, float32 in 2.1-mini). Identity map."""
    names = ["model.word_embeddings.weight", "model.norm.weight"]
    swiglu = ("gate_proj", "up_proj", "down_proj")
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}"
        names.append(f"{layer}.attention.query_key_value.weight")
        if cfg.use_qkv_bias:
            names.append(f"{layer}.attention.query_key_value.bias")
        if cfg.use_qk_norm:
            names += [f"{layer}.attention.query_layernorm.weight", f"{layer}.attention.key_layernorm.weight"]
        names.append(f"{layer}.attention.dense.weight")
        if cfg.use_bias:
            names.append(f"{layer}.attention.dense.bias")
        names += [f"{layer}.{norm}.weight" for norm in ("input_layernorm", "post_attention_layernorm")]
        if not cfg.is_moe_layer(i):
            names += [f"{layer}.mlp.{proj}.weight" for proj in swiglu]
            continue
        names += [f"{layer}.mlp.gate.weight", f"{layer}.mlp.gate.expert_bias"]
        names += [f"{layer}.mlp.experts.{j}.{proj}.weight" for j in range(cfg.num_experts) for proj in swiglu]
        if cfg.num_shared_experts is not None:
            names += [f"{layer}.mlp.shared_experts.{proj}.weight" for proj in swiglu]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return {name: name for name in names}


def shape(cfg: dict) -> ModelShape:
    """The sizes `dlrl plan` needs, read through the config class so absent keys take the same
    defaults as the model (use_qk_norm, for one, is not in the published config.json)."""
    c = LLaDA2MoeConfig.from_dict(cfg)
    moe = c.num_experts is not None
    return ModelShape(
        vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads, ffn=c.intermediate_size or 0, tied=c.tie_word_embeddings,
        qkv_bias=c.use_qkv_bias, head_dim=c.head_dim, qk_norm=c.use_qk_norm, out_bias=c.use_bias,
        experts=c.num_experts if moe else 0, experts_per_token=c.num_experts_per_tok if moe else 0,
        shared_experts=(c.num_shared_experts or 0) if moe else 0,
        expert_ffn=c.moe_intermediate_size if moe else 0,
        dense_layers=min(c.first_k_dense_replace, c.num_hidden_layers) if moe else c.num_hidden_layers,
    )


FAMILY = Family(
    name="llada2",
    model_types=(LLaDA2MoeConfig.model_type,),
    architectures=(LLaDA2MoeModelLM.__name__,),
    config_class=LLaDA2MoeConfig,
    model_class=LLaDA2MoeModelLM,
    published_names=published_names,
    optional_tensors=frozenset({"lm_head.weight"}),
    attention="block_causal",
    block_size=32,
    padding_mask="4d",
    logit_shift=0,
    mask_token="<|mask|>",
    # Attention (fused q/k/v and its output) and every SwiGLU linear: the dense layers', each routed
    # expert's and the shared expert's. Not the router (`mlp.gate`, not an nn.Linear: adapting it
    # would move routing) and not the head.
    lora_targets=("query_key_value", "dense", "gate_proj", "up_proj", "down_proj"),
    block_class=LLaDA2MoeDecoderLayer,
    shape=shape,
)
