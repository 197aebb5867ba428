"""The two ends of weight sync as the learner and the rollout workers hold them.

`WeightPublisher` (learner actor) and `WeightReceiver` (each rollout worker) wrap the two
transports with the rules that must hold whichever one carries a version:

- a receiver never applies an older version than it holds, fetches nothing for the version it
  already holds, and refuses tensors that do not fit its model (see update.py); a learner
  restarted from an earlier checkpoint is announced with `WeightPublisher.rewind()`, which starts
  a new generation whose lower version numbers the workers then accept;
- the object store is always there: every failure of the collective group (it cannot be formed,
  a broadcast fails or times out, a worker was restarted and is not in it) is logged with its
  reason, the group is closed, and the version goes through `publish` / `receive` instead;
- a receiver whose broadcast broke half-way holds a torn mix of two versions; it records that
  (version TORN) so that the object-store copy of any version is applied over it.

Workers swap weights only between generation batches: a Ray actor runs one call at a time, so a
sync call (`receive` / `recv`) never overlaps the generate call on the same worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from dlrl.config import WeightsSpec
from dlrl.weights.collective import CollectiveError, CollectiveReceiver, CollectiveSender, GroupAddress
from dlrl.weights.object_store import WeightHandle, adopt, publish, receive
from dlrl.weights.update import TORN, SyncStats, Transport, check_manifest, check_version, target_state

if TYPE_CHECKING:  # Ray is imported where it is used: the learner step and benchmarks run without it
    import ray

log = logging.getLogger(__name__)


class WeightPublisher:
    """The learner's end: the latest version in the object store, and an optional broadcast group."""

    def __init__(self, bucket_mb: float = 256.0, backend: Literal["auto", "gloo", "nccl"] = "auto",
                 timeout_s: float = 60.0) -> None:
        self.bucket_mb, self.backend, self.timeout_s = bucket_mb, backend, timeout_s
        self.latest: WeightHandle | None = None
        self.sender: CollectiveSender | None = None
        self.generation = 0

    @classmethod
    def from_spec(cls, spec: WeightsSpec, timeout_s: float = 60.0) -> "WeightPublisher":
        """From the job's `weights` section (`spec.weights`)."""
        return cls(bucket_mb=spec.bucket_mb, timeout_s=timeout_s)

    def rewind(self) -> int:
        """The learner restarted from an earlier checkpoint: versions published from now on belong
        to a new generation, so workers accept them although their numbers went down."""
        self.generation += 1
        return self.generation

    def _check_order(self, version: int) -> bool:
        """False if `version` is the latest published; ValueError if it is older."""
        if self.latest is None:
            return True
        return check_version(version, self.latest.version, self.generation, self.latest.generation)

    def publish(self, version: int, state: Mapping[str, torch.Tensor],
                cast: torch.dtype | None = None) -> WeightHandle:
        """The object-store handle of `version` (put once; the latest is kept for catch-ups),
        floating-point tensors in `cast` (the workers' rollout dtype) if given."""
        if self._check_order(version):
            self.latest = publish(version, state, self.generation, cast)
        return self.latest

    def adopt(self, update_ref: ray.ObjectRef, payload_ref: ray.ObjectRef) -> WeightHandle:
        """Publish a version encoded elsewhere (object_store.adopt): the driver's way to publish
        the learner actor's `encode(version, state)` results without fetching them."""
        handle = adopt(update_ref, payload_ref, self.timeout_s)
        handle = replace(handle, update=replace(handle.update, generation=self.generation))
        self._check_order(handle.version)
        self.latest = handle
        return handle

    def open_group(self, world_size: int, host: str = "127.0.0.1") -> GroupAddress:
        """A new broadcast group of this learner and world_size - 1 workers (any old one is closed)."""
        self.close_group()
        self.sender = CollectiveSender(world_size, bucket_mb=self.bucket_mb, backend=self.backend,
                                       host=host, timeout_s=self.timeout_s)
        return self.sender.address

    def join_group(self) -> bool:
        """Form the group (the workers join at the same time); False, logged, if it failed."""
        if self.sender is None:
            raise RuntimeError("open_group first")
        try:
            self.sender.join()
            return True
        except CollectiveError as exc:
            log.warning("weight group unavailable, using the object store: %s", exc)
            self.close_group()
            return False

    def send(self, version: int, state: Mapping[str, torch.Tensor], cast: torch.dtype | None = None) -> SyncStats:
        """Broadcast `version` to the group (the workers call `WeightReceiver.recv` at the same
        time), floating-point tensors in `cast` if given. On failure the stats carry the error and
        the group is closed: publish instead."""
        if self.sender is None or self.sender.group is None:
            return SyncStats(version, "none", 0.0, 0, error="no weight group", generation=self.generation)
        t0 = time.perf_counter()
        try:
            return self.sender.send(version, state, self.generation, cast)
        except CollectiveError as exc:
            log.warning("weight broadcast failed, falling back to the object store: %s", exc)
            self.close_group()
            return SyncStats(version, "collective", time.perf_counter() - t0, 0, error=str(exc),
                             generation=self.generation)

    def close_group(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


class WeightReceiver:
    """A rollout worker's end: the version its model holds, and both ways a version arrives.

    `target` is the worker's model (updated in place) or a name -> tensor mapping of it.
    `version` is what the model holds at construction: 0 for the job's starting checkpoint, which
    the learner's version 0 is too (so version 0 is never transferred). `generation` counts the
    learner's rewinds (WeightPublisher.rewind) behind that version.
    """

    def __init__(self, target: nn.Module | Mapping[str, torch.Tensor], version: int = 0,
                 generation: int = 0) -> None:
        self.target = target
        self.version, self.generation = version, generation
        self.collective: CollectiveReceiver | None = None

    def _stats(self, transport: Transport, seconds: float = 0.0, nbytes: int = 0,
               error: str | None = None) -> SyncStats:
        return SyncStats(self.version, transport, seconds, nbytes, error, self.generation)

    def receive(self, handle: WeightHandle, timeout_s: float | None = 300.0) -> SyncStats:
        """Apply a published version from the object store (fetched only if it is newer)."""
        if not check_version(handle.version, self.version, handle.generation, self.generation):
            return self._stats("none")
        state = target_state(self.target)
        check_manifest(handle.update, state)  # before fetching anything
        incoming, stats = receive(handle, timeout_s)
        t0 = time.perf_counter()
        self.version = TORN  # until every tensor is written
        with torch.no_grad():
            for name, tensor in incoming.items():
                state[name].copy_(tensor)
        self.version, self.generation = handle.version, handle.generation
        return self._stats("object_store", stats.seconds + time.perf_counter() - t0, stats.bytes)

    def join_group(self, address: GroupAddress, rank: int) -> bool:
        """Join a broadcast group (the learner and the other workers at the same time); False,
        logged, if it could not be formed: this worker then takes versions from the object store."""
        self.leave_group()
        receiver = CollectiveReceiver(address, rank)
        try:
            receiver.join()
        except CollectiveError as exc:
            log.warning("weight group unavailable, using the object store: %s", exc)
            return False
        self.collective = receiver
        return True

    def recv(self) -> SyncStats:
        """Take part in the learner's broadcast. On failure the stats carry the error, the group is
        closed and `version` is the one still held (TORN if part was written): the driver must then
        `receive` the version's handle."""
        if self.collective is None:
            return self._stats("none", error="not in a weight group")
        t0 = time.perf_counter()
        try:
            stats = self.collective.recv_into(self.target, self.version, self.generation)
        except CollectiveError as exc:
            log.warning("weight broadcast failed, this worker falls back to the object store: %s", exc)
            self.leave_group()
            if exc.torn:
                self.version = TORN
            return self._stats("collective", time.perf_counter() - t0, error=str(exc))
        self.version, self.generation = stats.version, stats.generation
        return stats

    def leave_group(self) -> None:
        if self.collective is not None:
            self.collective.close()
            self.collective = None
