"""Model adapters: the built-in model, native LLaDA and Dream, loading, LoRA, special ids.

Importing this package registers the built-in model and the native LLaDA / Dream classes with the
transformers Auto classes, so plain `AutoModel.from_pretrained(dir)` (and `load_model(dir)`) open
a saved checkpoint of any of them without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.dream import DreamConfig, DreamModel
from dlrl.models.llada import LLaDAConfig, LLaDAModelLM
from dlrl.models.checkpoint import load_trainable, save_checkpoint
from dlrl.models.forward import MASK_STYLE, diffusion_logits
from dlrl.models.loading import CheckpointNotFoundError, load_model
from dlrl.models.lora import LoraSpec, default_target_modules
from dlrl.models.special_ids import SpecialIds, special_ids
from dlrl.models.tiny import build_tiny
from dlrl.models.tokenizer import build_char_tokenizer

AutoConfig.register(BidirectionalConfig.model_type, BidirectionalConfig, exist_ok=True)
AutoModel.register(BidirectionalConfig, BidirectionalModel, exist_ok=True)
AutoModelForMaskedLM.register(BidirectionalConfig, BidirectionalModel, exist_ok=True)
for _config, _model in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForMaskedLM.register(_config, _model, exist_ok=True)

__all__ = [
    "MASK_STYLE",
    "BidirectionalConfig",
    "BidirectionalModel",
    "CheckpointNotFoundError",
    "DreamConfig",
    "DreamModel",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LoraSpec",
    "SpecialIds",
    "build_char_tokenizer",
    "build_tiny",
    "default_target_modules",
    "diffusion_logits",
    "load_model",
    "load_trainable",
    "save_checkpoint",
    "special_ids",
]
