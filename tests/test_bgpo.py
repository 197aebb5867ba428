"""BGPO's defining property, checked on a real (tiny, float64) model.

On-policy the chunked BGPO loss and its gradient equal the naive ELBO-ratio objective's; off-policy
the bound is below the objective; the chunk size does not change the gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlrl.batch import collate
from dlrl.config import TrainSpec
from dlrl.trajectory import TrajectoryGroup
from learner.losses import bgpo_loss, naive_elbo_ratio_loss
from learner.step import accumulate_gradients, old_policy_terms

MASK_ID, PAD_ID, EOS_ID = 2, 0, 1


def groups(n_groups: int = 2, g: int = 4, gen_len: int = 6) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(0)
    out = []
    for k in range(n_groups):
        prompt = rng.integers(4, 32, size=3 + k)  # different prompt lengths -> left padding
        out.append(TrajectoryGroup(
            group_id=f"g{k}", task="t", prompt_id=str(k), prompt_ids=prompt,
            completion_ids=rng.integers(3, 32, size=(g, gen_len)),
            rewards=rng.random(g), policy_version=0, mask_seed=100 + k,
        ))
    return out


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def run(model, batch, spec, old=None):
    model.zero_grad(set_to_none=True)
    if old is None:
        old = old_policy_terms(model, batch, spec, MASK_ID)
    stats = accumulate_gradients(model, batch, old, spec, MASK_ID)
    return stats["loss"], grads(model)


@pytest.mark.parametrize("n_mc", [1, 4, 16])
def test_on_policy_bgpo_equals_elbo_ratio_objective(tiny_model_f64, n_mc):
    batch = collate(groups(), pad_id=PAD_ID, eos_ids=(EOS_ID,), n_mc=n_mc)
    batch.advantages = batch.advantages.double()
    bgpo = TrainSpec(algorithm="bgpo", n_mc=n_mc, mc_chunk=1, micro_batch=3)
    naive = TrainSpec(algorithm="naive_elbo", n_mc=n_mc, mc_chunk=n_mc, micro_batch=8)
    loss_b, grad_b = run(tiny_model_f64, batch, bgpo)
    loss_n, grad_n = run(tiny_model_f64, batch, naive)
    assert grad_n.norm() > 1e-3  # a real, non-trivial gradient
    assert abs(loss_b - loss_n) <= 1e-6 * max(abs(loss_n), 1e-12) + 1e-12
    assert (grad_b - grad_n).norm() / grad_n.norm() <= 1e-6


@pytest.mark.parametrize("chunk", [2, 4, 8])
def test_chunk_size_does_not_change_gradient(tiny_model_f64, chunk):
    batch = collate(groups(), pad_id=PAD_ID, eos_ids=(EOS_ID,), n_mc=8)
    batch.advantages = batch.advantages.double()
    _, g1 = run(tiny_model_f64, batch, TrainSpec(algorithm="bgpo", n_mc=8, mc_chunk=1, micro_batch=2))
    _, gc = run(tiny_model_f64, batch, TrainSpec(algorithm="bgpo", n_mc=8, mc_chunk=chunk, micro_batch=8))
    assert (g1 - gc).norm() / g1.norm() <= 1e-10


def test_off_policy_bound_is_below_objective(tiny_model_f64):
    """After the weights move, sum_j g_ij <= R_i for every completion (both bounds of Eq. 8)."""
    n_mc = 4
    spec = TrainSpec(algorithm="bgpo", n_mc=n_mc, clip_eps=None, dual_clip=None)
    batch = collate(groups(n_groups=3), pad_id=PAD_ID, eos_ids=(EOS_ID,), n_mc=n_mc)
    old = old_policy_terms(tiny_model_f64, batch, spec, MASK_ID)
    with torch.no_grad():
        for p in tiny_model_f64.parameters():
            p.add_(0.3 * torch.randn_like(p))
    new = old_policy_terms(tiny_model_f64, batch, spec, MASK_ID)
    d = new - old
    assert d.abs().max() > 1e-2  # really off-policy
    adv = batch.advantages.double()
    assert (adv > 0).any() and (adv < 0).any()
    for i in range(batch.size):
        lb = -sum(bgpo_loss(new[i:i + 1, j], old[i:i + 1, j], adv[i:i + 1], n_mc) for j in range(n_mc))
        objective = -naive_elbo_ratio_loss(new[i:i + 1], old[i:i + 1], adv[i:i + 1])
        assert lb <= objective + 1e-12
