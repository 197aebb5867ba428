"""LoRA adapters (peft) for the policy: which layers get them, and wrapping a loaded model.

Training only low-rank adapters keeps an 8B learner's optimizer state small and lets a
checkpoint be the adapter alone (a few MB) plus a pointer to the base model.
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from dlrl.config import LoraSpec

# model_type -> the linear layers that get adapters. Names must be those of the family's modules.
# LLaDA (modeling_llada.py, LLaDALlamaBlock): q_proj, k_proj, v_proj, attn_out, ff_proj (gate),
# up_proj, ff_out (down). Its LM head is *also* called `ff_out` (model.transformer.ff_out), and
# peft matches a list entry against any name suffix, so the list form would put an adapter on the
# 126k-wide head too; a regex anchored on the blocks (peft full-matches a string) avoids that.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "dlrl_bidirectional": ["qkv", "out", "gate_up", "down"],
    "llada": r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
}
# Everything else (Dream is Qwen2-shaped): every nn.Linear except the output head.
FALLBACK_TARGET = "all-linear"


def default_target_modules(model_type: str) -> list[str] | str:
    """The adapter targets for a model family (see DEFAULT_TARGETS)."""
    return DEFAULT_TARGETS.get(model_type, FALLBACK_TARGET)


def apply_lora(model: PreTrainedModel, spec: LoraSpec) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapters stay trainable."""
    targets = spec.target_modules
    if targets is None:
        targets = default_target_modules(model.config.model_type)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets
    )
    return get_peft_model(model, config)
