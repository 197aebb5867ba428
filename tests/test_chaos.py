"""Chaos in CI: real SIGKILLs, by pid, of a rollout worker's process, redis-server (restarted from
its AOF) and the learner's process, while an asynchronous (max_staleness = 1) two-worker run on the
Redis Streams queue is stepping. The run must finish, log every step once, train every expected
group id exactly once, and leave no Redis key of the run behind.

The session Ray head is shared; Redis is this test's own server (the session one is not killed
under the other tests), with `appendfsync always` (see bench/chaos.py). bench/chaos.py runs the
same with more faults over a longer run.
"""

from __future__ import annotations

import json

import pytest

from bench.chaos import Fault, run_with_faults
from dlrl.local_cluster import RedisProcess
from tests.test_runtime import tiny_spec


@pytest.fixture
def own_redis():
    server = RedisProcess(appendfsync="always").start()
    yield server
    server.cleanup()


def test_worker_redis_and_learner_sigkills_lose_and_repeat_nothing(ray_cluster, own_redis, tmp_path, monkeypatch):
    monkeypatch.setenv("DLRL_REDIS_URL", own_redis.url)
    spec = tiny_spec(tmp_path, "chaos", ray_address=ray_cluster.address, max_staleness=1, checkpoint_every=3)
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"}),
                                   "train": spec.train.model_copy(update={"steps": 10})})
    faults = [Fault(2, "worker:0"), Fault(4, "redis"), Fault(6, "learner")]
    report = run_with_faults(spec, ray_cluster, own_redis, faults, timeout_s=600)
    print("chaos:", json.dumps(report))
    assert report["steps_logged"] == list(range(10))
    assert report["trained_groups"] == report["distinct_trained_groups"] == report["expected_groups"] == 40
    assert report["missing_groups"] == [] and report["unexpected_groups"] == []
    assert report["max_staleness_seen"] <= 1 and report["stale_dropped"] == 0
    assert report["worker_restarts"] >= 1
    assert all("caught_up_s" in f for f in report["faults"]), report["faults"]
    assert report["queue_keys_left"] == []
