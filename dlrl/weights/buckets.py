"""Bucket plan of a collective weight broadcast: which byte range of which bucket holds each tensor.

Broadcasting tensor by tensor costs one collective launch per tensor (hundreds for an 8B model);
one buffer for the whole model costs a second full copy of it. Buckets of at most `bucket_bytes`
bound both. Buckets hold raw bytes, not one dtype: every byte range starts at a multiple of
`ALIGN`, so a slice viewed as float32/bfloat16/... is a valid tensor view, mixed-dtype states
(float32 norms next to bfloat16 matrices) pack into the same buckets, and the broadcast does not
depend on which dtypes a backend reduces (a broadcast only moves bytes). A tensor larger than a
bucket gets a bucket of its own, which is then broadcast straight from/into the tensor.

Sender and receivers compute the same plan from the same manifest (a pure function), so only the
manifest crosses the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dlrl.weights.update import TensorSpec, materialize

ALIGN = 64
"""Byte alignment of every tensor in a bucket (>= the largest element size, and a cache line)."""


@dataclass(frozen=True)
class Slot:
    index: int  # position of the tensor in the manifest
    offset: int  # byte offset in the bucket (a multiple of ALIGN)
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    slots: tuple[Slot, ...]


def plan_buckets(manifest: Sequence[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Pack the manifest's tensors, in order, into buckets of at most `bucket_bytes` bytes
    (a single tensor larger than that gets a bucket of its own). Empty tensors are skipped."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    end = 0
    for i, spec in enumerate(manifest):
        n = spec.nbytes
        if n == 0:
            continue
        offset = -(-end // ALIGN) * ALIGN
        if slots and offset + n > bucket_bytes:
            buckets.append(Bucket(end, tuple(slots)))
            slots, offset = [], 0
        slots.append(Slot(i, offset, n))
        end = offset + n
    if slots:
        buckets.append(Bucket(end, tuple(slots)))
    return buckets


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's storage (no copy)."""
    return tensor.reshape(-1).view(torch.uint8)


def pack(bucket: Bucket, tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The bucket's bytes: each slot's tensor copied to its offset (one bucket-sized buffer)."""
    buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    for slot in bucket.slots:
        buffer.narrow(0, slot.offset, slot.nbytes).copy_(byte_view(materialize(tensors[slot.index]).detach().contiguous()))
    return buffer


def unpack(bucket: Bucket, buffer: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
    """Copy each slot of a received bucket into its target tensor, in place."""
    for slot in bucket.slots:
        target = targets[slot.index]
        src = buffer.narrow(0, slot.offset, slot.nbytes).view(target.dtype).view(target.shape)
        target.copy_(src)
