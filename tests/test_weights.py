"""Weight sync (dlrl.weights) on the real Ray cluster: object store, gloo broadcast, fallback, rules.

Run: .venv/bin/python -m pytest -q tests/test_weights.py
"""

from __future__ import annotations

import time

import pytest
import ray
import torch

from dlrl.config import LoraSpec
from dlrl.models import load_model
from dlrl.weights import (
    TORN,
    ManifestMismatchError,
    StaleVersionError,
    TensorSpec,
    WeightPublisher,
    WeightReceiver,
    encode,
    plan_buckets,
    publish,
    receive,
)
from dlrl.weights.buckets import ALIGN

TINY = "builtin:tiny-sudoku"
BUCKET_MB = 0.2  # the tiny model is 3.3 MB: 15+ buckets, some packed, some one tensor each


def perturb(model: torch.nn.Module, seed: int) -> None:
    """A new 'version': every tensor of the state changes, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype))


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


class Learner:
    """The learner's end (run in the test process): the tiny model, perturbed per version."""

    def __init__(self) -> None:
        self.model, _ = load_model(TINY)
        self.publisher = WeightPublisher(bucket_mb=BUCKET_MB, backend="gloo", timeout_s=3.0)

    def new_version(self, version: int) -> None:
        perturb(self.model, version)

    def send(self, version: int):
        return self.publisher.send(version, self.model.state_dict())

    def publish(self, version: int):
        return self.publisher.publish(version, self.model.state_dict())


class Worker:
    """A rollout worker's end in its own process: the tiny model behind a WeightReceiver."""

    def __init__(self) -> None:
        self.model, _ = load_model(TINY)
        self.receiver = WeightReceiver(self.model)

    def join_group(self, address, rank: int) -> bool:
        return self.receiver.join_group(address, rank)

    def recv(self):
        return self.receiver.recv()

    def version(self) -> int:
        return self.receiver.version

    def receive(self, handle):
        return self.receiver.receive(handle, timeout_s=30)

    def state(self) -> dict[str, torch.Tensor]:
        return cpu_state(self.model)


@pytest.fixture(scope="module")
def peers(ray_cluster):
    """The learner (this process) and two worker actors (own processes), shared by the
    collective tests; each test forms its own group."""
    learner = Learner()
    workers = [ray.remote(Worker).options(num_cpus=0.1).remote() for _ in range(2)]
    ray.get([w.state.remote() for w in workers], timeout=120)
    yield learner, workers
    learner.publisher.close_group()
    for actor in workers:
        ray.kill(actor)


def form_group(learner: Learner, workers: list) -> list[bool]:
    """Learner and workers join at the same time, as the driver must have them do."""
    address = learner.publisher.open_group(len(workers) + 1)
    joins = [w.join_group.remote(address, rank) for rank, w in enumerate(workers, 1)]
    return [learner.publisher.join_group()] + ray.get(joins, timeout=60)


def broadcast(learner: Learner, workers: list, version: int):
    """One collective sync: the workers' recv calls are issued before the learner sends."""
    recvs = [w.recv.remote() for w in workers]
    return learner.send(version), ray.get(recvs, timeout=60)


def test_bucket_plan_covers_every_byte_aligned_and_bounded():
    manifest = [TensorSpec("a", (3,), "float32"), TensorSpec("b", (100,), "bfloat16"),
                TensorSpec("e", (0, 4), "float32"), TensorSpec("c", (), "float64"),
                TensorSpec("d", (5, 6), "float16")]
    buckets = plan_buckets(manifest, 128)
    slots = {s.index: s for b in buckets for s in b.slots}
    assert sorted(slots) == [0, 1, 3, 4]  # the empty tensor moves nothing
    for b in buckets:
        ends = [s.offset + s.nbytes for s in b.slots]
        assert b.nbytes == max(ends)
        assert all(s.offset % ALIGN == 0 for s in b.slots)
        assert b.nbytes <= 128 or len(b.slots) == 1  # only a lone oversized tensor exceeds a bucket
        spans = sorted((s.offset, s.offset + s.nbytes) for s in b.slots)
        assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))  # no overlap
    assert [len(b.slots) for b in buckets] == [1, 1, 2]  # a | b (200 B, alone) | c + d


def test_object_store_round_trip_is_bit_exact_and_moves_the_state_bytes(ray_cluster):
    model, _ = load_model(TINY)
    perturb(model, 1)
    state = cpu_state(model)
    handle = publish(1, model.state_dict())
    expected_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert handle.update.nbytes == expected_bytes == 3_273_216
    got, stats = receive(handle)
    assert_bit_exact(got, state)
    assert (stats.version, stats.transport, stats.bytes) == (1, "object_store", expected_bytes)
    assert stats.metrics() == {"weight_sync_seconds": stats.seconds, "weight_sync_bytes": float(expected_bytes)}
    assert (handle.stats.bytes, handle.stats.seconds) == (expected_bytes, handle.publish_seconds)
    with pytest.raises(TypeError, match="publish in the process that holds the weights"):
        publish(1, ray.put(state))  # a reference would make the caller fetch the whole state first

    # A worker's model: applied once in place, and not fetched again for the version it holds.
    worker, _ = load_model(TINY)
    receiver = WeightReceiver(worker)
    assert receiver.receive(handle).bytes == expected_bytes
    assert_bit_exact(cpu_state(worker), state)
    again = receiver.receive(handle)
    assert (again.transport, again.bytes, receiver.version) == ("none", 0, 1)


