"""Chaos in CI: real SIGKILLs, by pid, of a rollout worker's process, redis-server (restarted from
its AOF) and the learner's process, while a two-worker run on the Redis Streams queue is stepping,
both synchronous (max_staleness = 0) and asynchronous (max_staleness = 1). The run must finish, log
every step once, train every expected group id exactly once, count in metrics.jsonl every group it
dropped, and leave no Redis key of the run behind. Then the learner SIGKILLed inside a checkpoint
write: rebuilt from the checkpoint before, it must end bit-identical to its fault-free twin and
leave no temporary checkpoint folder. Then the whole `dlrl train` SIGKILLed and resumed with
`--resume`, the same checks.

The session Ray head is shared; Redis is each test's own server (the session one is not killed
under the other tests), with `appendfsync always` (see bench/chaos.py). bench/chaos.py runs the
same with more faults over a longer run. Each scenario's counts go to the "run counts" section of
the pytest summary (tests/conftest.py), so the CI log shows them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import redis
import torch

from bench.chaos import Fault, actor_pid, run_with_faults, summary_line
from tests.local_cluster import RedisProcess
from dlrl.queue import default_capacity, open_queue
from learner.train import read_state
from services.cli import load_spec
from services.driver.progress import read_metrics
from services.driver.driver import run
from tests.test_runtime import (
    DEADLINE_S, ROOT, expected_group_ids, tiny_spec, trained_groups, wait_for_step, weights,
)

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture
def own_redis():
    server = RedisProcess(appendfsync="always").start()
    yield server
    server.cleanup()


def keys_of(url: str, run_id: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=f"dlrl:{{{run_id}}}:*"))
    finally:
        client.close()


@pytest.mark.parametrize("max_staleness", [0, 1], ids=["sync", "async"])
def test_worker_redis_and_learner_sigkills_lose_and_repeat_nothing(max_staleness, ray_cluster, own_redis, tmp_path,
                                                                   monkeypatch, report_counts):
    monkeypatch.setenv("DLRL_REDIS_URL", own_redis.url)
    name = f"chaos-s{max_staleness}"  # distinct actor names: the other run's may still be being freed
    spec = tiny_spec(tmp_path, name, ray_address=ray_cluster.address, max_staleness=max_staleness,
                     checkpoint_every=3)
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"}),
                                   "train": spec.train.model_copy(update={"steps": STEPS})})
    faults = [Fault(2, "worker:0"), Fault(4, "redis"), Fault(6, "learner")]
    report = run_with_faults(spec, ray_cluster, own_redis, faults, timeout_s=600)
    report_counts(summary_line(f"chaos max_staleness={max_staleness}", report))
    assert report["steps_logged"] == list(range(1, STEPS + 1))
    assert report["trained_groups"] == report["distinct_trained_groups"] == report["expected_groups"] == 4 * STEPS
    assert report["missing_groups"] == [] and report["unexpected_groups"] == []
    assert report["max_staleness_seen"] <= max_staleness and report["stale_dropped"] == 0
    assert report["worker_restarts"] >= 1
    assert [f["target"] for f in report["faults"]] == ["worker:0", "redis", "learner"]
    assert all("caught_up_s" in f for f in report["faults"]), report["faults"]
    assert report["queue_keys_left"] == []
    assert report["drops_in_metrics"] == report["drops_in_checkpoint"]  # groups dropped at a rebuild included


COMPARED = ("reward", "reward_std_in_group", "loss", "grad_norm", "elbo_old", "lr")
"""A train record's numbers that must be the fault-free twin's (timings and fault counts differ)."""


def test_learner_killed_inside_a_checkpoint_write_is_rebuilt_and_ends_as_its_twin(ray_cluster, own_redis, tmp_path,
                                                                                  monkeypatch, report_counts):
    """Issue 20: the lead learner SIGKILLed while it writes the checkpoint of step 4 (held there by
    its fault-injection hook, so the kill lands inside the write every time) ended the run. Now it
    is rebuilt from the checkpoint of step 2 like any other death, and the synchronous run ends
    bit-identical to the same run never faulted, with no `checkpoint.tmp-*` folder left."""
    monkeypatch.setenv("DLRL_REDIS_URL", own_redis.url)

    def spec_in(out_dir):
        spec = tiny_spec(out_dir, "chaos-save", ray_address=ray_cluster.address, checkpoint_every=2)
        return spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"})})

    twin = spec_in(tmp_path / "twin")
    run(twin)
    spec = spec_in(tmp_path / "faulted")
    report = run_with_faults(spec, ray_cluster, own_redis, [Fault(2, "save")], timeout_s=600)
    report_counts(summary_line("chaos kill inside a checkpoint write", report))
    steps = spec.train.steps
    assert report["steps_logged"] == list(range(1, steps + 1))
    assert report["trained_groups"] == report["distinct_trained_groups"] == report["expected_groups"]
    assert report["missing_groups"] == [] and report["unexpected_groups"] == []
    assert [f["target"] for f in report["faults"]] == ["save"] and "caught_up_s" in report["faults"][0]
    assert report["temporary_folders_left"] == []
    assert not (tmp_path / "faulted" / "chaos-save" / "checkpoint.old").exists()
    assert report["drops_in_metrics"] == report["drops_in_checkpoint"]
    assert report["queue_keys_left"] == []
    ref = weights(twin)
    assert all(torch.equal(v, ref[k]) for k, v in weights(spec).items())
    mine, theirs = ([{k: r[k] for k in COMPARED} for r in read_metrics(Path(s.runtime.out_dir) / s.name / "metrics.jsonl")
                     if r.get("kind") == "train"] for s in (spec, twin))
    assert mine == theirs


def live_actors(head, run_id: str) -> list[str]:
    from ray.util.state import list_actors

    rows = list_actors(address=head.dashboard_url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return sorted(row.name for row in rows if (row.name or "").startswith(f"dlrl:{run_id}:"))


def test_sigkilled_dlrl_train_resumes_and_finishes_with_the_default_capacity(ray_cluster, own_redis, tmp_path,
                                                                             report_counts):
    """`dlrl train SPEC` as an operator runs it, on the cluster and a Redis queue. First the deadlock
    of issue 13: the learner's process SIGKILLed, the driver rebuilds it and the workers regenerate
    batches already in the queue (duplicates); then the driver's whole process group SIGKILLed after
    a checkpoint. `dlrl train SPEC --resume`, with the default queue capacity, must finish with every
    step logged once, every group once, and no queue key nor actor of the run left."""
    run_id, steps = "chaosresume", 9
    sets = {"name": run_id, "task.eval_size": 8, "task.train_size": 64, "rollout.prompts_per_step": 4,
            "rollout.group_size": 4, "rollout.num_workers": 2, "train.steps": steps, "train.warmup_steps": 0,
            "eval.every": 100, "eval.steps": 4, "runtime.out_dir": str(tmp_path), "runtime.threads": 1,
            "runtime.checkpoint_every": 3, "runtime.max_staleness": 1, "runtime.ray_address": ray_cluster.address,
            "queue.backend": "redis"}
    spec_file = str(ROOT / "deploy/jobs/tiny-sudoku.toml")
    overrides = [f"{k}={v}" for k, v in sets.items()]
    spec = load_spec(spec_file, overrides)  # what `dlrl train` reads from the same arguments
    cmd = [sys.executable, "-m", "services.cli", "train", spec_file, *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "DLRL_REDIS_URL": own_redis.url}
    log = tmp_path / "driver.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(spec, 4, proc)
        os.kill(actor_pid(ray_cluster, f"dlrl:{run_id}:learner"), signal.SIGKILL)
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
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    checkpoint = read_state(tmp_path / run_id / "checkpoint")["version"]
    assert checkpoint >= 3
    probe = open_queue(spec.model_copy(update={"queue": spec.queue.model_copy(update={"redis_url": own_redis.url})}),
                       run_id, consumer="probe")
    depth = probe.depth()
    probe.close()
    t0 = time.monotonic()
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    seconds = time.monotonic() - t0
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"steps {checkpoint}->{steps}" in resumed.stdout
    ids = trained_groups(spec)
    logged = [r["step"] for r in read_metrics(tmp_path / run_id / "metrics.jsonl") if r.get("kind") == "train"]
    left = keys_of(own_redis.url, run_id)
    deadline = time.monotonic() + 30  # the finished driver's actors: killed as it exits, freed soon after
    while (actors := live_actors(ray_cluster, run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    report_counts(f"chaos resume: killed after checkpoint {checkpoint} with {depth} unacknowledged entries "
                  f"(capacity {default_capacity(spec)}); resumed run finished in {seconds:.0f}s, "
                  f"{len(logged)} steps logged, {len(ids)} groups trained, {len(set(ids))} distinct, "
                  f"{len(left)} queue keys left, {len(actors)} actors left")
    assert logged == list(range(1, steps + 1))
    assert sorted(ids) == expected_group_ids(spec) and len(ids) == len(set(ids))
    assert left == [] and actors == []

