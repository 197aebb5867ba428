"""The distributed runtime under faults, on the session's real Ray head and redis-server.

A rollout actor killed mid-run is restarted by Ray and its batch redone; a learner killed mid-run
is rebuilt from the last checkpoint; a whole run killed and resumed ends bit-identical to one that
never stopped. In every case the learner trains on each group id exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from dlrl.config import JobSpec
from learner.train import read_state
from services.driver.driver import run, split
from services.driver.progress import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 240


def tiny_spec(tmp_path: Path, name: str, **runtime) -> JobSpec:
    base = JobSpec.from_toml(ROOT / "deploy/jobs/tiny-sudoku.toml").model_dump()
    base.update(name=name)
    base["task"].update(eval_size=8, train_size=64)
    base["rollout"].update(prompts_per_step=4, group_size=4, num_workers=2)
    base["train"].update(steps=6, warmup_steps=0)
    base["eval"].update(every=100, steps=4)
    base["runtime"].update({"out_dir": str(tmp_path), "threads": 1, "checkpoint_every": 2, **runtime})
    return JobSpec.model_validate(base)


def expected_group_ids(spec: JobSpec, run_id: str | None = None) -> list[str]:
    run_id = run_id or spec.name
    shares = split(spec.rollout.prompts_per_step, spec.rollout.num_workers)
    return sorted(f"{run_id}/b{b}-w{w}-{k}" for b in range(spec.train.steps)
                  for w, n in enumerate(shares) for k in range(n))


def trained_groups(spec: JobSpec) -> list[str]:
    return read_state(Path(spec.runtime.out_dir) / spec.name / "checkpoint")["trained_groups"]


def weights(spec: JobSpec) -> dict[str, torch.Tensor]:
    return load_file(Path(spec.runtime.out_dir) / spec.name / "checkpoint" / "model.safetensors")


def wait_for_step(spec: JobSpec, step: int, thread_or_proc) -> None:
    path = Path(spec.runtime.out_dir) / spec.name / "metrics.jsonl"
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        # step `step` (0-based) done: its train record says step + 1, the steps done
        if any(r.get("kind") == "train" and r["step"] > step for r in read_metrics(path)):
            return
        alive = thread_or_proc.is_alive() if hasattr(thread_or_proc, "is_alive") else thread_or_proc.poll() is None
        assert alive, "the run ended before the fault was injected"
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} within {DEADLINE_S}s")


def run_in_thread(spec: JobSpec) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            out["summary"] = run(spec)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def finish(thread: threading.Thread, out: dict) -> dict:
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), "the run did not finish in time"
    if "error" in out:
        raise out["error"]
    return out["summary"]


def actor_pid(head, name: str, not_pid: int | None = None) -> int:
    """The pid of the live process of actor `name` (the state API of Ray head `head`), other than
    `not_pid`."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 60
    while True:
        rows = list_actors(address=head.dashboard_url, filters=[("name", "=", name), ("state", "=", "ALIVE")], raise_on_missing_output=False)
        pids = [row.pid for row in rows if row.pid and row.pid != not_pid]
        if pids:
            return pids[0]
        assert time.monotonic() < deadline, f"no live process for actor {name}"
        time.sleep(0.5)


def actor(name: str):
    deadline = time.monotonic() + 30
    while True:
        try:
            return ray.get_actor(name, namespace="dlrl")
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, redis_server, tmp_path_factory, monkeypatch_module):
    """The reference: the synchronous tiny run, never interrupted (Redis queue)."""
    monkeypatch_module.setenv("DLRL_REDIS_URL", redis_server.url)
    spec = tiny_spec(tmp_path_factory.mktemp("ref"), "ref", ray_address=ray_cluster.address)
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"})})
    run(spec)
    return spec


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_uninterrupted_run_trains_every_group_once(uninterrupted):
    assert sorted(trained_groups(uninterrupted)) == expected_group_ids(uninterrupted)
    assert len(trained_groups(uninterrupted)) == len(set(trained_groups(uninterrupted)))


def test_run_metrics_reach_rays_prometheus_endpoint(uninterrupted, ray_cluster):
    """What the dashboard's metrics view shows: the run's series, tagged with the job."""
    deadline = time.monotonic() + 30
    while True:  # the metrics agent exports on a period of a few seconds
        text = urllib.request.urlopen(ray_cluster.metrics_url, timeout=5).read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_dlrl_") and 'job="ref"' in ln]
        names = {ln.split("{")[0] for ln in lines}
        if {"ray_dlrl_reward", "ray_dlrl_queue_depth", "ray_dlrl_weight_sync_seconds"} <= names:
            break
        assert time.monotonic() < deadline, f"dlrl series missing from {ray_cluster.metrics_url}: {sorted(names)}"
        time.sleep(1)
    assert any(n.startswith("ray_dlrl_staleness") for n in names)


def test_async_run_stays_within_its_staleness_bound(ray_cluster, tmp_path):
    spec = tiny_spec(tmp_path, "async", ray_address=ray_cluster.address, max_staleness=1, checkpoint_every=0)
    run(spec)
    train = [r for r in read_metrics(tmp_path / "async" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, spec.train.steps + 1))
    assert max(r["max_staleness"] for r in train) == 1  # the workers did run ahead
    assert all(r["max_staleness"] <= 1 and r["stale_dropped"] == 0 for r in train)
    ids = trained_groups(spec)
    assert sorted(ids) == expected_group_ids(spec) and len(ids) == len(set(ids))


