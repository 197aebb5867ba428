"""Rollout weights in the compute dtype: the learner keeps float32 masters, each weights version
travels cast once to the rollout dtype (bf16 here, asked for on the CPU by train.compute_dtype),
and the rollout workers hold, sample and evaluate with exactly those bf16 tensors.

Real parts only: the shipped tiny checkpoint, the real Learner and RolloutWorker classes (the
worker as a Ray actor where the test says so), the object store and a gloo broadcast group, a
2-rank FSDP2 learner group in two processes.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import ray
import torch
import torch.multiprocessing as mp

from dlrl.config import JobSpec
from dlrl.models import build_tiny
from dlrl.precision import rollout_dtype
from dlrl.weights import WeightPublisher, encode
from learner import sharding
from learner.sharding import Rank
from learner.train import Learner
from rollout.worker import RolloutWorker
from services.driver.driver import run
from services.driver.progress import read_metrics
from tests.test_learner_group import _free_port
from tests.test_runtime import tiny_spec

FP32_BYTES = 3_273_216  # the tiny checkpoint's state in float32 (tests/test_weights.py)


def spec(compute: str = "bfloat16", **model) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bf16roll",
        "model": {"path": "builtin:tiny-sudoku", **model},
        "task": {"name": "sudoku", "train_size": 16},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "gen_length": 20, "block_length": 20,
                    "steps": 10, "temperature": 1.0, "batch_size": 4},
        "train": {"compute_dtype": compute, "n_mc": 2, "micro_batch": 4},
        "weights": {"bucket_mb": 0.2},
        "runtime": {"device": "cpu", "threads": 1},
    })


def step_masters(learner: Learner, version: int) -> dict[str, torch.Tensor]:
    """Move the learner's float32 masters as a step would (by amounts bf16 cannot all keep) and
    return a copy of them."""
    g = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for p in learner.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    learner.version = version
    return {k: v.detach().clone() for k, v in learner._published().items()}


def assert_cast_of(held: dict[str, torch.Tensor], masters: dict[str, torch.Tensor]) -> None:
    """Every published tensor is the master cast to bf16, bit for bit."""
    for k, master in masters.items():
        assert held[k].dtype == torch.bfloat16, k
        assert torch.equal(held[k], master.to(torch.bfloat16)), k


def worker_state(worker) -> dict[str, torch.Tensor]:
    """The state a Ray worker actor holds (read inside its process)."""
    return ray.get(worker.__ray_call__.remote(
        lambda self: {k: v.detach().clone() for k, v in self.model.state_dict().items()}), timeout=60)


def test_rollout_dtype_is_the_learners_compute_dtype():
    assert rollout_dtype("float32", "auto", "cpu") == torch.float32  # the CPU stays float32
    assert rollout_dtype("float32", "auto", "cuda") == torch.bfloat16
    assert rollout_dtype("float32", "bfloat16", "cpu") == torch.bfloat16  # asked for explicitly
    assert rollout_dtype("float32", "float16", "cuda") == torch.float16
    assert rollout_dtype("float64", "float64", "cuda") == torch.float64
    assert rollout_dtype("bfloat16", "auto", "cpu") == torch.bfloat16  # a LoRA run's bf16 base
    assert rollout_dtype("float64", "auto", "cuda") == torch.float64  # autocast leaves float64 alone


def test_object_store_version_is_the_masters_cast_once_to_bf16_in_a_ray_worker(ray_cluster):
    s = spec()
    learner = Learner(s)
    assert learner.rollout_dtype == torch.bfloat16
    assert {p.dtype for p in learner.model.parameters()} == {torch.float32}  # masters stay float32
    worker = ray.remote(RolloutWorker).options(num_cpus=0.1).remote(s)
    try:
        held = worker_state(worker)
        assert {v.dtype for v in held.values()} == {torch.bfloat16}  # loaded in bf16, sampling in bf16
        masters = step_masters(learner, 1)
        update, payload = learner.weight_payload()  # as the driver calls it, owned by the driver
        handle = WeightPublisher().adopt(ray.put(update), ray.put(payload))
        assert {t.dtype for t in handle.update.manifest} == {"bfloat16"}
        assert handle.update.nbytes == FP32_BYTES // 2  # half the bytes of the float32 masters
        metrics = ray.get(worker.sync_weights.remote(handle), timeout=60)
        assert metrics["weight_sync_bytes"] == FP32_BYTES // 2
        assert_cast_of(worker_state(worker), masters)
        groups = ray.get(worker.rollout.remote(2, 0), timeout=120)  # samples with the bf16 weights
        assert len(groups) == 2 and all(g.completion_ids.shape == (2, 20) for g in groups)
    finally:
        ray.kill(worker)


def test_cpu_auto_keeps_float32_workers_and_full_bytes(ray_cluster):
    s = spec("auto")
    learner = Learner(s)
    worker = RolloutWorker(s)
    assert learner.rollout_dtype == torch.float32 == next(worker.model.parameters()).dtype
    masters = step_masters(learner, 1)
    handle = WeightPublisher().adopt(*(ray.put(x) for x in learner.weight_payload()))
    assert handle.update.nbytes == FP32_BYTES
    assert worker.sync_weights(handle)["weight_sync_bytes"] == FP32_BYTES
    held = worker.model.state_dict()
    assert all(torch.equal(held[k], v) for k, v in masters.items())  # bit-exact, as before


class BroadcastWorker(RolloutWorker):
    """The rollout worker with a way to read its state from the test (Ray actor methods only)."""

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def test_collective_version_is_cast_in_the_buckets_and_lands_in_bf16_workers(ray_cluster):
    s = spec()
    learner = Learner(s)
    workers = [ray.remote(BroadcastWorker).options(num_cpus=0.1).remote(s) for _ in range(2)]
    try:
        ray.get([w.state.remote() for w in workers], timeout=120)
        address = learner.open_weight_group(3)
        joins = [w.join_weight_group.remote(address, rank) for rank, w in enumerate(workers, 1)]
        assert learner.join_weight_group() and ray.get(joins, timeout=60) == [True, True]
        for version in (1, 2):
            masters = step_masters(learner, version)
            recvs = [w.recv_weights.remote() for w in workers]
            sent = learner.send_weights()
            assert sent.error is None and sent.bytes == FP32_BYTES // 2
            for stats in ray.get(recvs, timeout=60):
                assert (stats.version, stats.transport, stats.bytes) == (version, "collective", FP32_BYTES // 2)
            for w in workers:
                assert_cast_of(ray.get(w.state.remote(), timeout=60), masters)
    finally:
        learner.publisher.close_group()
        for w in workers:
            ray.kill(w)


def test_lora_worker_holds_base_and_adapters_in_bf16_and_applies_the_learners_adapters():
    lora = {"lora": {"r": 4, "alpha": 8.0}}
    s = spec(**lora)
    learner = Learner(s)
    worker = RolloutWorker(s)
    assert {p.dtype for p in worker.model.parameters()} == {torch.bfloat16}  # peft's fp32 adapters too
    adapters = step_masters(learner, 1)  # lora_B starts at zero: this makes the adapters count
    assert adapters and all("lora_" in k for k in adapters)
    assert {v.dtype for v in adapters.values()} == {torch.float32}
    update, payload = learner.weight_payload()
    assert update.names == list(adapters) and {t.dtype for t in update.manifest} == {"bfloat16"}
    handle = WeightPublisher().adopt(ray.put(update), ray.put(payload))
    worker.sync_weights(handle)
    assert_cast_of(worker.model.state_dict(), adapters)
    # The bf16 worker's policy is the learner's merged policy W + (alpha / r) B A, up to bf16
    # rounding: its logits against the float32 LoRA learner's on the same tokens.
    tokens = torch.randint(4, 20, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = worker.model(tokens).logits.float()
        theirs = learner.model(tokens).logits
    assert not torch.equal(adapters[next(k for k in adapters if "lora_B" in k)], torch.zeros(1))
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()
    merged = {k: v for k, v in worker.model.state_dict().items() if "lora_" not in k}
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    r = Rank(rank, world)
    sharding.join(r, "127.0.0.1", port, torch.device("cpu"))
    try:
        torch.manual_seed(0)
        model, _ = build_tiny(hidden=32, layers=2, heads=2)
        sharding.shard(model, "bfloat16", torch.device("cpu"))
        state = model.state_dict()
        full = {k: sharding.full(v).detach().clone() for k, v in state.items()}  # the fp32 masters
        if r.lead:
            update, payload = encode(3, state, cast=torch.bfloat16)  # what Learner.weight_payload runs
            torch.save({"masters": full, "manifest": [(t.name, t.dtype, t.nbytes) for t in update.manifest],
                        "payload": [torch.from_numpy(a.copy()) for a in payload]}, out)
        else:
            sharding.follow_gather(state, skip_empty=False, cast=torch.bfloat16)
        torch.distributed.barrier()
    finally:
        sharding.leave()


def test_learner_group_gathers_bf16_shards_into_the_payload():
    """Each rank casts its float32 shard before the all-gather (half the gathered bytes); the
    lead's payload is the gathered masters cast to bf16."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "payload.pt")
        mp.start_processes(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
        got = torch.load(out, weights_only=True)
    masters = got["masters"]
    assert {v.dtype for v in masters.values()} == {torch.float32}
    assert [(n, d) for n, d, _ in got["manifest"]] == [(k, "bfloat16") for k in masters]
    for (name, _, nbytes), raw in zip(got["manifest"], got["payload"]):
        assert nbytes == masters[name].numel() * 2 == raw.numel()
        assert torch.equal(raw.view(torch.bfloat16).view(masters[name].shape), masters[name].to(torch.bfloat16))


def test_plan_sizes_workers_in_the_dtype_they_load():
    """What `dlrl plan` sizes the workers with is what the worker loads (dlrl.footprint)."""
    from dlrl import footprint

    for compute, device, want in (("auto", "cpu", "float32"), ("auto", "cuda", "bfloat16"),
                                  ("bfloat16", "cpu", "bfloat16")):
        s = spec(compute)
        assert footprint.rollout_dtype_on(s, device) == want
        assert rollout_dtype(s.model.dtype, s.train.compute_dtype, device) == getattr(torch, want)


@pytest.mark.slow
def test_async_bf16_rollout_logs_the_behaviour_elbo_gap(ray_cluster, tmp_path):
    """An asynchronous run with bf16 workers (asked for on the CPU): on the steps whose batch the
    learner's current weights generated, metrics.jsonl carries behaviour_elbo_gap, the mean |d|
    the bf16 behaviour terms leave before any update: non-zero, and small beside clip_eps."""
    base = tiny_spec(tmp_path, "gap", ray_address=ray_cluster.address, max_staleness=1, checkpoint_every=0)
    s = base.model_copy(update={"train": base.train.model_copy(update={"compute_dtype": "bfloat16"})})
    run(s)
    train = [r for r in read_metrics(tmp_path / "gap" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == s.train.steps and train[0]["max_staleness"] == 0  # batch 0: made by version 0
    gaps = [r["behaviour_elbo_gap"] for r in train if "behaviour_elbo_gap" in r]
    assert train[0]["behaviour_elbo_gap"] == train[0]["d_abs_first"]  # every row on-policy
    assert all(0 < g < 0.02 for g in gaps)
    # a batch made entirely by older weights has no on-policy rows, and no gap to report
    assert all("behaviour_elbo_gap" not in r for r in train if r["staleness_hist"] == {"1": s.rollout.prompts_per_step})
