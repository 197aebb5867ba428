"""Weights by a bucketed torch.distributed broadcast: learner = rank 0, workers = ranks 1..N.

On GPUs the object store stages every version through host memory on both sides; a broadcast
moves it GPU to GPU (NCCL) and writes it straight into the workers' parameters. The same code
runs with gloo on CPU tensors, which is how it is tested here.

The group is stateless with respect to `torch.distributed`'s global default group: the backend
object is built directly on a PrefixStore of a TCPStore held by the sender (one store per group,
on a free port of the sender's host), so a learner that also uses torch.distributed for its own
training, or a group rebuilt after a worker restart, never collide with another group.

A collective needs every rank at once, so the driver must issue the calls together and only then
wait on them:

    address = sender.address                                 # learner actor: CollectiveSender(...)
    ray.get([learner.join.remote()] + [w.join.remote(address, rank) for rank, w in ...])
    ray.get([learner.send.remote(v)] + [w.recv.remote() for w in workers])   # per version

`send(version, state)` broadcasts a header (version + manifest, JSON) and then the buckets;
`recv_into(target, held)` reads the header first and, if the update is older than `held` or does
not fit the target, still takes part in the remaining broadcasts (into scratch buffers, so the
group stays in step) and then raises. Any failure or timeout raises `CollectiveError`, after which
the group is closed: the caller falls back to the object store (see WeightReceiver) or rebuilds.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from dlrl.weights.buckets import Bucket, byte_view, pack, plan_buckets, unpack
from dlrl.weights.update import (
    ManifestMismatchError,
    StaleVersionError,
    SyncStats,
    TensorSpec,
    WeightUpdate,
    check_manifest,
    check_version,
    target_state,
    wire_tensor,
)

Backend = Literal["gloo", "nccl"]
MB = 1024 * 1024


class CollectiveError(RuntimeError):
    """The group could not be formed, or a broadcast failed or timed out; the group is closed.

    `torn` is True when part of a version had already been written into the receiver's tensors.
    """

    def __init__(self, message: str, torn: bool = False) -> None:
        super().__init__(message)
        self.torn = torn


@dataclass(frozen=True)
class GroupAddress:
    """Everything a worker needs to join a weight-broadcast group (small, serialisable)."""

    host: str
    port: int
    name: str
    world_size: int
    backend: Backend
    timeout_s: float


def pick_backend(choice: Literal["auto", "gloo", "nccl"]) -> Backend:
    """'auto': NCCL when CUDA is visible (GPU tensors), else gloo (CPU tensors)."""
    if choice == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return choice


def local_ip_towards(host: str) -> str:
    """This machine's address on the interface that routes to `host` (loopback for loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


