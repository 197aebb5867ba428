"""LLaDA (LLaDA-8B-Base / -Instruct, LLaDA-1.5): native code in dlrl.models.llada.

Published facts this record holds: the OLMo-style config names (d_model, n_layers, ...), the
tensor layout of `modeling_llada.py`, a 2-D key-padding mask (the published forward reshapes it
into an additive key bias), logits at their own position, mask token `<|mdm_mask|>`.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from dlrl.footprint import ModelShape
from dlrl.models.families.family import Family
from dlrl.models.llada import LLaDABlock, LLaDAConfig, LLaDAModelLM


def published_names(cfg: PretrainedConfig) -> dict[str, str]:
    """modeling_llada.py: LLaDAModelLM.model (LLaDAModel).transformer = {wte, blocks[i]
    (LLaDALlamaBlock), ln_f, ff_out (absent when weight_tying)}; q/k/v biases iff include_bias |
    include_qkv_bias. The native module tree is the published one, so the map is the identity."""
    qkv_bias = cfg.include_bias or cfg.include_qkv_bias
    norm_bias = cfg.include_bias if cfg.bias_for_layer_norm is None else cfg.bias_for_layer_norm
    linear = {"q_proj": qkv_bias, "k_proj": qkv_bias, "v_proj": qkv_bias, "attn_out": cfg.include_bias,
              "ff_proj": cfg.include_bias, "up_proj": cfg.include_bias, "ff_out": cfg.include_bias}
    names = ["model.transformer.wte.weight"]
    for i in range(cfg.n_layers):
        block = f"model.transformer.blocks.{i}"
        for proj, bias in linear.items():
            names.append(f"{block}.{proj}.weight")
            if bias:
                names.append(f"{block}.{proj}.bias")
        for norm in ("attn_norm", "ff_norm"):
            if cfg.layer_norm_with_affine:
                names.append(f"{block}.{norm}.weight")
                if norm_bias:
                    names.append(f"{block}.{norm}.bias")
    if cfg.layer_norm_with_affine:
        names.append("model.transformer.ln_f.weight")
        if norm_bias:
            names.append("model.transformer.ln_f.bias")
    if not cfg.weight_tying:
        names.append("model.transformer.ff_out.weight")
        if cfg.include_bias:
            names.append("model.transformer.ff_out.bias")
    return {name: name for name in names}


def logit_scale(cfg: PretrainedConfig) -> float:
    """modeling_llada.py multiplies the head's logits by d_model^-0.5 when `scale_logits` is set."""
    return cfg.d_model ** -0.5 if cfg.scale_logits else 1.0


def shape(cfg: dict) -> ModelShape:
    """configuration_llada.py names; mlp_hidden_size is the width of each of ff_proj and up_proj."""
    heads = cfg["n_heads"]
    return ModelShape(
        vocab=cfg.get("embedding_size") or cfg["vocab_size"], hidden=cfg["d_model"],
        layers=cfg["n_layers"], heads=heads, kv_heads=cfg.get("n_kv_heads") or heads,
        ffn=cfg.get("mlp_hidden_size") or cfg["mlp_ratio"] * cfg["d_model"],
        tied=bool(cfg.get("weight_tying", False)), qkv_bias=bool(cfg.get("include_qkv_bias", False)),
    )


FAMILY = Family(
    name="llada",
    model_types=(LLaDAConfig.model_type,),
    architectures=(LLaDAModelLM.__name__,),
    config_class=LLaDAConfig,
    model_class=LLaDAModelLM,
    published_names=published_names,
    padding_mask="2d",
    final_norm="model.transformer.ln_f",
    logit_scale=logit_scale,
    mask_token="<|mdm_mask|>",
    # The blocks' linear layers. LLaDA's LM head is *also* called `ff_out` (model.transformer.ff_out)
    # and peft matches a list entry against any name suffix, so a list would put an adapter on the
    # 126k-wide head too; a regex anchored on the blocks (peft full-matches a string) avoids that.
    lora_targets=r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    block_class=LLaDABlock,
    shape=shape,
)
