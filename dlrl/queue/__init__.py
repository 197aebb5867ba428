"""The trajectory queue between rollout workers and the learner: one interface, two backends.

Rollout workers `put` finished `TrajectoryGroup`s; the learner `get`s a batch, trains on it and
`ack`s the entries only once the optimizer step that used them is applied *and* checkpointed.
Delivery is therefore at least once: an entry delivered to a consumer that dies before acking
stays pending and is handed out again by `reclaim` (to another consumer) or by the same
consumer's next `get` after a restart (a consumer name picks up its own pending entries first).
The learner makes it exactly once by dropping group ids it has already trained on.

Back-pressure: `put` blocks while `depth()` (entries put and not yet acked: queued + pending)
is at or above the capacity, so producers never run more than `capacity` groups ahead of what
the learner has durably consumed. Concurrent producers may overshoot by at most one entry each.

Entries carry the wire bytes of `TrajectoryGroup.to_bytes` (never pickle); anything that does
not decode (garbage, an unknown format version) is moved to a dead-letter list with the reason,
acknowledged, and skipped, so one bad entry never stalls the learner.

Backends (`QueueSpec.backend`):
  ray   -- `ray_actor_queue.RayActorQueue`: a named, detached actor in the running Ray cluster
           (the local default; lives as long as the cluster).
  redis -- `redis_stream.RedisStreamQueue`: a Redis Stream with a consumer group (the
           distributed deployment; survives every process of the run, and Redis restarts with AOF).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from collections.abc import Sequence

from dlrl.config import JobSpec
from dlrl.trajectory import TrajectoryGroup

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # becomes a Redis key part / actor name


class QueueError(RuntimeError):
    """The queue cannot do what was asked (bad configuration, credentials, lost consumer group)."""


class QueueFull(QueueError):
    """`put` waited `timeout` seconds and the queue stayed at capacity; nothing was added."""


class QueueUnavailable(QueueError):
    """The backend stayed unreachable for longer than the reconnect budget."""


@dataclass(frozen=True)
class Delivery:
    entry_id: str  # backend id of the entry: pass it to ack()
    group: TrajectoryGroup
    deliveries: int  # times this entry has been delivered, this one included (1 = first time)


@runtime_checkable
class TrajectoryQueue(Protocol):
    """What rollout workers and the learner use; see the module docstring for the semantics.

    A queue object is used by one thread at a time (open one per thread)."""

    capacity: int
    consumer: str

    def put(self, group: TrajectoryGroup, timeout: float | None = None) -> str:
        """Add a group; block while depth() >= capacity. Returns the entry id; QueueFull after
        `timeout` seconds at capacity (None: wait forever). Retrying a failed put is safe: an
        entry is never lost, and the learner drops a duplicate group id."""
        ...

    def get(self, n: int, timeout: float | None = None) -> list[Delivery]:
        """Up to n deliveries, oldest first: this consumer's own unacked entries from an earlier
        life first, then new ones. Waits until n are there or `timeout` passes (None: forever;
        0: no wait), then returns what it has. Undecodable entries are dead-lettered, acked, skipped."""
        ...

    def ack(self, entry_ids: Sequence[str]) -> int:
        """Acknowledge entries (they are done for good); returns how many were pending."""
        ...

    def reclaim(self, min_idle_s: float, count: int = 1000) -> list[Delivery]:
        """Take over entries another consumer was given and has not acked for `min_idle_s`
        (it died), oldest first, and deliver them to this one. Never this consumer's own."""
        ...

    def depth(self) -> int:
        """Entries put and not yet acked: queued + pending."""
        ...

    def pending(self) -> int:
        """Entries delivered to some consumer and not yet acked."""
        ...

    def dead_letters(self, count: int = 100) -> list[dict]:
        """The newest dead-lettered entries: {"entry_id", "reason", "size", "time", "consumer"}."""
        ...

    def metrics(self) -> dict[str, int | float | str]:
        """JSON-safe gauges (depth, pending, capacity, dead letters) and this client's counters."""
        ...

    def purge(self) -> None:
        """Drop every entry, pending or not, and the dead letters (a fresh run must not train on
        an old run's groups). The queue stays usable."""
        ...

    def delete(self) -> None:
        """Remove the queue and its backend state for good (Redis keys / the Ray actor)."""
        ...

    def close(self) -> None:
        """Release this client's connections; the queue and its entries stay."""
        ...


def default_capacity(spec: JobSpec) -> int:
    """`queue.capacity`, else (max_staleness + 2 + checkpoint_every) x prompts_per_step.

    What can be unacknowledged at once, in rollout batches: the steps since the last checkpoint
    (acknowledged only once they are in one: < checkpoint_every), the batch being trained and the
    `max_staleness` dispatched ahead of it (the learner holds early arrivals, unacknowledged, until
    their step), and one batch of slack for the shares a restarted worker redoes. That is also
    everything a learner rebuilt from the checkpoint re-reads, so the abandoned timeline's rollout
    calls always finish without it. Duplicates and entries of an abandoned timeline are
    acknowledged the moment the learner reads them, so they never hold capacity for long.
    """
    if spec.queue.capacity is not None:
        return spec.queue.capacity
    return (spec.runtime.max_staleness + 2 + spec.checkpoint_every) * spec.rollout.prompts_per_step


def open_queue(spec: JobSpec, job_id: str, *, consumer: str = "learner",
               capacity: int | None = None, reconnect_timeout_s: float = 30.0) -> TrajectoryQueue:
    """The job's queue on the backend `spec.queue.backend` names, as consumer `consumer`.

    Every process of a job opens the same queue by `job_id`. A consumer that restarts under the
    same name resumes its own pending entries; producers may use any name. Redis: the URL is
    `spec.queue.redis_url`, else the DLRL_REDIS_URL environment variable. Ray: the caller must
    already be connected to the cluster (`ray.init`).
    """
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise QueueError(f"job id {job_id!r} must match {JOB_ID.pattern}")
    if not consumer or len(consumer) > 200:
        raise QueueError("consumer name must be 1-200 characters")
    capacity = capacity if capacity is not None else default_capacity(spec)
    if spec.queue.backend == "redis":
        from dlrl.queue.redis_stream import RedisStreamQueue, redis_url

        return RedisStreamQueue(redis_url(spec.queue.redis_url), job_id, consumer=consumer, capacity=capacity,
                                maxlen=spec.queue.maxlen, reconnect_timeout_s=reconnect_timeout_s)
    from dlrl.queue.ray_actor_queue import RayActorQueue

    return RayActorQueue(job_id, consumer=consumer, capacity=capacity)


__all__ = ["Delivery", "QueueError", "QueueFull", "QueueUnavailable", "TrajectoryQueue", "default_capacity",
           "open_queue"]
