"""learner.memory: checkpointed blocks give the plain model's gradients (built-in, native LLaDA and
Dream, LoRA, and under FSDP2's fully_shard) with their state_dict keys unchanged, and actually keep
fewer tensors; train.mc_chunk = "auto" picks the largest chunk that fits,.
The memory saved is measured by bench/activation_memory.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dlrl import footprint as fp
from dlrl.batch import collate
from dlrl.config import JobSpec, LoraSpec, TrainSpec
from dlrl.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, build_tiny
from dlrl.models.lora import apply_lora
from dlrl.trajectory import TrajectoryGroup
from learner.memory import (
    apply_activation_checkpointing,
    prepare_memory,
    resolve_mc_chunk,
)
from learner.objectives import OBJECTIVES
from learner.step import accumulate_gradients, old_policy_terms

MASK, PAD, EOS = 99, 0, 1
SPEC = TrainSpec(n_mc=4, mc_chunk=2, micro_batch=4)


def _batch(vocab: int, n_mc: int = 4):
    rng = np.random.default_rng(0)
    groups = [TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k),
                              prompt_ids=rng.integers(4, vocab, size=6 + k),
                              completion_ids=rng.integers(4, vocab, size=(4, 10)),
                              rewards=np.array([1.0, 0.0, 0.5, 0.0]), policy_version=0, mask_seed=k)
              for k in range(2)]
    return collate(groups, pad_id=PAD, eos_ids=(EOS,), n_mc=n_mc)


def _grads(model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    old = old_policy_terms(model, batch, SPEC, MASK) - 0.05  # ratios away from 1: clipping is exercised
    accumulate_gradients(model, batch, old, SPEC, MASK)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved_tensors(model: torch.nn.Module, batch) -> int:
    """Tensors autograd keeps for the backward of one chunk's forward."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    from dlrl.elbo_terms import elbo_chunk
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        elbo_chunk(model, batch, slice(0, 2), MASK, "token")
    return count


def _tiny():
    return build_tiny(hidden=32, layers=3, heads=2)[0].double()


def _llada():
    torch.manual_seed(0)
    return LLaDAModelLM(LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=3, mlp_hidden_size=48,
                                    vocab_size=100, embedding_size=104, mask_token_id=MASK)).double()


def _dream():
    torch.manual_seed(0)
    return DreamModel(DreamConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                                  intermediate_size=48, vocab_size=104, mask_token_id=MASK, pad_token_id=PAD,
                                  bos_token_id=PAD, eos_token_id=EOS)).double()


@pytest.mark.parametrize("build", [_tiny, _llada, _dream], ids=["builtin", "llada", "dream"])
def test_checkpointed_blocks_give_the_same_gradients_and_keys(build):
    plain, ckpt = build(), build()
    ckpt.load_state_dict(plain.state_dict())
    keys = list(ckpt.state_dict())
    batch = _batch(100)
    blocks = apply_activation_checkpointing(ckpt)
    assert len(blocks) == 3
    assert list(ckpt.state_dict()) == keys  # HF checkpoints and resume see the same names
    apply_activation_checkpointing(ckpt)  # a second call is a no-op, not an error
    want, got = _grads(plain, batch), _grads(ckpt, batch)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    # ... and the recompute is real: far fewer tensors are kept for the backward.
    assert _saved_tensors(ckpt, batch) < 0.5 * _saved_tensors(plain, batch)


