"""The trajectory queue as a Ray actor: the local default, with the Redis backend's semantics.

One named, detached actor per job (`dlrl-queue-<job_id>` in namespace `dlrl`, created with
get_if_exists) holds the entries as wire bytes (envelope.pack), so a restarted driver, worker or
learner reattaches to the same queue while the cluster lives. It does not survive the cluster:
that is what the Redis backend is for.

The actor is async: a `put` waiting for capacity or a `take` waiting for entries awaits a
condition inside the actor's event loop, which never blocks the actor's other calls. Each call
waits at most a short slice; the client loops over slices up to its own timeout, so a timed-out
put never lands later behind the caller's back.

Decoding happens in the client, as with Redis: the actor stores opaque bytes and never
interprets them; an entry the client cannot decode is sent back to the actor's dead-letter list.
Pending entries record their consumer, delivery time and delivery count, for `reclaim`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from dlrl.queue import Delivery, QueueError, QueueFull, QueueUnavailable
from dlrl.queue import envelope
from dlrl.queue.backoff import Backoff
from dlrl.trajectory import TrajectoryGroup, WireError

NAMESPACE = "dlrl"
SLICE_S = 1.0  # longest wait inside one actor call
CALL_GRACE_S = 60.0  # an actor call that has not answered this long after its slice: actor wedged


@dataclass
class _Pending:
    fields: Any
    consumer: str
    delivered_at: float  # time.monotonic() in the actor
    deliveries: int


class QueueActor:
    """The state of one job's queue. Every method is short, or awaits at most `wait_s`."""

    def __init__(self) -> None:
        self.queued: OrderedDict[int, Any] = OrderedDict()  # entry number -> fields, oldest first
        self.pending: dict[int, _Pending] = {}
        self.dead: deque[dict] = deque(maxlen=envelope.DEAD_MAXLEN)
        self.next_id = 1
        self.changed = asyncio.Condition()  # notified on every change of depth

    def _depth(self) -> int:
        return len(self.queued) + len(self.pending)

    async def _wait(self, predicate, wait_s: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout=max(0.0, wait_s))
            except asyncio.TimeoutError:
                pass
            return predicate()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def put(self, fields: Any, capacity: int | None, wait_s: float) -> str | None:
        """Append `fields` once depth < capacity (None: no limit); None if still full after wait_s."""
        if capacity is not None and not await self._wait(lambda: self._depth() < capacity, wait_s):
            return None
        number, self.next_id = self.next_id, self.next_id + 1
        self.queued[number] = fields
        await self._notify()
        return str(number)

    async def take(self, consumer: str, n: int, wait_s: float) -> list[tuple[str, Any, int]]:
        """Up to n queued entries, oldest first, now pending for `consumer`; waits up to wait_s
        for the first one."""
        await self._wait(lambda: bool(self.queued), wait_s)
        out = []
        now = time.monotonic()
        while self.queued and len(out) < n:
            number, fields = self.queued.popitem(last=False)
            self.pending[number] = _Pending(fields, consumer, now, 1)
            out.append((str(number), fields, 1))
        return out

    async def claim(self, consumer: str, min_idle_s: float, mine: bool, exclude: Sequence[str],
                    count: int) -> list[tuple[str, Any, int]]:
        """Pending entries idle >= min_idle_s, oldest first, redelivered to `consumer`: its own
        (mine=True, except `exclude`, the ones its client holds) or other consumers' (mine=False)."""
        now = time.monotonic()
        skip = {int(e) for e in exclude}
        out = []
        for number in sorted(self.pending):
            p = self.pending[number]
            if (p.consumer == consumer) != mine or number in skip or now - p.delivered_at < min_idle_s:
                continue
            p.consumer, p.delivered_at, p.deliveries = consumer, now, p.deliveries + 1
            out.append((str(number), p.fields, p.deliveries))
            if len(out) >= count:
                break
        return out

    async def ack(self, entry_ids: Sequence[str]) -> int:
        done = sum(self.pending.pop(int(e), None) is not None for e in entry_ids)
        if done:
            await self._notify()
        return done

    async def dead_letter(self, entry_id: str, reason: str, consumer: str) -> None:
        """Move a pending entry its consumer could not decode to the dead letters (acked)."""
        p = self.pending.pop(int(entry_id), None)
        if p is not None:
            self.dead.append(envelope.dead_record(entry_id, reason, p.fields, consumer))
            await self._notify()

    async def stats(self) -> dict[str, int]:
        return {"depth": self._depth(), "pending": len(self.pending), "dead_letters": len(self.dead)}

    async def dead_letters(self, count: int) -> list[dict]:
        return [{k: v for k, v in d.items() if k != "payload"} for d in list(self.dead)[::-1][:count]]

    async def purge(self) -> None:
        self.queued.clear()
        self.pending.clear()
        self.dead.clear()
        await self._notify()