class _Group:
    """One rank's end of a broadcast group: the backend object and the calls made on it."""

    def __init__(self, address: GroupAddress, rank: int, store: dist.Store, local_host: str) -> None:
        self.address, self.rank = address, rank
        self.timeout = timedelta(seconds=address.timeout_s)
        prefix = dist.PrefixStore(address.name, store)
        if address.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(prefix, rank, address.world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = self.timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
            self.pg = dist.ProcessGroupGloo(prefix, rank, address.world_size, options)
            self.device = torch.device("cpu")
        self.store = store  # the TCPStore must outlive the group
        # NCCL connects lazily, at the first collective: one tiny broadcast surfaces a missing or
        # unreachable rank now, under the timeout, rather than at the first weights version.
        self.broadcast(torch.zeros(1, dtype=torch.uint8, device=self.device))

    def broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, self.timeout
        self.pg.broadcast([tensor], opts).wait(self.timeout)

    def broadcast_header(self, header: bytes | None) -> bytes:
        length = torch.tensor([len(header) if header is not None else 0], dtype=torch.int64, device=self.device)
        self.broadcast(length)
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        if header is not None:
            data.copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        self.broadcast(data)
        return data.cpu().numpy().tobytes()

    def close(self) -> None:
        # Drop the backend here, not when this object is collected: a failed call's traceback can
        # keep it alive, and a gloo group closes its sockets (which tells the peers at once,
        # instead of after their timeout) only when the backend is destroyed.
        pg, self.pg = self.pg, None
        if pg is None:
            return
        try:
            pg.abort()  # frees NCCL communicators (for gloo it does not close the sockets)
        except (RuntimeError, AttributeError, NotImplementedError):
            pass
        del pg


def _connect(address: GroupAddress, rank: int, store_factory, local_host: str) -> _Group:
    try:
        return _Group(address, rank, store_factory(), local_host)
    except (RuntimeError, dist.DistBackendError, TimeoutError, OSError) as exc:
        raise CollectiveError(f"rank {rank} could not join weight group {address.name} at "
                              f"{address.host}:{address.port}: {exc}") from exc


def _encode_header(update: WeightUpdate, bucket_bytes: int) -> bytes:
    return json.dumps({
        "version": update.version,
        "generation": update.generation,
        "bucket_bytes": bucket_bytes,
        "manifest": [[t.name, list(t.shape), t.dtype] for t in update.manifest],
    }).encode()


def _decode_header(data: bytes) -> tuple[WeightUpdate, int]:
    """JSON from rank 0 (never pickle); a malformed header is an error, not a guess."""
    try:
        header = json.loads(data)
        manifest = tuple(TensorSpec(str(n), tuple(int(d) for d in s), str(dt)) for n, s, dt in header["manifest"])
        update = WeightUpdate(int(header["version"]), manifest, "collective", int(header["generation"]))
        return update, int(header["bucket_bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CollectiveError(f"malformed weights header: {exc}") from exc


class CollectiveSender:
    """Rank 0 of a weight-broadcast group (the learner). Holds the group's TCPStore.

    Construct (opens the store on a free port of `host`), hand `address` to the workers, then
    call `join()` while every worker calls `CollectiveReceiver.join()`.
    """

    def __init__(self, world_size: int, *, bucket_mb: float = 256.0,
                 backend: Literal["auto", "gloo", "nccl"] = "auto", host: str = "127.0.0.1",
                 timeout_s: float = 60.0, name: str | None = None) -> None:
        if world_size < 2:
            raise ValueError(f"a broadcast group needs the sender and at least one receiver, got {world_size}")
        self.bucket_bytes = max(1, int(bucket_mb * MB))
        timeout = timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        self.address = GroupAddress(host, self._store.port, name or f"dlrl-weights-{uuid.uuid4().hex[:12]}",
                                    world_size, pick_backend(backend), timeout_s)
        self.group: _Group | None = None

    def join(self) -> None:
        """Form the group; returns when every receiver has joined (CollectiveError on timeout)."""
        self.group = _connect(self.address, 0, lambda: self._store, self.address.host)

    def send(self, version: int, state: Mapping[str, torch.Tensor], generation: int = 0,
             cast: torch.dtype | None = None) -> SyncStats:
        """Broadcast `state` as weights version `version` (every receiver must be in `recv_into`),
        its floating-point tensors cast to `cast` if given, one bucket at a time as it is packed.

        Tensors already on the group's device (CUDA for NCCL) in the travelling dtype are read in
        place; others are cast and copied there one bucket at a time.
        """
        if self.group is None:
            raise CollectiveError(f"weight group {self.address.name} is not joined or was closed")
        t0 = time.perf_counter()
        update = WeightUpdate.of(version, state, "collective", generation, cast)
        tensors = list(state.values())
        group = self.group
        try:
            group.broadcast_header(_encode_header(update, self.bucket_bytes))
            for bucket in plan_buckets(update.manifest, self.bucket_bytes):
                group.broadcast(self._bucket_bytes(bucket, tensors, cast))
        except (RuntimeError, dist.DistBackendError) as exc:
            self.close()
            raise CollectiveError(f"broadcast of weights version {version} failed: {exc}") from exc
        return SyncStats(version, "collective", time.perf_counter() - t0, update.nbytes, generation=generation)

    def _bucket_bytes(self, bucket: Bucket, tensors: Sequence[torch.Tensor],
                      cast: torch.dtype | None) -> torch.Tensor:
        """The bucket's bytes on the group's device. Each tensor is cast and materialized once,
        here (a learner group's shards are all-gathered as their bucket is filled, in manifest
        order)."""
        device = self.group.device
        full = {slot.index: wire_tensor(tensors[slot.index], cast) for slot in bucket.slots}
        if len(bucket.slots) == 1:
            t = full[bucket.slots[0].index]
            if t.device == device and t.is_contiguous():
                return byte_view(t)  # a bucket-sized tensor goes out as it is, no copy
        return pack(bucket, full, device)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


class CollectiveReceiver:
    """Rank `rank` (1..N) of a weight-broadcast group (a rollout worker)."""

    def __init__(self, address: GroupAddress, rank: int, local_host: str | None = None) -> None:
        if not 1 <= rank < address.world_size:
            raise ValueError(f"receiver rank must be in 1..{address.world_size - 1}, got {rank}")
        self.address, self.rank = address, rank
        self.local_host = local_host or local_ip_towards(address.host)
        self.group: _Group | None = None

    def join(self) -> None:
        """Form the group with the sender and the other receivers (CollectiveError on timeout)."""
        a = self.address
        self.group = _connect(a, self.rank, lambda: dist.TCPStore(
            a.host, a.port, a.world_size, is_master=False, timeout=timedelta(seconds=a.timeout_s)
        ), self.local_host)

    def recv_into(self, target: nn.Module | Mapping[str, torch.Tensor], held: int,
                  held_generation: int = 0) -> SyncStats:
        """Receive the version being sent and write it into `target`'s tensors in place.

        `held` (of `held_generation`) is the version the target holds now: an equal version is
        received and discarded (transport "none"), an older one or one that does not fit raises
        StaleVersionError / ManifestMismatchError after the broadcast, with `target` untouched.
        """
        if self.group is None:
            raise CollectiveError(f"weight group {self.address.name} is not joined or was closed")
        group, t0, written = self.group, time.perf_counter(), False
        try:
            update, bucket_bytes = _decode_header(group.broadcast_header(None))
            refusal: Exception | None = None
            apply = False
            tensors: list[torch.Tensor | None] = [None] * len(update.manifest)
            try:
                state = target_state(target)
                check_manifest(update, state)
                apply = check_version(update.version, held, update.generation, held_generation)
                tensors = [state[name] for name in update.names]
            except (StaleVersionError, ManifestMismatchError) as exc:
                refusal = exc
            buckets = plan_buckets(update.manifest, bucket_bytes)
            written = apply and bool(buckets)  # from the first bucket on, a failure leaves a torn mix
            for bucket in buckets:
                self._recv_bucket(bucket, tensors if apply else None)
        except (RuntimeError, dist.DistBackendError) as exc:
            self.close()
            raise CollectiveError(f"rank {self.rank}: receiving weights failed: {exc}", torn=written) from exc
        if refusal is not None:
            raise refusal
        if not apply:
            return SyncStats(held, "none", time.perf_counter() - t0, 0, generation=held_generation)
        return SyncStats(update.version, "collective", time.perf_counter() - t0, update.nbytes,
                         generation=update.generation)

    def _recv_bucket(self, bucket: Bucket, tensors: Sequence[torch.Tensor] | None) -> None:
        device = self.group.device
        if tensors is not None and len(bucket.slots) == 1:
            t = tensors[bucket.slots[0].index]
            if t.device == device and t.is_contiguous():
                with torch.no_grad():
                    self.group.broadcast(byte_view(t))  # straight into the parameter
                return
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        self.group.broadcast(buffer)
        if tensors is not None:
            with torch.no_grad():
                unpack(bucket, buffer, tensors)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
