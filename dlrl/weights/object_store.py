"""Weights through the Ray object store: the learner puts a version once, each worker fetches it.

Always available (CPU, GPU, across nodes, after a worker restart), so it is the default transport
and the fallback of the collective one. The learner calls `publish(version, state)` and hands the
returned `WeightHandle` to the workers; a worker calls `receive(handle)` (or, through
`WeightReceiver`, only when its version differs).

Payload format: the tensors' raw bytes as a list of uint8 numpy arrays, in manifest order; the
manifest (names, shapes, dtypes) travels in the handle. Ray stores numpy arrays out of band, so a
worker on the same node reads them straight from shared memory (zero-copy) and the only copy is
into its parameters; torch tensors pickled through the store are deserialised into fresh memory
instead (bench/weight_sync.py measures both). Bytes, rather than numpy arrays of the tensor's
dtype, because numpy has no bfloat16.

The handle keeps its ObjectRef inside a dataclass: Ray resolves an ObjectRef passed directly as
an actor-call argument (every worker would then fetch, even one that already holds the version);
a nested one arrives as a reference and is fetched only by `receive`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dlrl.weights.buckets import byte_view
from dlrl.weights.update import SyncStats, WeightUpdate, dtype_of, wire_tensor

if TYPE_CHECKING:  # imported where used, so code that only encodes (a GPU benchmark) needs no Ray
    import ray


@dataclass(frozen=True)
class WeightHandle:
    """A published version: its manifest and the object-store reference to its bytes."""

    update: WeightUpdate
    refs: list[ray.ObjectRef]  # one ref; a list so Ray passes it through unresolved
    publish_seconds: float  # encode + put (or, adopted, the wait for the manifest)

    @property
    def version(self) -> int:
        return self.update.version

    @property
    def generation(self) -> int:
        return self.update.generation

    @property
    def stats(self) -> SyncStats:
        """The publishing side's cost: seconds to encode and put, bytes put."""
        return SyncStats(self.version, "object_store", self.publish_seconds, self.update.nbytes,
                         generation=self.generation)


def encode(version: int, state: Mapping[str, torch.Tensor], generation: int = 0,
           cast: torch.dtype | None = None) -> tuple[WeightUpdate, list[np.ndarray]]:
    """The manifest and the payload (raw bytes of each tensor, manifest order) of a state, its
    floating-point tensors cast to `cast` if given (update.wire_tensor: on their device, before
    they are gathered or copied to the host, so both move the cast bytes).

    The arrays view CPU tensors without copying (tensors on a GPU are copied to the host first).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"weights must be a name -> tensor mapping, got {type(state).__name__}: publish "
                        "in the process that holds the weights (the learner actor), not a reference to them")
    update = WeightUpdate.of(version, state, "object_store", generation, cast)
    return update, [byte_view(wire_tensor(t, cast).to("cpu").contiguous()).numpy() for t in state.values()]


def publish(version: int, state: Mapping[str, torch.Tensor], generation: int = 0,
            cast: torch.dtype | None = None) -> WeightHandle:
    """Put `state` (any device) into the object store as weights version `version` (floating-point
    tensors in `cast` if given).

    The object is owned by the calling process (the learner actor) and lives while that process
    and a handle to it do: keep the latest handle so a restarted worker can catch up.
    """
    t0 = time.perf_counter()
    update, payload = encode(version, state, generation, cast)
    import ray

    ref = ray.put(payload)  # the one copy: into shared memory
    return WeightHandle(update, [ref], time.perf_counter() - t0)


def adopt(update_ref: ray.ObjectRef, payload_ref: ray.ObjectRef, timeout_s: float | None = 300.0) -> WeightHandle:
    """The handle of a version another process encoded, for a caller that owns the references.

    `update_ref, payload_ref = learner.weight_payload.options(num_returns=2).remote()`, where the
    actor method returns `encode(version, state)`: Ray makes the caller (the driver) the owner of
    a call's results, so the version outlives the learner process that produced it, and the
    payload stays in the zero-copy format. Only the small manifest is fetched here.
    """
    t0 = time.perf_counter()
    import ray

    update = ray.get(update_ref, timeout=timeout_s)
    if not isinstance(update, WeightUpdate):
        raise TypeError(f"expected the WeightUpdate of encode(), got {type(update).__name__}")
    return WeightHandle(update, [payload_ref], time.perf_counter() - t0)


def receive(handle: WeightHandle, timeout_s: float | None = 300.0) -> tuple[dict[str, torch.Tensor], SyncStats]:
    """Fetch a published version: name -> tensor, and what the fetch cost.

    The tensors are read-only views of the object store's shared memory (no copy): load them into
    a model (`copy_`, `load_state_dict`), do not write to them.
    """
    t0 = time.perf_counter()
    import ray

    payload = ray.get(handle.refs[0], timeout=timeout_s)
    manifest = handle.update.manifest
    if len(payload) != len(manifest):
        raise ValueError(f"weights version {handle.version}: {len(payload)} arrays for {len(manifest)} tensors")
    state = {}
    with warnings.catch_warnings():
        # torch warns that the array is not writable: it is shared memory, and it is only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for spec, array in zip(manifest, payload):
            if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.size != spec.nbytes:
                raise ValueError(f"weights version {handle.version}: payload of {spec.name} is not "
                                 f"{spec.nbytes} bytes")
            state[spec.name] = torch.from_numpy(array).view(dtype_of(spec.dtype)).view(spec.shape)
    moved = sum(a.nbytes for a in payload)
    return state, SyncStats(handle.version, "object_store", time.perf_counter() - t0, moved,
                            generation=handle.generation)