def test_checkpointing_a_lora_model():
    def build():
        model = _llada().float()
        return apply_lora(model, LoraSpec(r=4, target_modules=["q_proj", "v_proj", "ff_out"]))

    plain, ckpt = build(), build()
    ckpt.load_state_dict(plain.state_dict())
    for p in plain.parameters():  # peft initialises B = 0; move it so the adapters' gradients matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    ckpt.load_state_dict(plain.state_dict())
    keys = list(ckpt.state_dict())
    assert len(apply_activation_checkpointing(ckpt)) == 3
    assert list(ckpt.state_dict()) == keys
    batch = _batch(100)
    want, got = _grads(plain, batch), _grads(ckpt, batch)
    assert want and all("lora_" in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_before_fully_shard():
    """The order the sharded learner uses: checkpoint the blocks, then fully_shard them and the root
    (here a one-rank gloo group on the CPU, which runs FSDP2's real hooks and DTensor parameters)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    plain, sharded = _tiny().float(), _tiny().float()
    batch = _batch(100)
    want = _grads(plain, batch)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        for block in apply_activation_checkpointing(sharded):
            fully_shard(block)
        fully_shard(sharded)
        assert list(sharded.state_dict()) == list(plain.state_dict())
        got = _grads(sharded, batch)
        for name in want:
            torch.testing.assert_close(got[name].full_tensor(), want[name], rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()


# -- mc_chunk = "auto" ------------------------------------------------------------------------------

def _job(**train) -> JobSpec:
    return JobSpec.model_validate({
        "runtime": {"device": "cpu"},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "gen_length": 64, "block_length": 32, "steps": 64},
        "train": {"n_mc": 16, "micro_batch": 8, **train},
    })


def test_auto_chunk_grows_with_memory_and_stays_in_range():
    spec = _job(mc_chunk="auto")
    cpu = torch.device("cpu")
    picks = [resolve_mc_chunk(spec, cpu, free_bytes=gb * 10**9) for gb in (0.01, 0.4, 0.8, 1.6, 1000)]
    assert picks[0] == 1  # nothing fits: the least memory a chunked step takes
    assert picks == sorted(picks) and len(set(picks)) >= 3
    assert picks[-1] == 16  # never more than n_mc
    # the pick is the largest that fits: one more sample per chunk would not
    free = 0.8 * 10**9
    c = resolve_mc_chunk(spec, cpu, free_bytes=free)
    shape = fp.job_shape(spec)

    def need(chunk):  # what the step still allocates once the weights are loaded
        m = fp.job_learner_memory(spec, shape, 1, False, 256, mc_chunk=chunk,
                                  graph_copies=OBJECTIVES["bgpo"].graph_copies)
        return m.total - m.weights

    assert 1 < c < 16 and need(c) <= 0.8 * free < need(c + 1)
    # checkpointing frees activations, so a larger chunk fits the same memory
    assert resolve_mc_chunk(_job(mc_chunk="auto", activation_checkpointing=True), cpu, free_bytes=free) > c
    assert resolve_mc_chunk(_job(mc_chunk=3), cpu, free_bytes=1) == 3  # a number is kept as it is
    # The naive ELBO ratio keeps all 16 MC graphs alive at any chunk: where BGPO fits c < 16 per
    # chunk, the naive step fits at none (1, the floor), and with room for 16 copies it takes 16.
    naive = _job(mc_chunk="auto", algorithm="naive_elbo")
    assert resolve_mc_chunk(naive, cpu, free_bytes=free) == 1
    assert resolve_mc_chunk(naive, cpu, free_bytes=1000 * 10**9) == 16


def test_prepare_memory_gives_the_step_a_number():
    spec = _job(mc_chunk="auto", activation_checkpointing=True)
    model = build_tiny(hidden=32, layers=2, heads=2)[0]
    out = prepare_memory(model, spec, torch.device("cpu"))
    assert isinstance(out.train.mc_chunk, int) and 1 <= out.train.mc_chunk <= 16
    assert out.train.activation_checkpointing and out.model == spec.model
    assert prepare_memory(model, _job(mc_chunk=2), torch.device("cpu")).train.mc_chunk == 2


def test_the_learner_starts_with_a_number_and_checkpointed_blocks(tmp_path, caplog):
    from learner.train import Learner

    spec = _job(mc_chunk="auto", activation_checkpointing=True).model_copy(
        update={"runtime": JobSpec().runtime.model_copy(update={"device": "cpu", "out_dir": str(tmp_path)})})
    with caplog.at_level("INFO", logger="learner.memory"):
        learner = Learner(spec)
    chunk = learner.spec.train.mc_chunk
    assert isinstance(chunk, int) and 1 <= chunk <= 16
    assert f"train.mc_chunk = 'auto' -> {chunk} of n_mc 16" in caplog.text
    vocab = learner.model.get_input_embeddings().num_embeddings
    rng = np.random.default_rng(0)
    groups = [TrajectoryGroup(group_id=f"0:{k}", task="t", prompt_id=str(k), prompt_ids=rng.integers(4, vocab, size=6),
                              completion_ids=rng.integers(4, vocab, size=(4, 8)),
                              rewards=np.array([1.0, 0.0, 0.5, 0.0]), policy_version=0, mask_seed=k)
              for k in range(2)]
    metrics = learner.step(groups)
    assert metrics["grad_norm"] > 0 and learner.version == 1
    saved = learner.save(tmp_path / "ckpt")  # the checkpointed model saves under the published names
    assert (Path(saved) / "config.json").exists()
