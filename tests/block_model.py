"""A tiny block-diffusion model for the block-ELBO tests, in float64.

Until the native SDAR family is merged, the built-in model stands in for it under a test-only
family record: its own model_type, block-causal attention, block 4 (SDAR's default), logits at
their own position. Every native model obeys the 4-D masks and position ids the block ELBO passes,
so the built-in one computes exactly what the layout asks of it.
"""

from __future__ import annotations

import dataclasses

import torch

from dlrl.models import build_tiny
from dlrl.models import families as registry
from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.families import tiny

BLOCK = 4


class BlockTinyConfig(BidirectionalConfig):
    model_type = "dlrl_bidirectional_block_test"


FAMILY = dataclasses.replace(tiny.FAMILY, name="tiny-block-test", model_types=(BlockTinyConfig.model_type,),
                             architectures=(), attention="block_causal", block_size=BLOCK)
registry._BY_MODEL_TYPE.setdefault(BlockTinyConfig.model_type, FAMILY)


def block_model(seed: int = 0):
    """(model, tokenizer): a 2-layer block-causal model in float64 and the char tokenizer."""
    base, tok = build_tiny(hidden=32, layers=2, heads=2, seed=seed)
    config = BlockTinyConfig(**{k: v for k, v in base.config.to_dict().items() if k != "model_type"})
    model = BidirectionalModel(config)
    model.load_state_dict(base.state_dict())
    return model.to(torch.float64), tok
