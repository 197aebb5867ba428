"""Padding in the two forms the model families take it: a 4-D boolean mask and per-row positions.

Kept apart from `dlrl.models.forward` because the model classes themselves use these (the built-in
model expands a 2-D mask here), and the forward dispatch imports the family registry, which
imports the model classes.
"""

from __future__ import annotations

import torch


def padding_to_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, T, T) bool: every query sees every real key.

    Padded queries see the real keys too (Dream's own mask blanks their rows): an all-False row
    gives NaN in some SDPA kernels, and a NaN in a pad position's value leaks into real ones.
    """
    keep = attention_mask.bool()
    return keep[:, None, None, :].expand(-1, 1, keep.shape[1], -1)


def padding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, T) position ids counting from each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
