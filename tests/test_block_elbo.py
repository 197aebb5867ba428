"""The block ELBO (dlrl.block_elbo, dlrl.elbo_terms): a block-diffusion model scored on its BD3-LM
training layout, with SDAR's Bernoulli(p) masks, through every objective of the learner.

The block ELBO is checked against an independent computation written here without bd3_mask: for
each block b, its own forward of [prompt + clean blocks < b + noisy block b] under attention that
is causal over blocks (bidirectional inside one), summing CE / p over block b's masked tokens.

Tolerances: the model is float64, but the SDAR body rotates q and k in float32 as published
(dlrl.models.attention.apply_rope), so two computations that batch rows differently agree to
about 1e-9 relative, not 1e-15. RTOL = 1e-7 sits above that and far below what a wrong block
boundary (block 8 for 4: >= 5e-5 on every term here), a chunk's weight or a rank's rows move.
"""

from __future__ import annotations

import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dlrl import diffusion
from dlrl.batch import collate, collate_for, time_form_for
from dlrl.block_elbo import bd3_columns, bd3_logits
from dlrl.config import JobSpec, LoraSpec, TrainSpec
from dlrl.elbo_terms import elbo_chunk
from dlrl.footprint import ModelShape, learner_memory, shape_from_config
from dlrl.models import build_tiny, special_ids
from dlrl.models.block_mask import bd3_mask
from dlrl.models.families import model_family
from dlrl.models.lora import apply_lora
from dlrl.models.padding import padding_positions
from dlrl.trajectory import TrajectoryGroup
from learner import sharding
from learner.memory import resolve_mc_chunk
from learner.objectives.diffu_grpo import one_step_logprobs
from learner.sharding import Rank
from learner.step import accumulate_gradients, old_policy_terms, train_step
from tests.block_model import BLOCK, block_model

RTOL = 1e-7
GEN = 10  # response tokens: blocks of 4 on the global grid cut it at different offsets per prompt length


def _groups(vocab: int, prompt_lengths: list[int], per_group: int = 3, seed: int = 0) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(seed)
    return [TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k), prompt_ids=rng.integers(4, vocab, size=p),
                            completion_ids=rng.integers(4, vocab, size=(per_group, GEN)),
                            rewards=rng.random(per_group), policy_version=0, mask_seed=50 + k)
            for k, p in enumerate(prompt_lengths)]


def _batch(model, tok, spec: TrainSpec, prompt_lengths=(5, 7, 4)):
    batch = collate_for(_groups(len(tok), list(prompt_lengths)), spec, special_ids(model, tok), model_family(model))
    batch.advantages = batch.advantages.to(torch.float64)
    return batch


# -- masks --------------------------------------------------------------------------------------------


def test_block_families_default_to_sdars_bernoulli_masks():
    model, tok = block_model()
    plain, _ = build_tiny(hidden=32, layers=1, heads=2)
    spec = TrainSpec()
    assert spec.time_form == "auto"
    assert time_form_for(spec, model_family(model)) == "bernoulli"
    assert time_form_for(spec, model_family(plain)) == "discrete"  # LLaDA's path: as before
    assert time_form_for(TrainSpec(time_form="continuous"), model_family(model)) == "continuous"


@pytest.mark.parametrize("scheme", ["stratified", "iid", "antithetic"])
def test_bernoulli_masks_are_sdars_noise_and_a_pure_function_of_the_seed(scheme):
    n_mc, length = 64, 5
    mc = diffusion.mc_masks(3, 1, n_mc, length, scheme, "bernoulli")
    again = diffusion.mc_masks(3, 1, n_mc, length, scheme, "bernoulli")
    assert torch.equal(mc.mask, again.mask) and torch.equal(mc.weight, again.weight)
    assert bool(mc.mask.any(-1).all())  # every sample scores at least one token
    p = 1 / mc.weight
    assert bool(((p > 1e-3 - 1e-12) & (p <= 1)).all())
    if scheme == "stratified":  # p_j = (1 - eps) t_j + eps with t_j = (j + u) / n_mc
        t = (p - 1e-3) / (1 - 1e-3)
        u = t * n_mc - torch.arange(n_mc)
        assert float(u.max() - u.min()) < 1e-9 and 0 <= float(u[0]) < 1
    if scheme == "antithetic":
        assert torch.equal(mc.mask[1::2], ~mc.mask[0::2])
    # masked iid with probability p: over many draws the masked share follows p
    big = diffusion.mc_masks(9, 0, 4096, 64, "iid", "bernoulli")
    share = big.mask.double().mean(-1)
    assert float((share - 1 / big.weight).abs().mean()) < 0.06


