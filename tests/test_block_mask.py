"""The block-diffusion masks against their definitions, entry by entry.

The reference here is the case list of the BD3-LM mask as the LLaDA2.0 report (Eq. 3) and SDAR's
`block_diff_mask` (JetAstra/SDAR@c2041a8:training/model/SDAR-4B-Chat/modeling_sdar.py:286-327)
state it, on indices of the 2L input, written as plain loops: not the tensor code under test.
"""

from __future__ import annotations

import pytest
import torch

from dlrl.models.block_mask import bd3_mask, block_causal_mask, grid_blocks


def _bd3_by_definition(L: int, B: int) -> torch.Tensor:
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for i in range(2 * L):
        for j in range(2 * L):
            i_noisy, j_noisy = i < L, j < L
            bi, bj = (i if i_noisy else i - L) // B, (j if j_noisy else j - L) // B
            if i_noisy and j_noisy:
                m[i, j] = bi == bj  # M_BD
            elif i_noisy and not j_noisy:
                m[i, j] = bi > bj  # M_OBC
            elif not i_noisy and not j_noisy:
                m[i, j] = bi >= bj  # M_BC
    return m


@pytest.mark.parametrize(("L", "B"), [(8, 4), (7, 4), (6, 1), (5, 8), (9, 3)])
def test_bd3_mask_is_the_published_case_list(L: int, B: int) -> None:
    assert torch.equal(bd3_mask(None, L, B)[0, 0], _bd3_by_definition(L, B))


@pytest.mark.parametrize(("L", "B"), [(8, 4), (7, 3), (4, 4)])
def test_block_causal_mask_is_bidirectional_in_a_block_causal_across(L: int, B: int) -> None:
    m = block_causal_mask(None, L, B)[0, 0]
    for i in range(L):
        for j in range(L):
            assert bool(m[i, j]) == (j // B <= i // B)
    # The clean half of the BD3 layout is this mask (training's M_BC is what decoding sees).
    assert torch.equal(bd3_mask(None, L, B)[0, 0, L:, L:], m)


def test_left_padding_keeps_the_grid_of_the_row_alone() -> None:
    B, pad, real = 4, 3, 6
    attention = torch.tensor([[0] * pad + [1] * real, [1] * (pad + real)])
    T = pad + real
    assert grid_blocks(attention, T, B)[0, pad:].tolist() == [k // B for k in range(real)]
    alone = block_causal_mask(None, real, B)[0, 0]
    padded = block_causal_mask(attention, T, B)[0, 0]
    assert torch.equal(padded[pad:, pad:], alone)
    assert not padded[:, :pad].any()  # pads are never keys
    assert padded[:pad].any(-1).all()  # a pad query still sees a real key (no all-False row)
    alone2 = bd3_mask(None, real, B)[0, 0]
    padded2 = bd3_mask(attention, T, B)[0, 0]
    rows = torch.cat([torch.arange(pad, T), torch.arange(T + pad, 2 * T)])
    assert torch.equal(padded2[rows][:, rows], alone2)
    assert not padded2[:, :pad].any() and not padded2[:, T:T + pad].any()
    # the unpadded second row is unaffected by the first
    assert torch.equal(block_causal_mask(attention, T, B)[1, 0], block_causal_mask(None, T, B)[0, 0])


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size"):
        grid_blocks(None, 4, 0)