def actor_name(job_id: str) -> str:
    return f"dlrl-queue-{job_id}"


class RayActorQueue:
    """`TrajectoryQueue` on a Ray actor (see the module docstring)."""

    def __init__(self, job_id: str, *, consumer: str = "learner", capacity: int) -> None:
        if not ray.is_initialized():
            raise QueueError("the Ray queue backend needs a Ray connection: call ray.init() first")
        self.job_id, self.consumer, self.capacity = job_id, consumer, capacity
        # num_cpus=0: the queue must never wait for (or take) a CPU slot the workers need.
        self.actor = ray.remote(QueueActor).options(
            name=actor_name(job_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_restarts=0,
        ).remote()
        self._held: set[str] = set()
        self._rescan_own = True
        self.counts = {"puts": 0, "acks": 0, "delivered": 0, "redelivered": 0, "dead_lettered": 0}

    def _call(self, ref: ray.ObjectRef, wait_s: float = 0.0) -> Any:
        try:
            return ray.get(ref, timeout=wait_s + CALL_GRACE_S)
        except (RayActorError, GetTimeoutError) as e:
            raise QueueUnavailable(f"queue actor {actor_name(self.job_id)!r} is unavailable: {e}") from e

    def put(self, group: TrajectoryGroup, timeout: float | None = None) -> str:
        fields = envelope.pack(group)
        backoff = Backoff(timeout)
        first = True
        while first or not backoff.expired():
            first = False
            left = backoff.remaining()
            wait_s = SLICE_S if left is None else min(SLICE_S, left)
            entry_id = self._call(self.actor.put.remote(fields, self.capacity, wait_s), wait_s)
            if entry_id is not None:
                self.counts["puts"] += 1
                return entry_id
        raise QueueFull(f"queue {actor_name(self.job_id)!r} stayed at capacity {self.capacity} for {timeout}s; "
                        f"group {group.group_id!r} not added")

    def get(self, n: int, timeout: float | None = None) -> list[Delivery]:
        if n < 1:
            raise ValueError(f"get(n={n}): n must be >= 1")
        backoff = Backoff(timeout)
        out: list[Delivery] = []
        if self._rescan_own:  # a restarted consumer first redoes what its earlier life held
            raw = self._call(self.actor.claim.remote(self.consumer, 0.0, True, sorted(self._held), n))
            self._rescan_own = len(raw) == n  # more may remain
            out += self._deliver(raw, redelivered=True)
        first = True
        while len(out) < n and (first or not backoff.expired()):
            first = False
            left = backoff.remaining()
            wait_s = 0.0 if timeout == 0 else SLICE_S if left is None else min(SLICE_S, left)
            out += self._deliver(self._call(self.actor.take.remote(self.consumer, n - len(out), wait_s), wait_s))
        return out

    def reclaim(self, min_idle_s: float, count: int = 1000) -> list[Delivery]:
        raw = self._call(self.actor.claim.remote(self.consumer, min_idle_s, False, [], count))
        return self._deliver(raw, redelivered=True)

    def _deliver(self, raw: list[tuple[str, Any, int]], redelivered: bool = False) -> list[Delivery]:
        out = []
        for entry_id, fields, deliveries in raw:
            try:
                group = envelope.unpack(fields)
            except WireError as e:
                self._call(self.actor.dead_letter.remote(entry_id, str(e), self.consumer))
                self.counts["dead_lettered"] += 1
                continue
            self._held.add(entry_id)
            out.append(Delivery(entry_id, group, deliveries))
        self.counts["delivered"] += len(out)
        if redelivered:
            self.counts["redelivered"] += len(out)
        return out

    def ack(self, entry_ids: Sequence[str]) -> int:
        ids = list(entry_ids)
        if not ids:
            return 0
        done = self._call(self.actor.ack.remote(ids))
        self._held.difference_update(ids)
        self.counts["acks"] += done
        return int(done)

    def depth(self) -> int:
        return int(self._call(self.actor.stats.remote())["depth"])

    def pending(self) -> int:
        return int(self._call(self.actor.stats.remote())["pending"])

    def dead_letters(self, count: int = 100) -> list[dict]:
        return self._call(self.actor.dead_letters.remote(count))

    def metrics(self) -> dict[str, int | float | str]:
        return {"backend": "ray", **self._call(self.actor.stats.remote()), "capacity": self.capacity, **self.counts}

    def purge(self) -> None:
        self._call(self.actor.purge.remote())
        self._held.clear()

    def delete(self) -> None:
        ray.kill(self.actor)
        self._held.clear()

    def close(self) -> None:
        pass  # the actor outlives this client on purpose; delete() removes it

    def __repr__(self) -> str:
        return f"RayActorQueue({self.job_id!r}, consumer={self.consumer!r})"
