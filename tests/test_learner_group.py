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

from dlrl.config import TrainSpec
from dlrl.models import build_tiny
from dlrl.trajectory import TrajectoryGroup
from learner import sharding
from learner.batch import collate
from learner.sharding import Rank
from learner.step import train_step

STEPS = 3


def _groups(vocab: int, n_groups: int, per_group: int) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(7)
    return [
        TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k),
                        prompt_ids=rng.integers(4, vocab, size=4 + k),
                        completion_ids=rng.integers(4, vocab, size=(per_group, 8)),
                        rewards=rng.random(per_group), policy_version=0, mask_seed=11 + k)
        for k in range(n_groups)
    ]


def _train(rank: Rank, spec: TrainSpec, shape: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """STEPS steps from the same initial weights; the full weights after step 1 and step STEPS."""
    torch.manual_seed(0)
    model, tok = build_tiny(hidden=32, layers=2, heads=2)
    model = model.double()
    if rank.sharded:
        sharding.shard(model, "float64", torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    snapshots = []
    for step in range(STEPS):
        groups = _groups(len(tok), *shape)
        for g in groups:
            g.mask_seed += 100 * step
        batch = collate(groups, pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=spec.n_mc)
        train_step(model, opt, batch, spec, tok.mask_token_id, rank)
        if step in (0, STEPS - 1):
            snapshots.append({k: sharding.full(v).detach().clone() for k, v in model.state_dict().items()})
    return snapshots


def _rank_main(rank: int, world: int, port: int, spec_json: str, shape: tuple[int, int], out: str) -> None:
    torch.set_num_threads(1)
    r = Rank(rank, world)
    sharding.join(r, "127.0.0.1", port, torch.device("cpu"))
    try:
        snaps = _train(r, TrainSpec.model_validate_json(spec_json), shape)
        if r.lead:
            torch.save(snaps, out)
    finally:
        sharding.leave()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(spec: TrainSpec, shape: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "weights.pt")
        mp.start_processes(_rank_main, args=(2, _free_port(), spec.model_dump_json(), shape, out),
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
    for after, one, two in zip((1, STEPS), single, sharded):
        assert one.keys() == two.keys()
        moved = max(float((one[k] - v).abs().max()) for k, v in _train_start().items())
        assert moved > 1e-4, "the weights did not move: the comparison would prove nothing"
        worst = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert worst < 1e-12, f"after {after} step(s) the 2-rank weights differ by {worst:.3g}"


def _train_start() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = build_tiny(hidden=32, layers=2, heads=2)
    return {k: v.double() for k, v in model.state_dict().items()}


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
    finally:
        sharding.leave()
