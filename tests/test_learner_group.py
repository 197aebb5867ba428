"""The sharded learner group (FSDP2 over gloo) trains exactly what one process trains.

Two real processes join a gloo process group, shard the built-in model per block with
`fully_shard`, and run BGPO steps on the same global batch, each on its share of the rows. Their
gathered weights after 1 and after 3 steps are compared with a single process (no process group,
no sharding) on the whole batch.

Tolerance: float64, atol 1e-12 on weights of size ~1e-1. The two runs add the same numbers in a
different order (per-rank partial sums, then the reduce-scatter's sum over ranks), which moves a
float64 sum by ~1e-16 relative; AdamW's normalised update (lr 1e-3 * m / sqrt(v)) passes that on
at ~1e-16 * lr per step. Anything above 1e-12 is a wrong gradient, not rounding: a missing rank's
rows, a mean where a sum belongs (a factor 2) or a dropped micro-batch all move weights by > 1e-5.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dlrl.batch import collate
from dlrl.config import LoraSpec, TrainSpec
from dlrl.models import build_tiny, load_empty_model, load_model, save_checkpoint
from dlrl.models.lora import apply_lora
from dlrl.trajectory import TrajectoryGroup
from learner import sharding
from learner.sharding import Rank
from learner.step import train_step

STEPS = 3


def _groups(vocab: int, n_groups: int, per_group: int, length: int = 8) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(7)
    return [
        TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k),
                        prompt_ids=rng.integers(3, vocab, size=4 + k),
                        completion_ids=rng.integers(3, vocab, size=(per_group, length)),
                        rewards=rng.random(per_group), policy_version=0, mask_seed=11 + k)
        for k in range(n_groups)
    ]


def _model(dtype: torch.dtype, lora: bool):
    torch.manual_seed(0)
    model, tok = build_tiny(hidden=32, layers=2, heads=2)
    model = model.to(dtype)
    if lora:
        model = apply_lora(model, LoraSpec(r=4, alpha=8.0))
    return model, tok


def _loaded(rank: Rank, spec: TrainSpec, checkpoint: str, dtype: str, lora: bool):
    """The model as the Learner gets it: a single process loads it whole, a group's ranks build it
    empty, shard it and read their own shards (dlrl.models.shard_load)."""
    torch.manual_seed(0)
    adapters = LoraSpec(r=4, alpha=8.0) if lora else None
    if not rank.sharded:
        return load_model(checkpoint, dtype=getattr(torch, dtype), lora=adapters)
    model, tok, deferred = load_empty_model(checkpoint, dtype=getattr(torch, dtype), lora=adapters)
    sharding.shard(model, spec.compute_dtype, torch.device("cpu"))
    deferred.load(model, torch.device("cpu"))
    return model, tok


def _train(rank: Rank, spec: TrainSpec, shape: tuple[int, int], steps: int = STEPS, dtype: str = "float64",
           lora: bool = False, length: int = 8, checkpoint: str | None = None) -> list[dict[str, torch.Tensor]]:
    """`steps` steps from the same initial weights (built here, or loaded from `checkpoint`); the
    full weights at the start, after step 1 and after the last step."""
    if checkpoint is not None:
        model, tok = _loaded(rank, spec, checkpoint, dtype, lora)
    else:
        model, tok = _model(getattr(torch, dtype), lora)
        if rank.sharded:
            sharding.shard(model, spec.compute_dtype, torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    snapshots = [{k: sharding.full(v).detach().clone() for k, v in model.state_dict().items()}]
    for step in range(steps):
        groups = _groups(len(tok), *shape, length=length)
        for g in groups:
            g.mask_seed += 100 * step
        batch = collate(groups, pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=spec.n_mc)
        train_step(model, opt, batch, spec, tok.mask_token_id, rank)
        if step in (0, steps - 1):
            snapshots.append({k: sharding.full(v).detach().clone() for k, v in model.state_dict().items()})
    return snapshots


def _rank_main(rank: int, world: int, port: int, spec_json: str, shape: tuple[int, int], out: str,
               options: dict) -> None:
    torch.set_num_threads(1)
    r = Rank(rank, world)
    sharding.join(r, "127.0.0.1", port, torch.device("cpu"))
    try:
        snaps = _train(r, TrainSpec.model_validate_json(spec_json), shape, **options)
        if r.lead:
            torch.save(snaps, out)
        # Every rank done with its collectives before any tears its gloo group down: without it one
        # rank in about 20 runs here died with SIGABRT ("terminate called without an active
        # exception") in teardown while its peer was still finishing (the same in the other spawned
        # rank harnesses: test_block_elbo, test_shard_load, test_rollout_dtype).
        torch.distributed.barrier()
    finally:
        sharding.leave()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(spec: TrainSpec, shape: tuple[int, int], **options) -> list[dict[str, torch.Tensor]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "weights.pt")
        mp.start_processes(_rank_main, args=(2, _free_port(), spec.model_dump_json(), shape, out, options),
                           nprocs=2, join=True, start_method="spawn")
        return torch.load(out, weights_only=True)


@pytest.mark.parametrize("mc_chunk,micro_batch,shape", [
    (1, 5, (3, 4)),  # 12 rows: 6 per rank, micro-batches 5 + 1 (one process: 5 + 5 + 2)
    (2, 2, (3, 3)),  # 9 rows: 5 + 4 per rank, rank 1 runs a padding pass to match rank 0's three
])
def test_two_ranks_train_what_one_process_trains(mc_chunk, micro_batch, shape):
    spec = TrainSpec(algorithm="bgpo", n_mc=4, mc_chunk=mc_chunk, micro_batch=micro_batch, lr=1e-3,
                     compute_dtype="float64")
    torch.set_num_threads(1)
    single = _train(Rank(), spec, shape)
    sharded = _two_ranks(spec, shape)
    start = single[0]
    for after, one, two in zip((1, STEPS), single[1:], sharded[1:]):
        assert one.keys() == two.keys()
        moved = max(float((one[k] - start[k]).abs().max()) for k in one)
        assert moved > 1e-4, "the weights did not move: the comparison would prove nothing"
        worst = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert worst < 1e-12, f"after {after} step(s) the 2-rank weights differ by {worst:.3g}"


def test_lora_trains_the_same_adapters_under_the_group():
    """LoRA under the same group: the frozen base is sharded too, only the adapters move, and
    they move as in one process."""
    spec = TrainSpec(algorithm="bgpo", n_mc=2, mc_chunk=1, micro_batch=3, lr=1e-3, compute_dtype="float64")
    torch.set_num_threads(1)
    single = _train(Rank(), spec, (2, 3), steps=2, lora=True)
    start, two = single[0], _two_ranks(spec, (2, 3), steps=2, lora=True)[-1]
    adapters = [k for k in start if "lora_" in k]
    assert adapters and all(torch.equal(two[k], start[k]) for k in start if "lora_" not in k)
    assert any(not torch.equal(two[k], start[k]) for k in adapters)
    worst = max(float((single[-1][k] - two[k]).abs().max()) for k in start)
    assert worst < 1e-12, worst


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_ranks_that_read_only_their_shards_train_what_one_process_trains(tmp_path, lora):
    """The group's ranks load a saved checkpoint empty and read their own rows of it; one process
    loads it whole (the single learner's path). Same start (LoRA adapters drawn alike), same steps."""
    model, tok = _model(torch.float64, lora=False)
    save_checkpoint(model, tok, tmp_path / "ckpt")
    spec = TrainSpec(algorithm="bgpo", n_mc=2, mc_chunk=1, micro_batch=3, lr=1e-3, compute_dtype="float64")
    torch.set_num_threads(1)
    options = dict(steps=2, lora=lora, checkpoint=str(tmp_path / "ckpt"))
    single, sharded = _train(Rank(), spec, (2, 3), **options), _two_ranks(spec, (2, 3), **options)
    assert single[0].keys() == sharded[0].keys()
    assert all(torch.equal(single[0][k], sharded[0][k]) for k in single[0])  # the loads agree exactly
    moved = max(float((single[-1][k] - single[0][k]).abs().max()) for k in single[0])
    worst = max(float((single[-1][k] - sharded[-1][k]).abs().max()) for k in single[0])
    assert moved > 1e-4 and worst < 1e-12, (moved, worst)


def test_bf16_compute_with_fp32_masters_learns_at_the_paper_lr_under_the_group():
    """MixedPrecisionPolicy (bf16 all-gathers and compute, fp32 reduce-scatter into fp32 shards):
    20 steps at lr 5e-7 change at least 99 % of the weights, as in one process
    (tests/test_precision.py); bf16 masters would keep ~1-2 % of them."""
    spec = TrainSpec(algorithm="bgpo", n_mc=2, mc_chunk=2, micro_batch=8, lr=5e-7, compute_dtype="bfloat16")
    # Long random completions, so that every embedding row is some row's input and gets a gradient.
    start, _, last = _two_ranks(spec, (4, 4), steps=20, dtype="float32", length=32)
    assert all(v.dtype == torch.float32 for v in last.values())
    changed = sum(int((last[k] != start[k]).sum()) for k in start if start[k].is_floating_point())
    total = sum(start[k].numel() for k in start if start[k].is_floating_point())
    assert changed / total >= 0.99, f"only {changed / total:.2%} of the weights changed"


def test_rank_rows_cover_the_batch_once():
    for n in range(0, 13):
        for world in (1, 2, 3, 5):
            rows = [list(range(n))[Rank(r, world).rows(n)] for r in range(world)]
            assert sum(rows, []) == list(range(n))
            for size in (1, 2, 5):
                passes = Rank(0, world).passes(n, size)
                assert all(-(-len(x) // size) <= passes for x in rows)


def test_broadcast_blobs_is_exact(tmp_path: Path):
    port = _free_port()
    blobs = [b"", b"\x00\xff" * 3, os.urandom(1000)]
    mp.start_processes(_blob_main, args=(port, blobs, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert json.loads((tmp_path / "got-1.json").read_text()) == [b.hex() for b in blobs]


def _blob_main(rank: int, port: int, blobs: list[bytes], out: str) -> None:
    sharding.join(Rank(rank, 2), "127.0.0.1", port, torch.device("cpu"))
    try:
        got = sharding.broadcast_blobs(blobs if rank == 0 else None)
        Path(out, f"got-{rank}.json").write_text(json.dumps([b.hex() for b in got]))
        torch.distributed.barrier()
    finally:
        sharding.leave()
