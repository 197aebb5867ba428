"""The block ELBO's forward: a block-diffusion model scored on the BD3-LM training layout.

Block-diffusion families (SDAR / TraDo, LLaDA2.x; `Family.attention == "block_causal"`) are trained
on [x_t ; x_0]: the noisy sequence and the clean one side by side (2T tokens), the same position
ids in both halves, under the three-part mask M_BD | M_OBC | M_BC (`dlrl.models.block_mask.bd3_mask`,
on the global block grid); the loss is read from the noisy half at masked response positions, each
against the clean token at the same position (SDAR and LLaDA2 predict a token at its own position).
Sources: LLaDA2.0 report Eq. 3, SDAR `block_diff_mask` / `prepare_for_bd_training`
(JetAstra/SDAR@c2041a8:training/model/SDAR-4B-Chat/modeling_sdar.py, 286-327 and 1069-1110), DARE's
`block_diffusion_utils.py` (yjyddq/DARE@83ae8a3); reference/block-diffusion.md §2.

One forward thus gives every block b its term log p(y_b | x, y_<b, y~_b): noisy block b sees its
own noisy block (M_BD) and the clean blocks before it (M_OBC), and the clean half is the same
block-causal prefix a sampler's KV cache holds (M_BC). With one mask level t shared by all blocks,
the per-block ELBO is the sum over blocks of each block's ELBO at that t, which this sums in one
pass ([analysis] in §2: the shared t correlates the blocks, it does not bias the sum).
`dlrl.elbo_terms` and diffu-GRPO's one-step estimate call `bd3_hidden` (the same forward without
the vocabulary head; they project only the rows they score) and SFT calls `bd3_logits` whenever
the model's family is block-causal (`block_size_of`); full-attention families never reach this module.
"""

from __future__ import annotations

import torch

from dlrl.models.block_mask import bd3_mask
from dlrl.models.families import model_family
from dlrl.models.forward import _accepts, _unwrapped, head_input
from dlrl.models.padding import padding_positions


def block_size_of(model: torch.nn.Module) -> int | None:
    """The block size the model was trained with if its family is block-causal, else None.

    The config's `block_size` (SDAR's training config carries one), else the family's published
    default (`Family.block_size_for`)."""
    return model_family(model).block_size_for(_unwrapped(model).config)


def bd3_logits(
    model: torch.nn.Module, noisy: torch.Tensor, clean: torch.Tensor, attention: torch.Tensor,
    block_size: int, keep: slice,
) -> torch.Tensor:
    """Logits (B, |keep|, V) of the noisy half's positions `keep` from one forward of [noisy ; clean].

    noisy, clean (B, T) token ids (left-padded rows: both halves padded alike); attention (B, T)
    1/0 padding. Position ids count from each row's first real token in both halves, so the block
    grid and a row's logits are those of the row alone (`padding_positions`). A model whose forward
    takes `logits_to_keep` projects only the kept positions onto the vocabulary; the others are
    sliced before any log-softmax. Only families whose logits sit at their own position
    (`Family.logit_shift == 0`, SDAR and LLaDA2) are defined here.
    """
    inputs, mask, positions = _bd3_inputs(model, noisy, clean, attention, block_size)
    if _accepts(type(_unwrapped(model)).forward, "logits_to_keep"):
        return model(inputs, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return model(inputs, attention_mask=mask, position_ids=positions).logits[:, keep]


def bd3_hidden(
    model: torch.nn.Module, noisy: torch.Tensor, clean: torch.Tensor, attention: torch.Tensor,
    block_size: int, keep: slice,
) -> torch.Tensor:
    """The last hidden states (B, |keep|, d) of the noisy half's positions `keep`, from the forward
    `bd3_logits` runs, with no position projected onto the vocabulary: the head applied to row i
    gives that forward's logits at keep's i-th position (the caller projects the rows it sums over:
    dlrl.models.output_head). A model that takes `logits_to_keep` normalises only those positions."""
    inputs, mask, positions = _bd3_inputs(model, noisy, clean, attention, block_size)
    sliced = _accepts(type(_unwrapped(model)).forward, "logits_to_keep")
    with head_input(model) as seen:
        if sliced:
            model(inputs, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
        else:
            model(inputs, attention_mask=mask, position_ids=positions)
    return seen[-1] if sliced else seen[-1][:, keep]


def _bd3_inputs(
    model: torch.nn.Module, noisy: torch.Tensor, clean: torch.Tensor, attention: torch.Tensor, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[noisy ; clean] (B, 2T), its BD3-LM mask and position ids (see `bd3_logits`)."""
    if model_family(model).logit_shift != 0:
        raise ValueError("the BD3-LM layout reads each token's logits at its own position: "
                         "a family with shifted logits has no block ELBO here")
    if noisy.shape != clean.shape or noisy.shape != attention.shape:
        raise ValueError(f"noisy {tuple(noisy.shape)}, clean {tuple(clean.shape)} and attention "
                         f"{tuple(attention.shape)} must be the same (B, T)")
    t = noisy.shape[1]
    padded = not bool(attention.all())
    # Unpadded rows share one (1, 1, 2T, 2T) mask, broadcast over the batch.
    mask = bd3_mask(attention if padded else None, t, block_size, device=noisy.device)
    positions = padding_positions(attention).repeat(1, 2)
    return torch.cat([noisy, clean], dim=1), mask, positions


__all__ = ["bd3_hidden", "bd3_logits", "block_size_of"]
