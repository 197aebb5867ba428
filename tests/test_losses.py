"""Hand-computed values for the pure loss and masked-diffusion functions."""

from __future__ import annotations

import math

import pytest
import torch

from dlrl import diffusion
from dlrl.batch import group_advantages
from learner.losses import bgpo_loss, diffu_grpo_loss, naive_elbo_ratio_loss


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_bgpo_loss_hand_values():
    # A >= 0: g = (1 + d) A / n ; A < 0: g = exp(d) A / n ; loss = -mean g
    elbo, old, adv = t(-1.0, -2.0), t(-1.5, -1.0), t(2.0, -1.0)
    d = [0.5, -1.0]
    expected = -((1 + d[0]) * 2.0 + math.exp(d[1]) * -1.0) / 2 / 4
    assert bgpo_loss(elbo, old, adv, n_mc=4).item() == pytest.approx(expected, rel=1e-12)


def test_bgpo_positive_branch_is_finite_below_minus_one():
    # log(1 + d) would be NaN at d = -3; the ratio 1 + d is used directly.
    out = bgpo_loss(t(-5.0), t(-2.0), t(1.0), n_mc=1)
    assert out.item() == pytest.approx(2.0)


def test_bgpo_clip_and_dual_clip():
    # A > 0, ratio 1 + 0.5 = 1.5 clipped to 1.2: loss = max(-1.5, -1.2) = -1.2
    assert bgpo_loss(t(0.5), t(0.0), t(1.0), 1, clip_eps=0.2).item() == pytest.approx(-1.2)
    # A < 0, ratio exp(2) ~ 7.39: PPO loss max(7.39, 1.2) = 7.39; dual clip caps at -c*A = 3
    assert bgpo_loss(t(2.0), t(0.0), t(-1.0), 1, clip_eps=0.2).item() == pytest.approx(math.exp(2))
    assert bgpo_loss(t(2.0), t(0.0), t(-1.0), 1, clip_eps=0.2, dual_clip=3.0).item() == pytest.approx(3.0)
    # on-policy the clips change nothing, value or gradient
    e = t(0.3, -0.2).requires_grad_()
    a = t(1.0, -2.0)
    plain = bgpo_loss(e, e.detach(), a, 2)
    (g_plain,) = torch.autograd.grad(plain, e)
    clipped = bgpo_loss(e, e.detach(), a, 2, clip_eps=0.2, dual_clip=3.0)
    (g_clip,) = torch.autograd.grad(clipped, e)
    assert clipped.item() == pytest.approx(plain.item())
    assert torch.allclose(g_plain, g_clip)


def test_naive_ratio_hand_value():
    elbo = t(0.2, 0.4).view(1, 2)
    old = t(0.0, 0.0).view(1, 2)
    assert naive_elbo_ratio_loss(elbo, old, t(2.0)).item() == pytest.approx(-math.exp(0.3) * 2)


def test_group_advantages():
    adv = group_advantages(t(1.0, 0.0, 0.0, 1.0))
    assert torch.allclose(adv, t(1.0, -1.0, -1.0, 1.0), atol=1e-5)
    same = group_advantages(t(0.7, 0.7, 0.7))
    assert torch.equal(same, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(group_advantages(t(0.3)), t(0.0))
    batched = group_advantages(torch.tensor([[1.0, 3.0], [5.0, 5.0]]))
    assert torch.allclose(batched, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]), atol=1e-5)


def test_diffu_grpo_hand_value():
    logp = t(-1.0, -2.0, -3.0).view(1, 3)
    old = t(-1.0, -2.5, -3.0).view(1, 3)
    valid = torch.tensor([[True, True, False]])
    ratio = [1.0, math.exp(0.5)]
    expected = -(ratio[0] * 1.0 + min(ratio[1], 1.2) * 1.0) / 2
    assert diffu_grpo_loss(logp, old, t(1.0), valid).item() == pytest.approx(expected)
    # clip_eps None: no clip, the second token keeps its whole ratio exp(0.5)
    unclipped = -(ratio[0] + ratio[1]) / 2
    assert diffu_grpo_loss(logp, old, t(1.0), valid, clip_eps=None).item() == pytest.approx(unclipped)


def test_elbo_term_hand_value():
    logits = torch.zeros(1, 3, 4, dtype=torch.float64)  # uniform: log p = -log 4 everywhere
    targets = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[True, False, True]])
    w = t(1.5)  # L / k = 3 / 2
    seq = diffusion.elbo_term(logits, targets, mask, w, "sequence")
    assert seq.item() == pytest.approx(1.5 * 2 * -math.log(4))
    tok = diffusion.elbo_term(logits, targets, mask, w, "token")
    assert tok.item() == pytest.approx(-math.log(4))  # per-token mean over masked tokens


@pytest.mark.parametrize("scheme", ["iid", "stratified", "antithetic"])
@pytest.mark.parametrize("form", ["discrete", "continuous"])
def test_mc_masks_are_pure_functions_of_seed_index(scheme, form):
    a = diffusion.mc_masks(7, 3, 6, 20, scheme, form)
    b = diffusion.mc_masks(7, 3, 6, 20, scheme, form)
    c = diffusion.mc_masks(7, 4, 6, 20, scheme, form)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.mask, c.mask)
    assert a.mask.shape == (6, 20) and a.weight.shape == (6,)
    if form == "discrete":  # weight is L / k and at least one token is masked
        k = a.mask.sum(-1).double()
        assert (k >= 1).all() and torch.allclose(a.weight, 20 / k)


def test_stratified_counts_cover_the_range():
    m = diffusion.mc_masks(1, 0, 4, 100, "stratified", "discrete")
    k = sorted(m.mask.sum(-1).tolist())
    # k_j = 1 + floor((j + u) * 100 / 4): one in each quarter of 1..100
    for j, kj in enumerate(k):
        assert 1 + 25 * j <= kj <= 25 * (j + 1)


def test_antithetic_pairs_are_complementary():
    m = diffusion.mc_masks(2, 1, 4, 16, "antithetic", "discrete").mask
    assert torch.equal(m[0], ~m[1]) and torch.equal(m[2], ~m[3])


def test_first_eos_valid():
    r = torch.tensor([[5, 1, 1, 1], [5, 6, 7, 8]])
    v = diffusion.first_eos_valid(r, (1,))
    assert v.tolist() == [[True, True, False, False], [True, True, True, True]]
