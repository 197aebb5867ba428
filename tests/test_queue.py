"""The trajectory queue: one suite, run against the real Redis backend and the real Ray backend.

Every test uses a fresh job id on the session's redis-server / Ray head (tests/conftest.py). A
consumer that "dies" is a separate process that takes entries and exits without acking; the
Redis restart test runs its own redis-server, restarted while a producer thread is putting.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from dlrl.config import JobSpec
from tests.local_cluster import RedisProcess, free_port
from dlrl.queue import QueueError, QueueFull, QueueUnavailable, TrajectoryQueue, open_queue
from dlrl.trajectory import TrajectoryGroup

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0  # upper bound of every wait in this file that should take milliseconds


def group(gid: str, version: int = 0) -> TrajectoryGroup:
    rng = np.random.default_rng(abs(hash(gid)) % 2**32)
    return TrajectoryGroup(group_id=gid, task="sudoku", prompt_id=gid, prompt_ids=rng.integers(0, 50, 7),
                           completion_ids=rng.integers(0, 50, (4, 6)), rewards=rng.random(4),
                           policy_version=version, mask_seed=7, unmask_steps=rng.integers(0, 6, (4, 6)),
                           timings={"generate": 0.25})


def spec_for(backend: str, url: str | None, **queue) -> JobSpec:
    return JobSpec.model_validate({"queue": {"backend": backend, "redis_url": url, **queue}})


class Harness:
    """Opens queues of one fresh job on one backend; writes raw entries past the queue's API."""

    def __init__(self, backend: str, url: str | None, ray_address: str | None) -> None:
        self.backend, self.url, self.ray_address = backend, url, ray_address
        self.job = f"test-{uuid.uuid4().hex[:12]}"
        self.opened: list[TrajectoryQueue] = []

    def spec(self, capacity: int = 16) -> JobSpec:
        return spec_for(self.backend, self.url, capacity=capacity)

    def open(self, consumer: str = "learner", capacity: int = 16) -> TrajectoryQueue:
        q = open_queue(self.spec(capacity), self.job, consumer=consumer)
        self.opened.append(q)
        return q

    def inject(self, fields) -> None:
        """Write an entry straight into the backend, bypassing put's encoding."""
        if self.backend == "redis":
            import redis

            r = redis.Redis.from_url(self.url)
            r.xadd(f"dlrl:{{{self.job}}}:trajectories", fields)
            r.close()
        else:
            import ray

            from dlrl.queue.ray_actor_queue import NAMESPACE, actor_name

            ray.get(ray.get_actor(actor_name(self.job), namespace=NAMESPACE).put.remote(fields, None, 0.0))

    def consume_in_process_that_dies(self, consumer: str, n: int) -> list[str]:
        """A separate process takes n entries as `consumer` and exits without acking."""
        script = (
            "import json, os, sys\n"
            "from dlrl.config import JobSpec\n"
            "from dlrl.queue import open_queue\n"
            "backend, spec, job, consumer, n, address = sys.argv[1:]\n"
            "if backend == 'ray':\n"
            "    import ray\n"
            "    ray.init(address=address, logging_level='ERROR', log_to_driver=False)\n"
            "q = open_queue(JobSpec.model_validate_json(spec), job, consumer=consumer)\n"
            "got = q.get(int(n), timeout=10)\n"
            "print(json.dumps([d.group.group_id for d in got]), flush=True)\n"
            "os._exit(0)  # dies holding them: no ack, no clean shutdown\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, self.backend, self.spec().model_dump_json(), self.job, consumer, str(n),
             self.ray_address or ""],
            capture_output=True, text=True, timeout=90, cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def cleanup(self) -> None:
        if self.opened:
            self.opened[0].delete()
        for q in self.opened:
            q.close()


@pytest.fixture(params=["redis", "ray"])
def harness(request):
    if request.param == "redis":
        h = Harness("redis", request.getfixturevalue("redis_server").url, None)
    else:
        h = Harness("ray", None, request.getfixturevalue("ray_cluster").address)
    yield h
    h.cleanup()


def ids(deliveries) -> list[str]:
    return [d.group.group_id for d in deliveries]


