"""SDAR (JetLM/SDAR-*-Chat) and TraDo (Gen-Verse/TraDo-*): native code in dlrl.models.sdar.

Published facts this record holds (../reference/block-diffusion.md §1, §3):
- Qwen3's config names and tensor layout, with per-head q/k norms and head_dim from the config
  (`yjyddq/DARE@f4999da:models/SDAR-1.7B-Chat/modeling_sdar.py`);
- block-causal attention, block size 4 by default (SDAR `generate.py` CLI, the training configs'
  `block_size: 4`, dLLM-RL's TraDo settings); a config's own `block_size` wins
  (`Family.block_size_for`): the 8/16/32/64 variants carry theirs;
- mask token `<MASK>` (id 151669 in `added_tokens.json` and the training config's
  `mask_token_id`, which wins when present);
- every token predicted at its own position (no shift); a 4-D boolean mask (the published
  attention takes the 4-D mask it is given and builds none from a 2-D one).
"""

from __future__ import annotations

from dataclasses import replace

from transformers import PretrainedConfig

from dlrl.footprint import ModelShape
from dlrl.models.families.family import Family, hf_shape
from dlrl.models.sdar import SDARConfig, SDARDecoderLayer, SDARForCausalLM

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def published_names(cfg: PretrainedConfig) -> dict[str, str]:
    """modeling_sdar.py: SDARForCausalLM = {model (SDARModel: embed_tokens, layers[i]
    (SDARDecoderLayer: self_attn {q,k,v,o}_proj + q_norm/k_norm, mlp, two norms), norm), lm_head};
    `attention_bias` puts a bias on all four projections. Identity map."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}"
        for proj in ATTENTION:
            names.append(f"{layer}.self_attn.{proj}.weight")
            if cfg.attention_bias:
                names.append(f"{layer}.self_attn.{proj}.bias")
        names += [f"{layer}.self_attn.{norm}.weight" for norm in ("q_norm", "k_norm")]
        names += [f"{layer}.mlp.{proj}.weight" for proj in MLP]
        names += [f"{layer}.{norm}.weight" for norm in ("input_layernorm", "post_attention_layernorm")]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return {name: name for name in names}


def shape(cfg: dict) -> ModelShape:
    """Hugging Face names plus Qwen3's: head_dim from the config (absent: hidden / heads), q/k
    norms in every block, `attention_bias` on q, k, v and o."""
    bias = bool(cfg.get("attention_bias", False))
    return replace(hf_shape(cfg, qkv_bias=bias), head_dim=cfg.get("head_dim"), qk_norm=True, out_bias=bias)


FAMILY = Family(
    name="sdar",
    model_types=(SDARConfig.model_type,),
    architectures=(SDARForCausalLM.__name__,),
    config_class=SDARConfig,
    model_class=SDARForCausalLM,
    published_names=published_names,
    optional_tensors=frozenset({"lm_head.weight"}),
    attention="block_causal",
    block_size=4,
    padding_mask="4d",
    logit_shift=0,
    mask_token="<MASK>",
    lora_targets=ATTENTION + MLP,  # every projection of every block; never the head
    block_class=SDARDecoderLayer,
    shape=shape,
)
