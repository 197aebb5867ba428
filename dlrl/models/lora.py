"""LoRA adapters (peft) for the policy: which layers get them, and wrapping a loaded model.

Training only low-rank adapters keeps an 8B learner's optimizer state small and lets a
checkpoint be the adapter alone (a few MB) plus a pointer to the base model. Which layers get
adapters by default is the family's (`Family.lora_targets`).
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PretrainedConfig, PreTrainedModel

from dlrl.config import LoraSpec
from dlrl.models.families import family_of


def default_target_modules(config: PretrainedConfig) -> list[str] | str:
    """The adapter targets of the config's family: module-name suffixes, a regex, or "all-linear"."""
    targets = family_of(config).lora_targets
    return targets if isinstance(targets, str) else list(targets)


def apply_lora(model: PreTrainedModel, spec: LoraSpec) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapters stay trainable."""
    targets = spec.target_modules
    if targets is None:
        targets = default_target_modules(model.config)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets
    )
    return get_peft_model(model, config)
