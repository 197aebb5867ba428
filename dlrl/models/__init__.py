"""Model adapters: the model families (built-in, native LLaDA, Dream, SDAR and LLaDA2.x), loading, LoRA,
special ids.

Importing this package registers every family with native code (dlrl.models.families) with the
transformers Auto classes, so plain `AutoModel.from_pretrained(dir)` (and `load_model(dir)`) open
a saved checkpoint of any of them without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.checkpoint import load_trainable, save_checkpoint
from dlrl.models.dream import DreamConfig, DreamModel
from dlrl.models.families import FAMILIES, Family, family_of
from dlrl.models.forward import diffusion_logits
from dlrl.models.llada import LLaDAConfig, LLaDAModelLM
from dlrl.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM
from dlrl.models.loading import CheckpointNotFoundError, load_empty_model, load_model
from dlrl.models.sdar import SDARConfig, SDARForCausalLM
from dlrl.models.lora import LoraSpec, default_target_modules
from dlrl.models.special_ids import SpecialIds, special_ids
from dlrl.models.tiny import build_tiny, build_tiny_llada2, build_tiny_sdar
from dlrl.models.tokenizer import build_char_tokenizer

for _family in FAMILIES:
    if _family.native:
        AutoConfig.register(_family.config_class.model_type, _family.config_class, exist_ok=True)
        AutoModel.register(_family.config_class, _family.model_class, exist_ok=True)
        AutoModelForMaskedLM.register(_family.config_class, _family.model_class, exist_ok=True)

__all__ = [
    "FAMILIES",
    "BidirectionalConfig",
    "BidirectionalModel",
    "CheckpointNotFoundError",
    "DreamConfig",
    "DreamModel",
    "Family",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModelLM",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LoraSpec",
    "SDARConfig",
    "SDARForCausalLM",
    "SpecialIds",
    "build_char_tokenizer",
    "build_tiny",
    "build_tiny_llada2",
    "build_tiny_sdar",
    "default_target_modules",
    "diffusion_logits",
    "family_of",
    "load_empty_model",
    "load_model",
    "load_trainable",
    "save_checkpoint",
    "special_ids",
]
