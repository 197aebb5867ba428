"""CUDA path of the learner (deselected on the CPU; run by bench/gpu_core.sh on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlrl.batch import collate
from dlrl.config import TrainSpec
from dlrl.models import build_tiny
from dlrl.trajectory import TrajectoryGroup
from learner.step import accumulate_gradients, old_policy_terms, train_step

pytestmark = pytest.mark.gpu


def _batch(tok, n_mc):
    rng = np.random.default_rng(0)
    groups = [TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k),
                              prompt_ids=rng.integers(4, len(tok), size=6 + k),
                              completion_ids=rng.integers(4, len(tok), size=(4, 16)),
                              rewards=rng.random(4), policy_version=0, mask_seed=k) for k in range(2)]
    return collate(groups, pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=n_mc)


def test_bf16_autocast_step_on_cuda_moves_weights():
    model, tok = build_tiny(hidden=64, layers=2, heads=4)
    model = model.cuda()
    before = [p.detach().clone() for p in model.parameters()]
    spec = TrainSpec(n_mc=4, mc_chunk=2, micro_batch=4, lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    metrics = train_step(model, opt, _batch(tok, 4).to("cuda"), spec, tok.mask_token_id)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cuda_gradient_matches_cpu():
    model, tok = build_tiny(hidden=64, layers=2, heads=4)
    spec = TrainSpec(n_mc=4, micro_batch=8)
    grads = []
    for device in ("cpu", "cuda"):
        m = model.to(device)
        m.zero_grad()
        b = _batch(tok, 4).to(device)
        old = old_policy_terms(m, b, spec, tok.mask_token_id)
        accumulate_gradients(m, b, old, spec, tok.mask_token_id)
        grads.append(torch.cat([p.grad.float().flatten().cpu() for p in m.parameters()]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.98  # bf16 autocast on CUDA vs float32 on the CPU


def test_bgpo_peak_memory_flat_in_n_mc_on_cuda():
    model, tok = build_tiny(hidden=256, layers=4, heads=4)
    model = model.cuda()
    peaks = {}
    for n_mc in (1, 8):
        spec = TrainSpec(n_mc=n_mc, mc_chunk=1, micro_batch=8)
        b = _batch(tok, n_mc).to("cuda")
        old = old_policy_terms(model, b, spec, tok.mask_token_id)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        accumulate_gradients(model, b, old, spec, tok.mask_token_id)
        torch.cuda.synchronize()
        peaks[n_mc] = torch.cuda.max_memory_allocated() - base
    assert peaks[8] <= 1.10 * peaks[1], peaks
