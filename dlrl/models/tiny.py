"""Build untrained tiny models + char tokenizer: the CPU stand-ins for an 8B dLLM (built-in, SDAR).

Tests, benchmarks and the embedded default job use it so that every code path (save, load,
sample, learn) runs in seconds without downloading weights.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.sdar import SDARConfig, SDARForCausalLM
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


def build_tiny_sdar(
    hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int | None = None,
    block_size: int = 4, seed: int = 0,
) -> tuple[SDARForCausalLM, PreTrainedTokenizerBase]:
    """A randomly initialised SDAR-family model (the published Qwen3 body, block-causal) sized for
    the CPU, with the char tokenizer: a real `sdar` checkpoint once saved, for tests and the tiny
    block-diffusion demo.

    Same conventions as `build_tiny` (vocab rounded up to a multiple of 8, SwiGLU 8/3 width,
    weights from a forked RNG seeded with `seed`). head_dim defaults to hidden / heads; a Qwen3
    config may set it apart. The config carries `block_size` and `mask_token_id`, as SDAR's
    training configs do.
    """
    tokenizer = build_char_tokenizer()
    config = SDARConfig(
        vocab_size=round_up(len(tokenizer), 8),
        hidden_size=hidden,
        intermediate_size=round_up(8 * hidden // 3, 8),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim if head_dim is not None else hidden // heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        block_size=block_size,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SDARForCausalLM(config)
    return model, tokenizer