def test_a_one_token_response_always_gets_its_mask():
    mc = diffusion.mc_masks(0, 0, 200, 1, "iid", "bernoulli")
    assert bool(mc.mask.all())  # forced when the draws at small p mask nothing, as SDAR does


# -- the block ELBO equals an independent per-block computation ---------------------------------------


def _own_block_logprobs(model, tokens: np.ndarray, prompt_len: int, mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """One row alone (no padding): log p (L,) of each response token from its own block's forward.

    For each block b holding response tokens, the sequence prompt + clean blocks < b + noisy block b
    (its masked response tokens replaced by mask_id, its prompt tokens kept) goes through the model
    under attention built here: a query sees a key iff the key's block is not later (block-causal)."""
    x = torch.as_tensor(tokens)
    n = len(x)
    noisy = x.clone()
    noisy[prompt_len:][mask] = mask_id
    out = torch.zeros(n - prompt_len, dtype=torch.float64)
    for b in range(-(-n // BLOCK)):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, n)
        if hi <= prompt_len:
            continue  # a prompt-only block scores nothing
        seq = torch.cat([x[:lo], noisy[lo:hi]])[None]
        blocks = torch.arange(hi) // BLOCK
        attend = (blocks[None, :] <= blocks[:, None])[None, None]
        with torch.no_grad():
            logits = model(seq, attention_mask=attend, position_ids=torch.arange(hi)[None]).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        for k in range(max(lo, prompt_len), hi):
            out[k - prompt_len] = logp[k, x[k]]
    return out


def test_the_block_elbo_equals_an_independent_per_block_computation():
    model, tok = block_model()
    spec = TrainSpec(n_mc=3, mc_chunk=3, normalize="sequence")
    batch = _batch(model, tok, spec)  # prompts 5, 7, 4: left padding, the response cut at offsets 1, 3, 0
    with torch.no_grad():
        terms = elbo_chunk(model, batch, slice(0, 3), tok.mask_token_id, "sequence")
    P = batch.prompt_len
    assert terms.abs().min() > 1e-3
    for i in range(batch.size):
        real = int(batch.attention[i].sum())
        row = batch.tokens[i, -real:].numpy()
        for j in range(3):
            mask = batch.masks[i, j]
            ref = float(_own_block_logprobs(model, row, real - GEN, mask, tok.mask_token_id)[mask].sum()
                        * batch.weights[i, j])  # sum over blocks of each block's masked CE / p
            assert abs(float(terms[i, j]) - ref) <= RTOL * abs(ref), (i, j, float(terms[i, j]), ref)
    assert P == 7


@pytest.mark.parametrize("prompt_lengths", [(5, 7, 4), (9, 9, 9), (12, 3, 8)])
def test_the_cropped_layout_gives_the_whole_layouts_logits(prompt_lengths):
    """bd3_logits forwards only the columns the response depends on (bd3_columns); its logits are
    those of the whole [x_t ; x_0] (2T columns, the published layout) at every response position."""
    model, tok = block_model()
    batch = _batch(model, tok, TrainSpec(n_mc=1), prompt_lengths)
    P, T = batch.prompt_len, batch.tokens.shape[1]
    masked = torch.nn.functional.pad(batch.masks[:, 0], (P, 0))  # (N, T): response positions only
    noisy = torch.where(masked, tok.mask_token_id, batch.tokens)
    padded = not bool(batch.attention.all())
    whole_mask = bd3_mask(batch.attention if padded else None, T, BLOCK)
    positions = padding_positions(batch.attention).repeat(1, 2)
    with torch.no_grad():
        whole = model(torch.cat([noisy, batch.tokens], 1), attention_mask=whole_mask,
                      position_ids=positions).logits[:, P:T]
        cropped = bd3_logits(model, noisy, batch.tokens, batch.attention, BLOCK, slice(P, T))
    noisy_from, clean_to = bd3_columns(batch.attention, P, BLOCK)
    assert noisy_from > 0 and T - noisy_from + clean_to < 2 * T  # it does crop
    torch.testing.assert_close(cropped, whole, rtol=RTOL, atol=1e-12)


def test_the_crop_keeps_each_rows_first_scored_block_and_drops_only_last_blocks():
    unpadded = torch.ones(2, 30, dtype=torch.long)  # a 21-token prompt, blocks of 4
    assert bd3_columns(unpadded, 21, 4) == (20, 28)  # the mixed block 20..23; the last block 28..29
    padded = unpadded.clone()
    padded[1, :3] = 0  # row 1's positions count from column 3: its blocks start at columns 3, 7, ...
    assert bd3_columns(padded, 21, 4) == (19, 28)  # its block at 19..22 holds column 21
    with pytest.raises(ValueError, match="outside"):
        bd3_columns(unpadded, 30, 4)


def test_left_padding_does_not_change_a_rows_terms():
    model, tok = block_model()
    spec = TrainSpec(n_mc=4, mc_chunk=2, micro_batch=4)
    ids = special_ids(model, tok)
    groups = _groups(len(tok), [3, 8, 6])
    together = old_policy_terms(model, collate_for(groups, spec, ids, model_family(model)), spec, ids.mask_id)
    alone = torch.cat([old_policy_terms(model, collate_for([g], spec, ids, model_family(model)), spec, ids.mask_id)
                       for g in groups])
    torch.testing.assert_close(together, alone, rtol=RTOL, atol=0)


# -- the objectives on it -----------------------------------------------------------------------------


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _run(model, batch, spec: TrainSpec, mask_id: int):
    model.zero_grad(set_to_none=True)
    old = old_policy_terms(model, batch, spec, mask_id)
    stats = accumulate_gradients(model, batch, old, spec, mask_id)
    return stats["loss"], _grads(model)


def test_on_policy_bgpo_equals_the_naive_ratio_in_value_and_gradient():
    model, tok = block_model()
    bgpo = TrainSpec(algorithm="bgpo", n_mc=4, mc_chunk=1, micro_batch=3)
    naive = TrainSpec(algorithm="naive_elbo", n_mc=4, mc_chunk=4, micro_batch=9)
    batch = _batch(model, tok, bgpo)
    loss_b, grad_b = _run(model, batch, bgpo, tok.mask_token_id)
    loss_n, grad_n = _run(model, batch, naive, tok.mask_token_id)
    assert grad_n.norm() > 1e-3
    assert abs(loss_b - loss_n) <= RTOL * abs(loss_n) + 1e-12
    assert (grad_b - grad_n).norm() / grad_n.norm() <= RTOL


def test_the_gradient_does_not_depend_on_the_chunk():
    model, tok = block_model()
    one = TrainSpec(algorithm="bgpo", n_mc=4, mc_chunk=1, micro_batch=2)
    batch = _batch(model, tok, one)
    _, g1 = _run(model, batch, one, tok.mask_token_id)
    _, g4 = _run(model, batch, one.model_copy(update={"mc_chunk": 4, "micro_batch": 9}), tok.mask_token_id)
    assert g1.norm() > 1e-3 and (g1 - g4).norm() / g1.norm() <= RTOL


@pytest.mark.parametrize("algorithm, shipped_old, forwards", [
    ("bgpo", False, 3 * 2),  # n_mc 2 per update x 2 updates + the old-policy pass's n_mc 2
    ("bgpo", True, 2 * 2),  # l_old shipped by the rollout worker: no old-policy pass here
    ("diffu_grpo", False, 2 + 2),  # one forward per update + each update's old one-step pass
])
def test_learner_tokens_per_s_counts_the_trajectory_tokens_and_forward_tokens_the_cropped_layout(
        algorithm, shipped_old, forwards):
    """learner_tokens_per_s counts each row's T tokens once per forward of it, as for a
    full-attention family; a block family forwards [x_t ; x_0] cropped to the columns the response
    depends on, which learner_forward_tokens_per_s counts: prompts 5, 7, 4 left-padded to 7 + 10
    response = 17 columns; the response starts at position 5, 7, 4 of its row (blocks of 4: at
    columns 6, 4, 7), so noisy columns 4..16 are kept (13); the last position, 14, 16, 13, starts a
    block at column 14, 16, 15, so clean columns 0..15 are kept (16): 29 of the 34."""
    model, tok = block_model()
    spec = TrainSpec(algorithm=algorithm, n_mc=2, mc_chunk=1, micro_batch=9, updates_per_batch=2, lr=1e-4)
    batch = _batch(model, tok, spec)
    old = old_policy_terms(model, batch, spec, tok.mask_token_id) if shipped_old else None
    m = train_step(model, torch.optim.AdamW(model.parameters(), lr=spec.lr), batch, spec, tok.mask_token_id, old=old)
    tokens = batch.tokens.numel() * forwards
    assert m["learner_tokens_per_s"] * m["learner_seconds"] == pytest.approx(tokens, rel=1e-9)
    assert batch.tokens.shape[1] == 17
    assert m["learner_forward_tokens_per_s"] * m["learner_seconds"] == pytest.approx(tokens * 29 / 17, rel=1e-9)

    full, ftok = build_tiny(hidden=32, layers=2, heads=2)  # full attention: the two figures agree
    fspec = spec.model_copy(update={"updates_per_batch": 1})
    fm = train_step(full, torch.optim.AdamW(full.parameters(), lr=spec.lr), _batch(full, ftok, fspec), fspec,
                    ftok.mask_token_id)
    assert fm["learner_forward_tokens_per_s"] == fm["learner_tokens_per_s"] > 0


def test_diffu_grpos_one_step_is_each_blocks_first_step():
    """Block b fully masked (its prompt tokens kept), given the prompt and the clean blocks before it."""
    model, tok = block_model()
    spec = TrainSpec(algorithm="diffu_grpo", n_mc=1, p_mask_prompt=0.0)
    batch = _batch(model, tok, spec)
    with torch.no_grad():
        logp = one_step_logprobs(model, batch, tok.mask_token_id, 0.0, update=0)
    for i in (0, 4, 8):
        real = int(batch.attention[i].sum())
        row = batch.tokens[i, -real:].numpy()
        ref = _own_block_logprobs(model, row, real - GEN, torch.ones(GEN, dtype=torch.bool), tok.mask_token_id)
        torch.testing.assert_close(logp[i], ref, rtol=RTOL, atol=0)
    m = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch,
                   spec.model_copy(update={"updates_per_batch": 2, "p_mask_prompt": 0.15}), tok.mask_token_id)
    assert m["d_abs"] > 0 and np.isfinite(m["loss"])


def test_lora_trains_the_adapters_on_the_block_elbo():
    model, tok = block_model()
    model = apply_lora(model, LoraSpec(r=4, alpha=8.0))
    spec = TrainSpec(algorithm="bgpo", n_mc=2, mc_chunk=1, micro_batch=4, lr=1e-2)
    batch = _batch(model, tok, spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = train_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr),
                   batch, spec, tok.mask_token_id)
    after = model.state_dict()
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert all(torch.equal(after[k], before[k]) for k in before if "lora_" not in k)
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_" in k)


# -- memory: the cropped [x_t ; x_0] input ---------------------------------------------------------


def test_the_footprint_counts_the_cropped_input_and_auto_picks_a_smaller_chunk():
    plain = ModelShape(vocab=1000, hidden=256, layers=4, heads=4, kv_heads=4, ffn=688)
    block = ModelShape(vocab=1000, hidden=256, layers=4, heads=4, kv_heads=4, ffn=688, bd3_block=4)
    kw = dict(gpus=1, master_bytes=4, compute_bytes=2, rows=4, seq_len=300, resp_len=200)
    p, b = learner_memory(plain, **kw), learner_memory(block, **kw)
    # a 100-token prompt: the noisy half from its last block (at most 200 + 3 columns) and the
    # clean half (300): 503 tokens' activations, plus the 503^2 mask, bool + a compute-dtype copy a block
    assert b.activations - p.activations * 503 // 300 == 4 * 503 ** 2 * (1 + 2 * 4)
    assert b.logits == p.logits  # both project only the masked response positions (dlrl.models.output_head)
    model, _ = block_model()
    assert shape_from_config(model.config.to_dict()).bd3_block == BLOCK
    # the bound is what the learner forwards at this shape: bd3_columns on an unpadded 100 + 200
    assert 300 - bd3_columns(torch.ones(1, 300), 100, 4)[0] + 300 <= 503
    spec = JobSpec.model_validate({"train": {"n_mc": 16, "mc_chunk": "auto", "micro_batch": 4},
                                   "rollout": {"gen_length": 256}})
    budget = 3 * 10**9
    chunks = [resolve_mc_chunk(spec, torch.device("cpu"), budget, shape=s, prompt_len=256) for s in (plain, block)]
    plain_big = ModelShape(vocab=32000, hidden=2048, layers=16, heads=16, kv_heads=8, ffn=5632)
    block_big = ModelShape(vocab=32000, hidden=2048, layers=16, heads=16, kv_heads=8, ffn=5632, bd3_block=4)
    big = [resolve_mc_chunk(spec, torch.device("cpu"), 40 * 10**9, shape=s, prompt_len=256)
           for s in (plain_big, block_big)]
    assert chunks[0] >= chunks[1] and big[0] > big[1] >= 1, (chunks, big)


# -- the learner group --------------------------------------------------------------------------------


def _train(rank: Rank, spec: TrainSpec, steps: int = 2) -> dict[str, torch.Tensor]:
    model, tok = block_model()
    if rank.sharded:
        sharding.shard(model, spec.compute_dtype, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    for step in range(steps):
        groups = _groups(len(tok), [5, 3, 6], seed=step)
        batch = collate(groups, pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=spec.n_mc,
                        time_form="bernoulli")
        train_step(model, opt, batch, spec, tok.mask_token_id, rank)
    return {k: sharding.full(v).detach().clone() for k, v in model.state_dict().items()}


def _rank_main(rank: int, port: int, spec_json: str, out: str) -> None:
    torch.set_num_threads(1)
    r = Rank(rank, 2)
    sharding.join(r, "127.0.0.1", port, torch.device("cpu"))
    try:
        weights = _train(r, TrainSpec.model_validate_json(spec_json))
        if r.lead:
            torch.save(weights, out)
        torch.distributed.barrier()
    finally:
        sharding.leave()


def test_two_ranks_train_what_one_process_trains_on_the_block_elbo():
    spec = TrainSpec(algorithm="bgpo", n_mc=2, mc_chunk=1, micro_batch=2, lr=1e-3, compute_dtype="float64")
    torch.set_num_threads(1)
    start = {k: v.clone() for k, v in block_model()[0].state_dict().items()}
    single = _train(Rank(), spec)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = os.path.join(tmp, "weights.pt")
        mp.start_processes(_rank_main, args=(port, spec.model_dump_json(), out), nprocs=2, join=True,
                           start_method="spawn")
        two = torch.load(out, weights_only=True)
    assert max(float((single[k] - start[k]).abs().max()) for k in start) > 1e-4
    worst = max(float((single[k] - two[k]).abs().max()) for k in single)
    assert worst < spec.lr * 1e-4, worst  # a rank's rows lost or counted twice move weights by ~lr
