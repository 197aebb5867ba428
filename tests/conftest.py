"""Shared fixtures: tiny real models of the project (never mocks)."""

from __future__ import annotations

import pytest
import torch

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel


@pytest.fixture
def tiny_model_f64() -> BidirectionalModel:
    """A 2-layer built-in model in float64, for exact-equivalence checks."""
    torch.manual_seed(0)
    cfg = BidirectionalConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64,
                              initializer_range=0.2)
    return BidirectionalModel(cfg).double()