class Producer:
    """A learner process that only encodes its state (mixed dtypes, bfloat16 included)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.state = {"w": torch.randn(64, 64, generator=g), "h": torch.randn(10, 3, generator=g).bfloat16(),
                      "step": torch.tensor(3, dtype=torch.int64)}

    def weight_payload(self, version: int):
        return encode(version, self.state)

    def get_state(self) -> dict[str, torch.Tensor]:
        return self.state


def wait_dead(actor, timeout: float = 30.0) -> None:
    """ray.kill is asynchronous: a call made right after it may still be served."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.get_state.remote(), timeout=timeout)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    pytest.fail(f"actor still alive {timeout:.0f}s after ray.kill")


def test_driver_owned_version_outlives_the_learner_process(ray_cluster):
    producer = ray.remote(Producer).options(num_cpus=0.1).remote()
    truth = ray.get(producer.get_state.remote(), timeout=60)
    publisher = WeightPublisher()
    handle = publisher.adopt(*producer.weight_payload.options(num_returns=2).remote(7))
    assert (handle.version, publisher.latest) == (7, handle)
    ray.kill(producer)  # the learner crashes; the driver owns version 7
    wait_dead(producer)
    target = {k: torch.zeros_like(v) for k, v in truth.items()}
    stats = WeightReceiver(target).receive(handle)
    assert (stats.version, stats.bytes) == (7, 64 * 64 * 4 + 30 * 2 + 8)
    assert_bit_exact(target, truth)


def test_lora_run_sends_adapters_only(ray_cluster):
    lora = LoraSpec(r=4, alpha=8)
    learner, _ = load_model(TINY, lora=lora)
    perturb(learner, 2)
    adapters = {k: v for k, v in learner.state_dict().items() if "lora_" in k}  # Learner.weights() rule
    handle = publish(1, adapters)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    assert handle.update.names == list(adapters) and adapter_bytes < 200_000  # vs 3.3 MB full model

    worker, _ = load_model(TINY, lora=lora)
    base_before = {k: v.clone() for k, v in worker.state_dict().items() if "lora_" not in k}
    stats = WeightReceiver(worker).receive(handle)
    assert stats.bytes == adapter_bytes
    after = cpu_state(worker)
    assert_bit_exact({k: after[k] for k in adapters}, {k: v.detach() for k, v in adapters.items()})
    assert_bit_exact({k: after[k] for k in base_before}, base_before)  # base weights untouched


def test_older_version_is_rejected_and_leaves_the_model_alone(ray_cluster):
    model, _ = load_model(TINY)
    perturb(model, 3)
    v1 = publish(1, model.state_dict())
    perturb(model, 4)
    v2 = publish(2, model.state_dict())
    worker, _ = load_model(TINY)
    receiver = WeightReceiver(worker)
    receiver.receive(v2)
    held = cpu_state(worker)
    with pytest.raises(StaleVersionError, match=r"version 1 \(generation 0\) is older than the held version 2"):
        receiver.receive(v1)
    assert receiver.version == 2
    assert_bit_exact(cpu_state(worker), held)
    publisher = WeightPublisher()  # the learner side refuses to go back in time too
    publisher.publish(3, model.state_dict())
    with pytest.raises(StaleVersionError):
        publisher.publish(2, model.state_dict())
    # Unless the driver says the learner was rewound to an earlier checkpoint: a new generation.
    perturb(model, 5)
    publisher.rewind()
    rewound = publisher.publish(1, model.state_dict())
    assert (rewound.version, rewound.generation) == (1, 1)
    stats = receiver.receive(rewound)
    assert (stats.version, stats.generation, stats.transport) == (1, 1, "object_store")
    assert_bit_exact(cpu_state(worker), cpu_state(model))
    with pytest.raises(StaleVersionError):
        receiver.receive(v2)  # the abandoned generation's versions are refused from now on


def test_manifest_mismatch_is_an_error_not_a_partial_load(ray_cluster):
    model, _ = load_model(TINY)
    worker, _ = load_model(TINY)
    receiver = WeightReceiver(worker)
    before = cpu_state(worker)
    state = dict(model.state_dict())
    state["blocks.0.qkv.weight"] = torch.zeros(8, 8)  # another shape
    state["extra.weight"] = torch.zeros(2)  # a tensor the worker does not have
    with pytest.raises(ManifestMismatchError) as err:
        receiver.receive(publish(1, state))
    assert "extra.weight" in str(err.value) and "blocks.0.qkv.weight" in str(err.value)
    # A full-model learner against a LoRA worker: names differ, nothing is silently skipped.
    lora_worker, _ = load_model(TINY, lora=LoraSpec(r=2))
    with pytest.raises(ManifestMismatchError, match="does not have"):
        WeightReceiver(lora_worker).receive(publish(1, model.state_dict()))
    assert receiver.version == 0
    assert_bit_exact(cpu_state(worker), before)


