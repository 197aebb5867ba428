"""The trajectory queue on a Redis Stream: what the distributed deployment runs.

Keys of job J (the braces are a Redis Cluster hash tag: one job's keys share a slot, which the
put script needs):
  dlrl:{J}:trajectories  the stream; one entry per group (envelope.pack), XADD MAXLEN ~ maxlen
  dlrl:{J}:dead          dead letters: reason, entry_id, size, time, consumer, payload (bounded)
  dlrl:{J}:put:<token>   a put's idempotency token, deleted once the put returned (and expiring
                         after an hour if the client died before it could delete it)
Consumer group `learner` on the stream, created from id 0 by whichever client opens the queue
first (so groups put before the learner starts are not skipped); one consumer name per process.

get = XREADGROUP > (BLOCK in slices of at most a second); ack = XACK; reclaim = XPENDING IDLE +
XCLAIM of entries other consumers hold (XCLAIM re-checks the idle time, so two reclaimers never
both take an entry; and a consumer never reclaims the entries it is itself still working on).
A consumer's own pending entries that it is not holding -- all of them after a restart, or a
reply lost to a dropped connection -- are re-read by the next get, before new entries.

depth = XINFO GROUPS `lag` (entries not yet delivered) + `pending` (delivered, not acked): the
server's own numbers, so they cannot drift the way client-side counters would after a crash.

Hygiene: `reclaim` also removes the consumers it took everything from (a dead learner process
leaves its consumer name in the group), and `delete` removes every key of the job: the stream
(with its consumer group and consumers), the dead letters and any put token left behind.

Reconnects: every command is retried on connection errors and timeouts with exponential back-off
for up to `reconnect_timeout_s` (a restarting Redis is down for a second or two, then loads its
AOF), then QueueUnavailable. A put is idempotent across those retries: the XADD runs in a Lua
script together with SET of a per-put random token, so a retried put whose first attempt did
land returns that entry instead of adding a second one. The password, carried by the URL, is
never logged or put in an error message.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Any, TypeVar
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from dlrl.queue import Delivery, QueueError, QueueFull, QueueUnavailable
from dlrl.queue import envelope
from dlrl.queue.backoff import Backoff
from dlrl.trajectory import TrajectoryGroup, WireError

log = logging.getLogger(__name__)
T = TypeVar("T")

GROUP = "learner"
URL_ENV = "DLRL_REDIS_URL"
TOKEN_TTL_S = 3600
BLOCK_SLICE_S = 1.0  # longest single XREADGROUP BLOCK, well under the socket timeout

# Atomic "XADD unless this put already happened": KEYS = stream, token key;
# ARGV = maxlen, version field, data field, token ttl. Returns the entry id.
_PUT_ONCE = """
local prior = redis.call('GET', KEYS[2])
if prior then return prior end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'v', ARGV[2], 'data', ARGV[3])
redis.call('SET', KEYS[2], id, 'EX', ARGV[4])
return id
"""


def redis_url(url: str | None) -> str:
    """The spec's URL, else $DLRL_REDIS_URL; a clear error when neither is set."""
    url = url or os.environ.get(URL_ENV)
    if not url:
        raise QueueError(f"queue.backend is 'redis' but neither queue.redis_url nor ${URL_ENV} is set")
    return url


