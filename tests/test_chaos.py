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


def test_resume_after_a_learner_kill_finishes_with_the_default_capacity(ray_cluster, own_redis, tmp_path):
    """The deadlock of issue 13: the learner's process SIGKILLed, the driver rebuilds it and the
    workers regenerate batches already in the queue (duplicates), then the whole `dlrl train`
    SIGKILLed. `--resume`, with the default queue capacity, must finish with every group once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from bench.chaos import actor_pid
    from dlrl.queue import default_capacity, open_queue
    from tests.test_runtime import DEADLINE_S, ROOT, expected_group_ids, trained_groups, wait_for_step

    spec = tiny_spec(tmp_path, "chaosresume", ray_address=ray_cluster.address, max_staleness=1, checkpoint_every=3)
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"}),
                                   "train": spec.train.model_copy(update={"steps": 9})})
    env = {**os.environ, "DLRL_REDIS_URL": own_redis.url, "DLRL_SPEC": spec.model_dump_json()}
    cmd = [sys.executable, "-m", "services.cli", "train", "--spec-env", "DLRL_SPEC"]
    log = tmp_path / "driver.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(spec, 4, proc)
        os.kill(actor_pid(ray_cluster, "dlrl:chaosresume:learner"), signal.SIGKILL)
        deadline = time.monotonic() + DEADLINE_S
        while b"restarted from step 3" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # the metrics of steps >= 3 are truncated right after that line
        wait_for_step(spec, 4, proc)  # the rebuilt learner is stepping, the workers regenerating
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    probe = open_queue(spec.model_copy(update={"queue": spec.queue.model_copy(update={"redis_url": own_redis.url})}),
                       spec.name, consumer="probe")
    print(f"chaos resume: {probe.depth()} unacknowledged entries, capacity {default_capacity(spec)}")
    probe.close()
    t0 = time.monotonic()
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ids = trained_groups(spec)
    print(f"chaos resume: finished in {time.monotonic() - t0:.0f}s, {len(ids)} groups trained, {len(set(ids))} distinct")
    assert sorted(ids) == expected_group_ids(spec) and len(ids) == len(set(ids))
    import redis

    r = redis.Redis.from_url(own_redis.url)
    assert list(r.scan_iter(match="dlrl:{chaosresume}:*")) == []
    r.close()