def test_gloo_broadcast_two_versions_bit_exact(peers):
    learner, workers = peers
    assert form_group(learner, workers) == [True, True, True]
    for version in (1, 2):
        learner.new_version(version)
        sent, received = broadcast(learner, workers, version)
        assert sent.error is None and sent.bytes == 3_273_216
        for stats in received:
            assert (stats.version, stats.transport, stats.bytes, stats.error) == (version, "collective", 3_273_216, None)
        for w in workers:
            assert_bit_exact(ray.get(w.state.remote()), cpu_state(learner.model))
    # The version already held, sent again: received (the group stays in step), not applied.
    _, received = broadcast(learner, workers, 2)
    assert [s.transport for s in received] == ["none", "none"]
    # An older version: the workers refuse it, after taking part so that the group stays in step ...
    recvs = [w.recv.remote() for w in workers]
    assert learner.send(1).error is None
    for ref in recvs:
        with pytest.raises(StaleVersionError):
            ray.get(ref, timeout=60)
    # ... and take it once the learner is rewound to an earlier checkpoint (a new generation).
    learner.publisher.rewind()
    learner.new_version(11)
    _, received = broadcast(learner, workers, 1)
    assert [(s.version, s.generation, s.transport) for s in received] == [(1, 1, "collective")] * 2
    for w in workers:
        assert_bit_exact(ray.get(w.state.remote()), cpu_state(learner.model))

    manifest = [TensorSpec.of(k, v) for k, v in learner.model.state_dict().items()]
    buckets = plan_buckets(manifest, int(BUCKET_MB * 2**20))
    assert len(buckets) >= 10 and {len(b.slots) > 1 for b in buckets} == {True, False}


def test_receiver_whose_collective_fails_falls_back_to_the_object_store(peers):
    learner, workers = peers
    assert form_group(learner, workers) == [True, True, True]
    learner.new_version(3)
    held = ray.get([w.version.remote() for w in workers])
    assert all(0 <= v < 3 for v in held)
    # The workers wait for a broadcast the learner never starts: they time out (3 s) and leave.
    failed = ray.get([w.recv.remote() for w in workers], timeout=60)
    for stats in failed:
        assert stats.error and "receiving weights failed" in stats.error
    # The header never came, so nothing was written: each still holds its old version (not TORN).
    assert [s.version for s in failed] == held == ray.get([w.version.remote() for w in workers])
    # The learner's broadcast now fails too (its peers closed the group): it says so, quickly.
    sent = learner.send(3)
    assert sent.error is not None and sent.bytes == 0
    # Both catch up through the object store, bit-exact.
    handle = learner.publish(3)
    caught_up = ray.get([w.receive.remote(handle) for w in workers], timeout=60)
    assert [(s.version, s.transport) for s in caught_up] == [(3, "object_store")] * 2
    for w in workers:
        assert_bit_exact(ray.get(w.state.remote()), cpu_state(learner.model))
    # Their next broadcast attempt reports the missing group instead of hanging.
    assert ray.get(workers[0].recv.remote()).error == "not in a weight group"


def test_group_that_cannot_form_falls_back(peers):
    learner, workers = peers
    # Rank 2 never joins: the others give up after the timeout and report it.
    assert form_group(learner, workers[:1]) == [True, True]  # a 2-rank group forms ...
    address = learner.publisher.open_group(3)  # ... a 3-rank one missing a worker does not
    join = workers[0].join_group.remote(address, 1)
    assert learner.publisher.join_group() is False
    assert ray.get(join, timeout=60) is False
    assert learner.send(4).error == "no weight group"


def test_broadcast_broken_half_way_leaves_a_torn_worker_that_the_object_store_repairs(peers):
    learner, workers = peers
    assert form_group(learner, workers) == [True, True, True]
    learner.new_version(5)
    state = dict(learner.model.state_dict())
    # The learner fails after the header and the first buckets: its last tensor has no data.
    last = next(reversed(state))
    state[last] = torch.empty(state[last].shape, dtype=state[last].dtype, device="meta")
    recvs = [w.recv.remote() for w in workers]
    sent = learner.publisher.send(5, state)
    assert "broadcast of weights version 5 failed" in sent.error
    for stats in ray.get(recvs, timeout=60):
        assert stats.error and stats.version == TORN  # part of version 5 is in the model
    handle = learner.publish(5)
    assert [s.version for s in ray.get([w.receive.remote(handle) for w in workers], timeout=60)] == [5, 5]
    for w in workers:
        assert_bit_exact(ray.get(w.state.remote()), cpu_state(learner.model))
