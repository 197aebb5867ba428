"""The learner on a real tiny model: one step moves every weight; SFT lowers its loss (LLaDA's and,
for a block-diffusion model, SDAR's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlrl import diffusion
from dlrl.batch import collate
from dlrl.config import TrainSpec
from dlrl.models import build_tiny, build_tiny_sdar, diffusion_logits
from dlrl.trajectory import TrajectoryGroup
from learner.sft import sft_loss
from learner.step import train_step


def _groups(vocab: int) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(1)
    return [
        TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k),
                        prompt_ids=rng.integers(4, vocab, size=5 + k),
                        completion_ids=rng.integers(4, vocab, size=(4, 8)),
                        rewards=np.array([1.0, 0.0, 0.5, 0.0]), policy_version=0, mask_seed=k)
        for k in range(2)
    ]


@pytest.mark.parametrize("algorithm", ["bgpo", "naive_elbo", "diffu_grpo"])
def test_one_step_changes_every_parameter(algorithm):
    model, tok = build_tiny(hidden=32, layers=2, heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = TrainSpec(algorithm=algorithm, n_mc=4, mc_chunk=2, micro_batch=3, lr=1e-3)
    batch = collate(_groups(len(tok)), pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=4)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    metrics = train_step(model, opt, batch, spec, tok.mask_token_id)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    # Embedding rows of tokens never seen can stay put; everything else must move.
    assert unchanged == [], unchanged
    assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])


def test_zero_advantage_batch_gives_zero_gradient():
    model, tok = build_tiny(hidden=32, layers=2, heads=2)
    groups = _groups(len(tok))
    for g in groups:
        g.rewards[:] = 0.25  # all-equal groups: no learning signal, and no NaN
    batch = collate(groups, pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=2)
    spec = TrainSpec(n_mc=2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = train_step(model, opt, batch, spec, tok.mask_token_id)
    assert metrics["grad_norm"] == 0.0


def test_sft_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model, tok = build_tiny(hidden=32, layers=2, heads=2)
    tokens = torch.randint(4, len(tok), (8, 12))
    attention = torch.ones_like(tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = sft_loss(model, tokens, attention, 4, tok.mask_token_id, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_block_sft_loss_is_sdar_loss_block_by_block():
    """For a block-diffusion model sft_loss is SDAR's SFT loss: one Bernoulli(p) mask per row
    (dlrl.diffusion.mc_masks' "bernoulli" form), -(1 / (B L)) sum_masked log p / p, where a
    masked token of block b is predicted from the clean blocks before b and noisy block b alone.
    Computed here block by block with a plain block-causal forward (no [noisy ; clean] layout):
    the input holds only block b's masks, and blocks after b cannot be seen. The prompt (6 tokens)
    ends inside a block, so one block mixes clean prompt and noisy response tokens."""
    model, tok = build_tiny_sdar(hidden=32, layers=2, heads=4, kv_heads=2, block_size=4, seed=0)
    tokens = torch.randint(4, len(tok), (3, 6 + 9), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(tokens)
    P, L = 6, 9
    gen = torch.Generator().manual_seed(5)
    loss = sft_loss(model, tokens, attention, P, tok.mask_token_id, gen)
    again = torch.Generator().manual_seed(5)
    seed = int(torch.randint(1 << 62, (), generator=again))
    expected = 0.0
    with torch.no_grad():
        for i in range(3):
            draw = diffusion.mc_masks(seed, i, 1, L, "iid", "bernoulli")
            mask, weight = draw.mask[0], float(draw.weight[0])
            assert mask.any()
            for b in range(0, P + L, 4):
                in_block = torch.zeros(L, dtype=torch.bool)
                in_block[max(b - P, 0):max(b + 4 - P, 0)] = True
                here = mask & in_block
                if not here.any():
                    continue
                row = tokens[i].clone()
                row[P:][here] = tok.mask_token_id
                logp = diffusion_logits(model, row[None])[0, P:].log_softmax(-1)  # block-causal default
                expected -= weight * logp[here, tokens[i, P:][here]].sum().item()
    assert loss.item() == pytest.approx(expected / (3 * L), rel=1e-5)


def test_block_sft_loss_decreases_on_a_fixed_batch():
    """SDAR's 1/p weight makes single draws noisy (p can be ~1e-3), so the loss is compared as the
    mean over the same 16 mask draws before and after training."""
    model, tok = build_tiny_sdar(hidden=32, layers=2, heads=4, kv_heads=2, block_size=4, seed=0)
    tokens = torch.randint(4, len(tok), (8, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(tokens)

    def fixed_draws_loss() -> float:
        with torch.no_grad():
            return float(np.mean([sft_loss(model, tokens, attention, 4, tok.mask_token_id,
                                           torch.Generator().manual_seed(100 + k)).item() for k in range(16)]))

    before = fixed_draws_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = sft_loss(model, tokens, attention, 4, tok.mask_token_id, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_draws_loss() < 0.7 * before
