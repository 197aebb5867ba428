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
pass ([analysis] in §2: the shared t correlates the blocks, it does not bias the sum). The
forward carries only the columns the response's terms depend on (`bd3_columns`): the noisy half
from the first response token's block on, the clean half without its last block.
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
    sliced before any log-softmax. The forward carries only the columns the kept positions depend
    on (`bd3_columns`), so its logits equal those of the whole 2T layout. Only families whose
    logits sit at their own position (`Family.logit_shift == 0`, SDAR and LLaDA2) are defined here.
    """
    inputs, mask, positions, keep = _bd3_inputs(model, noisy, clean, attention, block_size, keep)
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
    inputs, mask, positions, keep = _bd3_inputs(model, noisy, clean, attention, block_size, keep)
    sliced = _accepts(type(_unwrapped(model)).forward, "logits_to_keep")
    with head_input(model) as seen:
        if sliced:
            model(inputs, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
        else:
            model(inputs, attention_mask=mask, position_ids=positions)
    return seen[-1] if sliced else seen[-1][:, keep]


def bd3_columns(attention: torch.Tensor, first: int, block_size: int) -> tuple[int, int]:
    """(noisy_from, clean_to): the columns of [x_t ; x_0] that the noisy positions first..T-1 depend on.

    The layout is exact when cropped to noisy columns noisy_from..T-1 and clean columns
    0..clean_to-1, for every row at once:
    * a noisy column in a block before the one holding `first` (in its row's grid) is attended
      only by noisy queries of its own block (M_BD) -- prompt positions, never scored -- and clean
      queries never attend the noisy half; noisy_from is the earliest such block start over rows
      (left padding shifts each row's grid), so every row keeps at least its own first block;
    * a clean column in the last block is attended only by clean queries of that block (M_BC):
      noisy queries see strictly earlier clean blocks (M_OBC); clean_to is the latest start of a
      row's last block, so what is dropped lies in the last block of every row.
    With a long prompt the forward thus carries about T + L + B tokens instead of 2T (L response
    tokens, B the block size): SDAR's math prompts are hundreds of tokens.
    """
    t = attention.shape[1]
    if not 0 <= first < t:
        raise ValueError(f"the first scored position {first} is outside the {t} columns")
    offset = padding_positions(attention) % block_size  # each column's place inside its row's block
    noisy_from = int((first - offset[:, first]).min())
    clean_to = int((t - 1 - offset[:, t - 1]).max())
    return noisy_from, clean_to


def _bd3_inputs(
    model: torch.nn.Module, noisy: torch.Tensor, clean: torch.Tensor, attention: torch.Tensor, block_size: int,
    keep: slice,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice]:
    """[x_t ; x_0] cropped to `bd3_columns`, its BD3-LM mask and position ids, and `keep` in its columns."""
    if model_family(model).logit_shift != 0:
        raise ValueError("the BD3-LM layout reads each token's logits at its own position: "
                         "a family with shifted logits has no block ELBO here")
    if noisy.shape != clean.shape or noisy.shape != attention.shape:
        raise ValueError(f"noisy {tuple(noisy.shape)}, clean {tuple(clean.shape)} and attention "
                         f"{tuple(attention.shape)} must be the same (B, T)")
    t = noisy.shape[1]
    start, stop, step = keep.indices(t)
    if step != 1 or stop != t or start >= stop:
        raise ValueError(f"keep must be a slice of the noisy half's last positions, got {keep}")
    noisy_from, clean_to = bd3_columns(attention, start, block_size)
    padded = not bool(attention.all())
    # Unpadded rows share one (1, 1, N + C, N + C) mask, broadcast over the batch.
    mask = bd3_mask(attention if padded else None, t, block_size, device=noisy.device,
                    noisy_from=noisy_from, clean_to=clean_to)
    positions = padding_positions(attention)
    positions = torch.cat([positions[:, noisy_from:], positions[:, :clean_to]], dim=1)
    inputs = torch.cat([noisy[:, noisy_from:], clean[:, :clean_to]], dim=1)
    return inputs, mask, positions, slice(start - noisy_from, t - noisy_from)


__all__ = ["bd3_columns", "bd3_hidden", "bd3_logits", "block_size_of"]
