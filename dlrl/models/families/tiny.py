"""The built-in model (`dlrl_bidirectional`, dlrl.models.bidirectional): the CPU stand-in.

It is our own format, so its "published" layout is its module tree. It takes a 2-D padding mask
and derives per-row positions itself; its fused projections (qkv, gate_up) are the LoRA targets.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel, Block
from dlrl.models.families.family import Family, hf_shape
from dlrl.models.tokenizer import SPECIALS


def published_names(cfg: PretrainedConfig) -> dict[str, str]:
    """BidirectionalModel = {embed, blocks[i] (Block), norm, lm_head}; the head is its own tensor
    whatever `tie_word_embeddings` says (the model declares no tied weights)."""
    names = ["embed.weight", "norm.weight", "lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        names += [f"blocks.{i}.{m}.weight" for m in ("attn_norm", "qkv", "out", "mlp_norm", "gate_up", "down")]
    return {name: name for name in names}


FAMILY = Family(
    name="tiny",
    model_types=(BidirectionalConfig.model_type,),
    architectures=(BidirectionalModel.__name__,),
    config_class=BidirectionalConfig,
    model_class=BidirectionalModel,
    published_names=published_names,
    padding_mask="2d",
    final_norm="norm",
    mask_token=SPECIALS["mask"],
    lora_targets=("qkv", "out", "gate_up", "down"),
    block_class=Block,
    shape=hf_shape,
)
