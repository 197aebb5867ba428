"""What a weights update is, whichever transport carries it: a version and a manifest.

A `WeightUpdate` is small, serialisable metadata (version, names/shapes/dtypes, byte count) that
travels ahead of the tensors, so a receiver can refuse an update *before* it touches its model:
an older version than it holds (`StaleVersionError`), or tensors that do not match its own
(`ManifestMismatchError`: a LoRA learner talking to a full-model worker, a different checkpoint).
`load_state_dict(strict=False)` would skip such tensors silently and leave a worker sampling with
weights nobody trained; here that is an error naming the tensors.

Versions are ordered by (generation, version). The generation counts deliberate rewinds: a
driver that restarts a crashed learner from an earlier checkpoint publishes lower version numbers
again, under a higher generation, and only that lets a worker go back.

`SyncStats` is what each side measures and the driver logs (weight_sync_seconds/bytes).

The sender may cast a version's floating-point tensors to another dtype on their way out
(`wire_tensor`: the learner's float32 masters travel in the workers' rollout dtype, bf16 on GPUs,
dlrl.precision.rollout_dtype). The manifest then names the dtype that travels, which is the one
the receiver holds, so the receiver's check is the same strict one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Transport = Literal["object_store", "collective", "none"]
TORN = -1
"""Version of a receiver whose weights are a mix of two versions (a collective broadcast failed
half-way); any complete update is newer than it."""


class StaleVersionError(ValueError):
    """An update older than the version the receiver already holds."""


class ManifestMismatchError(ValueError):
    """An update whose tensor names, shapes or dtypes do not match the receiver's model."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32", "bfloat16"

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * dtype_of(self.dtype).itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, cast: torch.dtype | None = None) -> "TensorSpec":
        """The tensor's spec, as it travels when cast to `cast` (see `wire_dtype`)."""
        return cls(name, tuple(tensor.shape), str(wire_dtype(tensor, cast)).removeprefix("torch."))


@dataclass(frozen=True)
class WeightUpdate:
    """Version `version` of the published tensors, described but not carried."""

    version: int
    manifest: tuple[TensorSpec, ...]
    transport: Transport
    generation: int = 0
    """Rewinds of the learner before this version (see the module docstring)."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.manifest)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.manifest]

    @classmethod
    def of(cls, version: int, state: Mapping[str, torch.Tensor], transport: Transport,
           generation: int = 0, cast: torch.dtype | None = None) -> "WeightUpdate":
        """The update of `state` as it travels: floating-point tensors in `cast` if given."""
        if version < 0 or generation < 0:
            raise ValueError(f"weight versions and generations start at 0, got {version}, {generation}")
        return cls(version, tuple(TensorSpec.of(k, v, cast) for k, v in state.items()), transport, generation)


@dataclass(frozen=True)
class SyncStats:
    """One side's cost of one sync; `version` is what the receiver holds afterwards."""

    version: int
    transport: Transport
    seconds: float
    bytes: int
    error: str | None = None
    """Why the collective failed; the receiver then holds TORN or its old version and must be sent
    the version through the object store."""
    generation: int = 0
    """The generation of `version`."""

    def metrics(self) -> dict[str, float]:
        return {"weight_sync_seconds": self.seconds, "weight_sync_bytes": float(self.bytes)}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ManifestMismatchError(f"unknown tensor dtype {name!r}")
    return dtype


def target_state(target: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors an update is written into: a module's state (views of its parameters and
    buffers, so writing them updates the module in place) or a given name -> tensor mapping."""
    if isinstance(target, nn.Module):
        return target.state_dict(keep_vars=False)
    return dict(target)


def check_manifest(update: WeightUpdate, target: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of `update` must exist in `target` with the same shape and dtype.

    An update may cover part of the target (LoRA runs send the adapter tensors only), but never a
    tensor the target lacks or holds in another shape: that is raised with every offending name.
    """
    unknown = [t.name for t in update.manifest if t.name not in target]
    differ = [
        f"{t.name}: update {t.dtype}{list(t.shape)} vs model {TensorSpec.of(t.name, target[t.name]).dtype}"
        f"{list(target[t.name].shape)}"
        for t in update.manifest
        if t.name in target and TensorSpec.of(t.name, target[t.name]) != t
    ]
    if unknown or differ:
        lines = []
        if unknown:
            lines.append(f"{len(unknown)} tensor(s) the receiver does not have: {unknown[:8]}"
                         + (" ..." if len(unknown) > 8 else ""))
        if differ:
            lines.append(f"{len(differ)} tensor(s) of another shape or dtype: {differ[:8]}"
                         + (" ..." if len(differ) > 8 else ""))
        raise ManifestMismatchError(f"weights version {update.version} does not fit this model; "
                                    + "; ".join(lines))


def check_version(incoming: int, held: int, incoming_generation: int = 0, held_generation: int = 0) -> bool:
    """True if `incoming` should be applied; False if it is the version already held (a no-op);
    StaleVersionError if it is older (a receiver never moves back in policy time, except to a
    version of a later generation: a deliberate rewind)."""
    if (incoming_generation, incoming) < (held_generation, held):
        raise StaleVersionError(f"weights version {incoming} (generation {incoming_generation}) is older than "
                                f"the held version {held} (generation {held_generation})")
    return (incoming_generation, incoming) > (held_generation, held)


def wire_dtype(tensor: torch.Tensor, cast: torch.dtype | None) -> torch.dtype:
    """The dtype `tensor` travels in: `cast` for a floating-point tensor (weights), its own for
    anything else (integer buffers, None: no cast)."""
    return cast if cast is not None and tensor.is_floating_point() else tensor.dtype


def wire_tensor(tensor: torch.Tensor, cast: torch.dtype | None = None) -> torch.Tensor:
    """The whole tensor as it travels (detached): cast to `wire_dtype` where it differs, then
    materialized. A learner group's shard is cast before it is gathered, so the all-gather moves
    the travelling bytes too; each tensor is cast once, as its turn to be sent comes, so no second
    copy of the model exists at once."""
    tensor = tensor.detach()
    dtype = wire_dtype(tensor, cast)
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return materialize(tensor).detach()


def materialize(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a shard of a sharded learner (a torch DTensor) is all-gathered (a
    collective its peers join in the same order, learner.sharding.follow_gather); any other tensor
    is itself."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor
