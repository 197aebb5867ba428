"""Build an untrained tiny built-in model + char tokenizer: the CPU stand-in for an 8B dLLM.

Tests, benchmarks and the embedded default job use it so that every code path (save, load,
sample, learn) runs in seconds without downloading weights.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.tokenizer import build_char_tokenizer


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_tiny(
    hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0
) -> tuple[BidirectionalModel, PreTrainedTokenizerBase]:
    """A randomly initialised built-in model whose vocab and special ids match the char tokenizer.

    The vocab is rounded up to a multiple of 8 (tensor-core friendly); the spare rows are never
    produced by the tokenizer. Initialisation draws from a forked RNG seeded with `seed`, so the
    same seed gives the same weights and the caller's global RNG is left untouched.
    """
    tokenizer = build_char_tokenizer()
    config = BidirectionalConfig(
        vocab_size=round_up(len(tokenizer), 8),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=round_up(8 * hidden // 3, 8),  # SwiGLU's usual 8/3 expansion
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BidirectionalModel(config)
    return model, tokenizer