def test_broadcast_weight_sync_matches_the_object_store(ray_cluster, redis_server, tmp_path, monkeypatch,
                                                       uninterrupted):
    """gloo broadcast between the learner and both workers: same run, same final weights."""
    monkeypatch.setenv("DLRL_REDIS_URL", redis_server.url)
    spec = tiny_spec(tmp_path, "ref", ray_address=ray_cluster.address)
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"}),
                                   "weights": spec.weights.model_copy(update={"sync": "collective"})})
    run(spec)
    train = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(r["weight_sync_transport"] == "collective" for r in train)
    ref = weights(uninterrupted)
    assert all(torch.equal(v, ref[k]) for k, v in weights(spec).items())


def test_killed_rollout_actor_is_restarted_and_no_group_is_lost_or_repeated(ray_cluster, tmp_path):
    spec = tiny_spec(tmp_path, "killworker", ray_address=ray_cluster.address)  # Ray queue
    thread, out = run_in_thread(spec)
    wait_for_step(spec, 1, thread)
    ray.kill(actor("dlrl:killworker:worker:1"), no_restart=False)  # Ray restarts it
    finish(thread, out)
    ids = trained_groups(spec)
    assert sorted(ids) == expected_group_ids(spec) and len(ids) == len(set(ids))
    records = [r for r in read_metrics(tmp_path / "killworker" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, spec.train.steps + 1))
    assert sum(r["worker_restarts"] for r in records) >= 1


def test_killed_learner_is_rebuilt_from_its_checkpoint(ray_cluster, redis_server, tmp_path, monkeypatch,
                                                       uninterrupted):
    monkeypatch.setenv("DLRL_REDIS_URL", redis_server.url)
    spec = tiny_spec(tmp_path, "ref", ray_address=ray_cluster.address)  # same name: same group ids
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"})})
    thread, out = run_in_thread(spec)
    wait_for_step(spec, 2, thread)  # steps 0-2 done; the checkpoint holds steps 0-1
    # As the OS kills it (OOM killer, kill -9), not through Ray: the dead actor's name stays taken.
    os.kill(actor_pid(ray_cluster, "dlrl:ref:learner"), signal.SIGKILL)
    finish(thread, out)
    ids = trained_groups(spec)
    assert sorted(ids) == expected_group_ids(spec) and len(ids) == len(set(ids))
    records = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, spec.train.steps + 1))
    # Synchronous and seeded: the rewound run ends where the uninterrupted one did.
    ref = weights(uninterrupted)
    assert all(torch.equal(v, ref[k]) for k, v in weights(spec).items())


def test_rollout_worker_that_cannot_start_fails_the_run_with_its_error(ray_cluster, tmp_path):
    """Worker 1 gets no training prompt (train_size 1, 2 workers): its constructor raises. The run
    must fail with that error, promptly, instead of the learner waiting for groups for ever."""
    spec = tiny_spec(tmp_path, "nostart", ray_address=ray_cluster.address)
    spec = spec.model_copy(update={"task": spec.task.model_copy(update={"train_size": 1})})
    t0 = time.monotonic()
    thread, out = run_in_thread(spec)
    thread.join(120)
    assert not thread.is_alive(), "the run still waits 120 s after its worker failed to start"
    assert "no training prompts" in str(out.get("error")), out
    assert time.monotonic() - t0 < 120


def test_killed_run_resumes_bit_identical(ray_cluster, redis_server, tmp_path, uninterrupted):
    spec = tiny_spec(tmp_path, "ref", ray_address=ray_cluster.address)
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"})})
    env = {**os.environ, "DLRL_REDIS_URL": redis_server.url, "DLRL_SPEC": spec.model_dump_json()}
    cmd = [sys.executable, "-m", "services.cli", "train", "--spec-env", "DLRL_SPEC"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_step(spec, 2, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole driver, mid-step
        out = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert read_state(tmp_path / "ref" / "checkpoint")["version"] == 2
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=DEADLINE_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ids = trained_groups(spec)
    assert sorted(ids) == expected_group_ids(spec) and len(ids) == len(set(ids))
    ref = weights(uninterrupted)
    assert all(torch.equal(v, ref[k]) for k, v in weights(spec).items())


def test_sigterm_stops_the_run_with_143_and_leaves_no_queue(ray_cluster, redis_server, tmp_path):
    """`ray job stop` / `docker stop`: the driver exits 128 + SIGTERM after removing its actors
    and its queue (a stopped run leaves no Redis key behind)."""
    import redis

    spec = tiny_spec(tmp_path, "stopped", ray_address=ray_cluster.address)
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"})})
    env = {**os.environ, "DLRL_REDIS_URL": redis_server.url, "DLRL_SPEC": spec.model_dump_json()}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "train", "--spec-env", "DLRL_SPEC"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(spec, 1, proc)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    r = redis.Redis.from_url(redis_server.url)
    assert list(r.scan_iter(match="dlrl:{stopped}:*")) == []
    r.close()