def redact(url: str) -> str:
    """The URL with its password (in the netloc or a ?password= query) replaced by ***."""
    password = urlsplit(url).password  # as written in the URL (still percent-encoded)
    if password is not None:
        url = url.replace(f":{password}@", ":***@", 1)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStreamQueue:
    """`TrajectoryQueue` on Redis Streams (see the module docstring)."""

    def __init__(self, url: str, job_id: str, *, consumer: str = "learner", capacity: int,
                 maxlen: int = 100_000, reconnect_timeout_s: float = 30.0, socket_timeout_s: float = 10.0) -> None:
        if capacity >= maxlen:
            # MAXLEN trimming must only ever drop acknowledged history, never waiting groups.
            raise QueueError(f"queue capacity {capacity} must be below queue.maxlen {maxlen}")
        self.job_id, self.consumer, self.capacity, self.maxlen = job_id, consumer, capacity, maxlen
        self.stream = f"dlrl:{{{job_id}}}:trajectories"
        self.dead = f"dlrl:{{{job_id}}}:dead"
        self.url = redact(url)
        self.reconnect_timeout_s = reconnect_timeout_s
        # Retries are ours (bounded in total time, counted); redis-py's own would hide them.
        self.r = redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=5,
                                      retry=Retry(NoBackoff(), 0), decode_responses=False, protocol=2)
        self._put_once = self.r.register_script(_PUT_ONCE)
        self._held: set[str] = set()  # delivered to this client, not yet acked by it
        self._rescan_own = True  # own pending entries not held here must be re-read (restart, lost reply)
        self.counts = {"puts": 0, "acks": 0, "delivered": 0, "redelivered": 0, "dead_lettered": 0,
                       "reconnects": 0}
        self._create_group()

    # -- connection handling --------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """fn(), retried through connection loss for up to reconnect_timeout_s."""
        backoff = Backoff(self.reconnect_timeout_s, first=0.05, cap=2.0)
        while True:
            try:
                return fn()
            except AuthenticationError as e:  # a ConnectionError subclass, but retrying cannot fix it
                raise QueueError(f"Redis at {self.url} refused the credentials (wrong or missing password "
                                 f"in the URL): {e}") from None
            except (RedisConnectionError, RedisTimeoutError) as e:
                self.counts["reconnects"] += 1
                self._rescan_own = True  # a reply may have been lost with entries delivered in it
                if backoff.expired():
                    raise QueueUnavailable(f"Redis at {self.url} unreachable for {self.reconnect_timeout_s:.0f}s: "
                                           f"{e}") from e
                log.warning("Redis at %s: %s; retrying", self.url, e)
                backoff.sleep()
            except ResponseError as e:
                msg = str(e)
                if msg.startswith(("NOAUTH", "WRONGPASS")):
                    raise QueueError(f"Redis at {self.url} refused the credentials: {msg}") from None
                if msg.startswith("NOGROUP") or "no such key" in msg:
                    raise QueueError(f"consumer group {GROUP!r} of {self.stream} is gone (queue deleted, or "
                                     f"Redis lost its data): {msg}") from None
                raise

    def _create_group(self) -> None:
        def create() -> None:
            try:
                self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if not str(e).startswith("BUSYGROUP"):  # another client created it first: fine
                    raise

        self._call(create)

    # -- producer side ----------------------------------------------------------------------------

    def put(self, group: TrajectoryGroup, timeout: float | None = None) -> str:
        fields = envelope.pack(group)  # WireError here is the caller's bug: nothing is sent
        backoff = Backoff(timeout)
        while (depth := self.depth()) >= self.capacity:
            if backoff.expired():
                raise QueueFull(f"{self.stream}: {depth} unacknowledged entries >= capacity {self.capacity} "
                                f"for {timeout}s; group {group.group_id!r} not added")
            backoff.sleep()
        token = f"dlrl:{{{self.job_id}}}:put:{uuid.uuid4().hex}"
        entry_id = self._call(lambda: self._put_once(
            keys=[self.stream, token],
            args=[self.maxlen, fields[envelope.VERSION], fields[envelope.DATA], TOKEN_TTL_S]))
        self.counts["puts"] += 1
        try:  # the token only guards this call's retries; an expired one would do no harm
            self.r.delete(token)
        except (RedisConnectionError, RedisTimeoutError):
            pass
        return _text(entry_id)

    # -- consumer side ----------------------------------------------------------------------------

    def get(self, n: int, timeout: float | None = None) -> list[Delivery]:
        if n < 1:
            raise ValueError(f"get(n={n}): n must be >= 1")
        backoff = Backoff(timeout)
        out: list[Delivery] = []
        first = True
        while len(out) < n and (first or not backoff.expired()):
            first = False
            if self._rescan_own:
                out += self._own_pending(n - len(out))
                if len(out) >= n:
                    break
            left = backoff.remaining()
            block = None if timeout == 0 else int(1000 * min(BLOCK_SLICE_S, BLOCK_SLICE_S if left is None else left))
            if block == 0:
                block = 1  # BLOCK 0 would mean forever
            reply = self._call(lambda: self.r.xreadgroup(GROUP, self.consumer, {self.stream: ">"},
                                                         count=n - len(out), block=block))
            for entry_id, fields in _entries(reply):
                out += self._deliver(_text(entry_id), fields, 1)
        return out

    def _own_pending(self, limit: int) -> list[Delivery]:
        """Up to `limit` of this consumer's pending entries that this client is not holding
        (from an earlier life of the consumer, or a reply lost to a reconnect), oldest first."""
        out: list[Delivery] = []
        start = "-"
        while len(out) < limit:
            page = self._call(lambda: self.r.xpending_range(self.stream, GROUP, start, "+", 100,
                                                            consumername=self.consumer))
            if not page:
                self._rescan_own = False
                break
            todo = [(_text(p["message_id"]), p["times_delivered"]) for p in page
                    if _text(p["message_id"]) not in self._held][:limit - len(out)]
            out += self._claim(todo, min_idle_ms=0)
            start = "(" + _text(page[-1]["message_id"])
        return out

    def reclaim(self, min_idle_s: float, count: int = 1000) -> list[Delivery]:
        min_idle_ms = int(min_idle_s * 1000)
        out: list[Delivery] = []
        start = "-"
        while len(out) < count:
            page = self._call(lambda: self.r.xpending_range(self.stream, GROUP, start, "+", 100,
                                                            idle=min_idle_ms))
            if not page:
                break
            theirs = [(_text(p["message_id"]), p["times_delivered"]) for p in page
                      if _text(p["consumer"]) != self.consumer][:count - len(out)]
            out += self._claim(theirs, min_idle_ms=min_idle_ms)
            start = "(" + _text(page[-1]["message_id"])
        self._forget_empty_consumers(min_idle_ms)
        return out

    def _forget_empty_consumers(self, min_idle_ms: int) -> None:
        """XGROUP DELCONSUMER every other consumer with nothing pending and idle >= min_idle_ms
        (its entries were just taken over: it is a dead process's name). A live consumer that is
        merely idle loses nothing: XREADGROUP recreates it on its next read."""
        for c in self._call(lambda: self.r.xinfo_consumers(self.stream, GROUP)):
            name = _text(c["name"])
            if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) >= min_idle_ms:
                self._call(lambda: self.r.xgroup_delconsumer(self.stream, GROUP, name))

    def _claim(self, todo: list[tuple[str, int]], min_idle_ms: int) -> list[Delivery]:
        """XCLAIM entries for this consumer (each only if still idle >= min_idle_ms, so a racing
        reclaimer or a live owner that just touched it wins) and deliver them."""
        if not todo:
            return []
        times = dict(todo)
        claimed = self._call(lambda: self.r.xclaim(self.stream, GROUP, self.consumer, min_idle_ms,
                                                   [entry_id for entry_id, _ in todo]))
        out = []
        for entry_id, fields in claimed:
            entry_id = _text(entry_id)
            out += self._deliver(entry_id, fields, times[entry_id] + 1)  # XCLAIM counted one more
        self.counts["redelivered"] += len(out)
        return out

    def _deliver(self, entry_id: str, fields: Any, deliveries: int) -> list[Delivery]:
        """[Delivery] for a good entry; [] for a bad one, which is dead-lettered and acked."""
        try:
            group = envelope.unpack(fields)
        except WireError as e:
            self._dead_letter(entry_id, str(e), fields)
            return []
        self._held.add(entry_id)
        self.counts["delivered"] += 1
        return [Delivery(entry_id, group, deliveries)]

    def _dead_letter(self, entry_id: str, reason: str, fields: Any) -> None:
        record = envelope.dead_record(entry_id, reason, fields, self.consumer)
        log.warning("%s: dead-lettering entry %s: %s", self.stream, entry_id, reason)

        def move() -> None:
            # One transaction: the entry is never both dropped from the group and missing from the
            # dead letters; a crash before EXEC leaves it pending, to be dead-lettered again.
            pipe = self.r.pipeline(transaction=True)
            pipe.xadd(self.dead, {k: v if isinstance(v, bytes) else str(v) for k, v in record.items()},
                      maxlen=envelope.DEAD_MAXLEN, approximate=True)
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.execute()

        self._call(move)
        self.counts["dead_lettered"] += 1

    def ack(self, entry_ids: Sequence[str]) -> int:
        ids = list(entry_ids)
        if not ids:
            return 0
        done = self._call(lambda: self.r.xack(self.stream, GROUP, *ids))
        self._held.difference_update(ids)
        self.counts["acks"] += done
        return int(done)

    # -- gauges -------------------------------------------------------------------------------------

    def _group_info(self) -> dict:
        for info in self._call(lambda: self.r.xinfo_groups(self.stream)):
            if _text(info["name"]) == GROUP:
                return info
        raise QueueError(f"consumer group {GROUP!r} of {self.stream} is gone (queue deleted?)")

    def depth(self) -> int:
        info = self._group_info()
        lag = info.get("lag")
        if lag is None:
            # Redis cannot compute the lag when entries were deleted out of order (XDEL);
            # count the undelivered entries instead.
            last = _text(info["last-delivered-id"])
            lag = len(self._call(lambda: self.r.xrange(self.stream, min="(" + last, max="+")))
        return int(lag) + int(info["pending"])

    def pending(self) -> int:
        return int(self._group_info()["pending"])

    def dead_letters(self, count: int = 100) -> list[dict]:
        rows = self._call(lambda: self.r.xrevrange(self.dead, count=count))
        out = []
        for _, f in rows:
            out.append({"entry_id": _text(f.get(b"entry_id", b"")), "reason": _text(f.get(b"reason", b"")),
                        "size": int(f.get(b"size", 0)), "time": float(f.get(b"time", 0.0)),
                        "consumer": _text(f.get(b"consumer", b""))})
        return out

    def metrics(self) -> dict[str, int | float | str]:
        return {"backend": "redis", "depth": self.depth(), "pending": self.pending(), "capacity": self.capacity,
                "dead_letters": int(self._call(lambda: self.r.xlen(self.dead))), **self.counts}

    # -- lifecycle ----------------------------------------------------------------------------------

    def purge(self) -> None:
        def reset() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(self.stream, self.dead)
            pipe.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            pipe.execute()

        self._call(reset)
        self._held.clear()

    def delete(self) -> None:
        def drop() -> None:
            tokens = list(self.r.scan_iter(match=f"dlrl:{{{self.job_id}}}:put:*", count=1000))
            self.r.delete(self.stream, self.dead, *tokens)

        self._call(drop)
        self._held.clear()

    def keys(self) -> list[str]:
        """Every Redis key of this job (what `delete` removes)."""
        found = self._call(lambda: list(self.r.scan_iter(match=f"dlrl:{{{self.job_id}}}:*", count=1000)))
        return sorted(_text(k) for k in found)

    def close(self) -> None:
        self.r.close()

    def __repr__(self) -> str:
        return f"RedisStreamQueue({self.url!r}, {self.job_id!r}, consumer={self.consumer!r})"


def _entries(reply: Any) -> list[tuple[bytes, Any]]:
    """The (id, fields) pairs of an XREADGROUP reply (RESP2: [[stream, [(id, fields), ...]]])."""
    return [entry for _, entries in reply or [] for entry in entries]
