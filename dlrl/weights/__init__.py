"""Weight sync: versions of the learner's weights reach the rollout workers between batches.

Two transports behind one set of rules (endpoints.py): the Ray object store (`publish` /
`receive`: always available, the default and the fallback) and a bucketed torch.distributed
broadcast group (`CollectiveSender` / `CollectiveReceiver`: NCCL between GPUs, gloo on CPUs).
LoRA runs publish the adapter tensors only (whatever state the learner hands over is what moves).
The learner casts each version's floating-point tensors once to the workers' rollout dtype
(`cast=`, dlrl.precision.rollout_dtype: bf16 on GPUs), so they travel at half the bytes of its
float32 masters and the manifest names what the workers hold.
Each sync reports `SyncStats` (seconds, bytes), which the driver logs as weight_sync_seconds /
weight_sync_bytes.

Driver wiring, object store (`spec.weights.sync = "object_store"`), per version v: either the
learner actor publishes (`WeightPublisher.publish(v, state)` returns the handle; the learner owns
the object), or the driver does, owning the object so it outlives a learner crash:

    handle = publisher.adopt(*learner.weight_payload.options(num_returns=2).remote())
    #   where Learner.weight_payload() returns dlrl.weights.encode(self.version, state, cast=rollout dtype)
    stats = ray.get([w.sync_weights.remote(handle) for w in workers])   # WeightReceiver.receive

Collective (`"collective"`): once `address = WeightPublisher.open_group(n_workers + 1)`, then
`join_group` on the learner and on every worker *in the same ray.get*; per version, `send` on the
learner and `recv` on every worker in the same ray.get; workers whose stats carry an `error` (or
whose version is not v) are sent `publish(v)`'s handle, and so is a restarted worker.
"""

from dlrl.weights.buckets import ALIGN, Bucket, Slot, plan_buckets
from dlrl.weights.collective import CollectiveError, CollectiveReceiver, CollectiveSender, GroupAddress
from dlrl.weights.endpoints import WeightPublisher, WeightReceiver
from dlrl.weights.object_store import WeightHandle, adopt, encode, publish, receive
from dlrl.weights.update import (
    TORN,
    ManifestMismatchError,
    StaleVersionError,
    SyncStats,
    TensorSpec,
    WeightUpdate,
    check_manifest,
    check_version,
)

__all__ = [
    "ALIGN",
    "TORN",
    "Bucket",
    "CollectiveError",
    "CollectiveReceiver",
    "CollectiveSender",
    "GroupAddress",
    "ManifestMismatchError",
    "Slot",
    "StaleVersionError",
    "SyncStats",
    "TensorSpec",
    "WeightHandle",
    "WeightPublisher",
    "WeightReceiver",
    "WeightUpdate",
    "adopt",
    "check_manifest",
    "check_version",
    "encode",
    "plan_buckets",
    "publish",
    "receive",
]