def test_order_per_producer_ack_and_depth(harness):
    consumer = harness.open(capacity=64)
    producers = [harness.open(f"worker-{p}", capacity=64) for p in "ab"]

    def produce(q: TrajectoryQueue, prefix: str) -> None:
        for i in range(12):
            q.put(group(f"{prefix}{i:02d}"))

    threads = [threading.Thread(target=produce, args=(q, p), daemon=True) for q, p in zip(producers, "ab")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert consumer.depth() == 24 and consumer.pending() == 0

    got = consumer.get(24, timeout=WAIT_S)
    assert len(got) == 24 and all(d.deliveries == 1 for d in got)
    for prefix in "ab":  # each producer's groups arrive in the order it put them
        assert [g for g in ids(got) if g.startswith(prefix)] == [f"{prefix}{i:02d}" for i in range(12)]
    sent = group("a03")
    back = next(d.group for d in got if d.group.group_id == "a03")
    assert back.completion_ids.tolist() == sent.completion_ids.tolist() and back.unmask_steps is not None
    assert consumer.depth() == 24 and consumer.pending() == 24  # delivered is not done

    assert consumer.ack([d.entry_id for d in got[:10]]) == 10
    assert consumer.pending() == 14 and consumer.depth() == 14
    assert consumer.ack([got[0].entry_id]) == 0  # acking twice is harmless
    consumer.ack([d.entry_id for d in got[10:]])
    assert consumer.pending() == 0 and consumer.depth() == 0
    assert consumer.get(5, timeout=0) == []
    m = consumer.metrics()
    assert json.loads(json.dumps(m)) == m and m["acks"] == 24 and m["capacity"] == 64


def test_get_waits_for_n_then_returns_what_it_has(harness):
    consumer, producer = harness.open(), harness.open("worker")
    producer.put(group("g0"))
    t0 = time.monotonic()
    assert ids(consumer.get(3, timeout=0.4)) == ["g0"]
    assert time.monotonic() - t0 >= 0.35  # it waited for more

    def late_put() -> None:
        time.sleep(0.3)
        late.put(group("g1"))

    late = harness.open("late-worker")
    t = threading.Thread(target=late_put, daemon=True)
    t.start()
    t0 = time.monotonic()
    assert ids(consumer.get(1, timeout=WAIT_S)) == ["g1"]  # a blocked get wakes on the put
    assert time.monotonic() - t0 < 3.0
    t.join(WAIT_S)


def test_dead_consumer_entries_are_reclaimed(harness):
    producer = harness.open("worker")
    for i in range(4):
        producer.put(group(f"g{i}"))
    assert harness.consume_in_process_that_dies("doomed", 3) == ["g0", "g1", "g2"]
    survivor = harness.open("survivor")
    assert survivor.pending() == 3
    assert survivor.reclaim(min_idle_s=60) == []  # not idle long enough to be presumed dead
    time.sleep(0.3)
    back = survivor.reclaim(min_idle_s=0.2)
    assert ids(back) == ["g0", "g1", "g2"] and [d.deliveries for d in back] == [2, 2, 2]
    assert survivor.reclaim(min_idle_s=0.0) == []  # never its own in-flight entries
    fresh = survivor.get(5, timeout=0.3)
    assert ids(fresh) == ["g3"] and fresh[0].deliveries == 1
    survivor.ack([d.entry_id for d in back + fresh])
    assert survivor.pending() == 0 and survivor.depth() == 0


def test_restarted_consumer_resumes_its_own_pending_first(harness):
    producer = harness.open("worker")
    for i in range(3):
        producer.put(group(f"g{i}"))
    first = harness.open("learner-1")
    assert ids(first.get(2, timeout=WAIT_S)) == ["g0", "g1"]
    first.close()  # "crashes" holding g0, g1

    again = harness.open("learner-1")  # the same consumer name, a new process life
    got = again.get(3, timeout=WAIT_S)
    assert ids(got) == ["g0", "g1", "g2"] and [d.deliveries for d in got] == [2, 2, 1]
    assert again.get(3, timeout=0.2) == []  # what it holds now is not handed to it twice
    again.ack([d.entry_id for d in got])
    assert again.depth() == 0


def test_corrupt_entries_are_dead_lettered_and_the_good_ones_flow(harness):
    producer, consumer = harness.open("worker"), harness.open()
    producer.put(group("good-0"))
    good = group("x").to_bytes()
    version_9 = good[:8] + (9).to_bytes(2, "little") + good[10:]
    bad = [
        ({b"v": b"1", b"data": b"\x00not a trajectory group at all"}, "bad magic"),
        ({b"v": b"2", b"data": good}, "unknown wire format version b'2'"),
        ({b"v": b"1", b"data": version_9}, "unknown wire format version 9"),
        ({b"v": b"1"}, "are not exactly"),
        ({b"v": b"1", b"data": good, b"extra": b"1"}, "are not exactly"),
        ({b"v": b"1", b"data": good[:-3]}, "truncated"),
    ]
    for fields, _ in bad:
        harness.inject(fields)
    producer.put(group("good-1"))

    got = consumer.get(2, timeout=WAIT_S)
    assert ids(got) == ["good-0", "good-1"]
    dead = consumer.dead_letters()
    assert len(dead) == len(bad)
    for record, (_, reason) in zip(dead, reversed(bad)):  # newest first
        assert reason in record["reason"] and record["consumer"] == "learner"
        assert record["entry_id"] and record["size"] >= 0
    assert json.loads(json.dumps(dead)) == dead
    assert consumer.pending() == 2 and consumer.depth() == 2  # bad entries were acked
    consumer.ack([d.entry_id for d in got])
    assert consumer.depth() == 0 and consumer.metrics()["dead_letters"] == len(bad)


def test_back_pressure_blocks_until_ack(harness):
    consumer = harness.open(capacity=3)
    producer = harness.open("worker", capacity=3)
    for i in range(3):
        producer.put(group(f"g{i}"))
    t0 = time.monotonic()
    with pytest.raises(QueueFull, match="capacity 3"):
        producer.put(group("refused"), timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 3.0
    assert consumer.depth() == 3  # the refused group was not added

    blocked = harness.open("worker-2", capacity=3)
    done = threading.Event()
    errors: list[BaseException] = []

    def put_when_room() -> None:
        try:
            blocked.put(group("g3"), timeout=WAIT_S)
            done.set()
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertions below
            errors.append(e)

    t = threading.Thread(target=put_when_room, daemon=True)
    t.start()
    assert not done.wait(0.5)
    taken = consumer.get(1, timeout=WAIT_S)
    assert not done.wait(0.5)  # delivered but unacked still counts against capacity
    consumer.ack([taken[0].entry_id])
    assert done.wait(WAIT_S), errors
    t.join(WAIT_S)
    assert consumer.depth() == 3
    assert ids(consumer.get(3, timeout=WAIT_S)) == ["g1", "g2", "g3"]


def test_purge_empties_the_queue_and_keeps_it_usable(harness):
    producer, consumer = harness.open("worker"), harness.open()
    for i in range(3):
        producer.put(group(f"old-{i}"))
    consumer.get(1, timeout=WAIT_S)
    harness.inject({b"v": b"1", b"data": b"junk"})
    producer.purge()
    assert consumer.depth() == 0 and consumer.pending() == 0
    producer.put(group("new-0"))
    assert ids(consumer.get(5, timeout=0.3)) == ["new-0"]
    assert consumer.dead_letters() == []


def test_job_id_and_configuration_errors(harness):
    with pytest.raises(QueueError, match="job id"):
        open_queue(harness.spec(), "../etc")
    with pytest.raises(QueueError, match="job id"):
        open_queue(harness.spec(), "a{b}")


# -- Redis only -------------------------------------------------------------------------------------


def test_redis_restart_loses_nothing(caplog):
    """A producer thread keeps putting while redis-server (AOF) restarts: every group arrives,
    once after dedup by group id, and the password never reaches a log line."""
    server = RedisProcess().start()
    try:
        spec = spec_for("redis", server.url, capacity=500)
        job = f"test-{uuid.uuid4().hex[:12]}"
        producer = open_queue(spec, job, consumer="worker")
        consumer = open_queue(spec, job)
        expected = [f"g{i:03d}" for i in range(80)]
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                for gid in expected:
                    producer.put(group(gid))
                    time.sleep(0.01)
            except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(e)

        seen: list[str] = []
        restarted = False
        t = threading.Thread(target=produce, daemon=True)
        t.start()
        deadline = time.monotonic() + 40
        while len(set(seen)) < len(expected) and time.monotonic() < deadline:
            got = consumer.get(8, timeout=0.2)
            seen += ids(got)
            consumer.ack([d.entry_id for d in got])
            if not restarted and len(seen) >= 20:
                server.restart()  # SIGTERM (AOF flushed), start again on the same port and data
                restarted = True
        t.join(WAIT_S)
        assert restarted and not errors
        assert sorted(set(seen)) == expected  # nothing lost
        assert len(seen) == len(expected)  # and, thanks to the put token, nothing doubled either
        assert producer.counts["reconnects"] + consumer.counts["reconnects"] > 0
        assert consumer.depth() == 0
        assert "retrying" in caplog.text and server.password not in caplog.text
        producer.close()
        consumer.close()
    finally:
        server.cleanup()


def test_redis_password(redis_server, monkeypatch):
    job = f"test-{uuid.uuid4().hex[:12]}"
    wrong = redis_server.url.replace(redis_server.password, "not-the-password")
    for url in (wrong, f"redis://127.0.0.1:{redis_server.port}/0"):
        with pytest.raises(QueueError, match="refused the credentials") as err:
            open_queue(spec_for("redis", url), job)
        assert "not-the-password" not in str(err.value) and redis_server.password not in str(err.value)

    monkeypatch.setenv("DLRL_REDIS_URL", redis_server.url)  # None in the spec: the environment's URL
    q = open_queue(spec_for("redis", None), job)
    assert redis_server.password not in repr(q) and "***" in q.url
    q.put(group("g0"))
    assert ids(q.get(1, timeout=WAIT_S)) == ["g0"]
    q.delete()
    q.close()
    monkeypatch.delenv("DLRL_REDIS_URL")
    with pytest.raises(QueueError, match="DLRL_REDIS_URL"):
        open_queue(spec_for("redis", None), job)


def test_redis_unreachable_gives_up_after_the_reconnect_budget():
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"  # nobody listens there
    t0 = time.monotonic()
    with pytest.raises(QueueUnavailable, match="unreachable"):
        open_queue(spec_for("redis", url), "nobody", reconnect_timeout_s=0.5)
    assert time.monotonic() - t0 < 5.0


def test_redis_replayed_put_adds_nothing(redis_server):
    """The put script keyed by a token: a retry of a put whose reply was lost returns the entry
    the first attempt added instead of adding a second one."""
    q = open_queue(spec_for("redis", redis_server.url), f"test-{uuid.uuid4().hex[:12]}")
    try:
        token = f"dlrl:{{{q.job_id}}}:put:replayed"
        args = [1000, b"1", group("g0").to_bytes(), 60]
        first = q._put_once(keys=[q.stream, token], args=args)
        assert q._put_once(keys=[q.stream, token], args=args) == first
        assert q.depth() == 1
    finally:
        q.delete()
        q.close()


def test_redis_capacity_must_stay_below_maxlen(redis_server):
    with pytest.raises(QueueError, match="below queue.maxlen"):
        open_queue(spec_for("redis", redis_server.url, capacity=50, maxlen=50), "x")


def test_redis_run_leaves_no_keys_or_consumers_behind(redis_server):
    """Put tokens go once their put returned; a dead consumer's name goes with the reclaim that
    took its entries; delete removes every key of the job, a token left by a dead client too."""
    import redis

    h = Harness("redis", redis_server.url, None)
    producer, learner = h.open("worker"), h.open("learner-1")
    for i in range(3):
        producer.put(group(f"g{i}"))
    assert producer.keys() == [producer.stream]  # no put token outlives its put
    h.consume_in_process_that_dies("learner-0", 2)
    back = learner.reclaim(min_idle_s=0.0)
    assert ids(back) == ["g0", "g1"]
    r = redis.Redis.from_url(redis_server.url)
    consumers = [c["name"].decode() for c in r.xinfo_consumers(producer.stream, "learner")]
    assert "learner-0" not in consumers and "learner-1" in consumers
    r.set(f"dlrl:{{{h.job}}}:put:left-by-a-dead-worker", b"1-0", ex=3600)
    learner.put(group("bad"))  # and a dead letter
    h.inject({b"junk": b"1"})
    learner.get(5, timeout=0.5)
    assert len(learner.keys()) == 3  # stream, dead letters, the orphan token
    out = subprocess.run([sys.executable, "-m", "services.cli", "queue", "delete", h.job,
                          "--redis-url", redis_server.url], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert redis_server.password not in out.stdout + out.stderr
    assert list(r.scan_iter(match=f"dlrl:{{{h.job}}}:*")) == []
    r.close()
    for q in h.opened:
        q.close()


def test_queue_delete_refuses_a_bad_run_id(redis_server):
    out = subprocess.run([sys.executable, "-m", "services.cli", "queue", "delete", "a}b:*",
                          "--redis-url", redis_server.url], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "must match" in out.stderr


def test_group_ids_name_their_rollout_batch():
    from dlrl.queue.group_ids import batch_of, group_id

    assert group_id("j-1/x", 12, 1, 3) == "j-1/x/b12-w1-3" and batch_of("j-1/x/b12-w1-3") == 12
    for bad in ["run/b-w0-1", "run/b3-w0", "b3-w0-1", "run/b3-w0-1/extra"]:
        with pytest.raises(ValueError, match="is not"):
            batch_of(bad)
