"""Build untrained tiny models + char tokenizer: the CPU stand-ins for an 8B dLLM (built-in, SDAR, LLaDA2.x).

Tests, benchmarks and the embedded default job use it so that every code path (save, load,
sample, learn) runs in seconds without downloading weights.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM, LLaDA2MoeSparseMoeBlock
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


def build_tiny_llada2(
    hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, experts: int = 8,
    experts_per_token: int = 2, seed: int = 0,
) -> tuple[LLaDA2MoeModelLM, PreTrainedTokenizerBase]:
    """A randomly initialised tiny LLaDA2 (every published feature at toy size) + the char tokenizer.

    One dense first layer, then MoE layers of `experts` routed experts in 2 groups (1 eligible per
    token) with `experts_per_token` chosen, 1 shared expert, q/k norm, RoPE on half of each head.
    Mask / pad / EOS ids are the tokenizer's. Initialisation draws from a forked RNG seeded with
    `seed` (the caller's global RNG is untouched); the router bias is random too, so routing
    depends on it as in a trained checkpoint.
    """
    tokenizer = build_char_tokenizer()
    config = LLaDA2MoeConfig(
        vocab_size=round_up(len(tokenizer), 8), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, num_experts=experts, num_experts_per_tok=experts_per_token,
        num_shared_experts=1, n_group=2, topk_group=1, moe_intermediate_size=hidden // 2,
        first_k_dense_replace=1, rotary_dim=None, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDA2MoeModelLM(config)
        with torch.no_grad():
            for layer in model.model.layers:
                if isinstance(layer.mlp, LLaDA2MoeSparseMoeBlock):
                    layer.mlp.gate.expert_bias.normal_(std=0.1)
    return model, tokenizer
