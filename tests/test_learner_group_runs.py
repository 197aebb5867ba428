"""Runs with a 2-rank learner group (FSDP2 over gloo, runtime.learner_ranks = 2) on the session's
real Ray head and redis-server: every group trained once, a SIGKILLed driver resumed and a
SIGKILLed learner rank rebuilt both end bit-identical to the uninterrupted group run, and a
checkpoint refuses to resume with another group size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner.sharded_state import GroupSizeError
from learner.train import Learner, read_state
from services.driver.driver import run
from tests.test_runtime import (  # noqa: F401 - monkeypatch_module is a fixture
    DEADLINE_S, ROOT, actor_pid, expected_group_ids, finish, monkeypatch_module, run_in_thread, tiny_spec,
    trained_groups, wait_for_step, weights,
)

pytestmark = pytest.mark.slow


def group_spec(tmp_path: Path, ray_cluster, **runtime):
    spec = tiny_spec(tmp_path, "grp", ray_address=ray_cluster.address, learner_ranks=2, **runtime)
    return spec.model_copy(update={"queue": spec.queue.model_copy(update={"backend": "redis"})})


@pytest.fixture(scope="module")
def group_run(ray_cluster, redis_server, tmp_path_factory, monkeypatch_module):  # noqa: F811
    """The reference: a synchronous run of the 2-rank group, never interrupted."""
    monkeypatch_module.setenv("DLRL_REDIS_URL", redis_server.url)
    spec = group_spec(tmp_path_factory.mktemp("grp"), ray_cluster)
    run(spec)
    return spec


def _same_weights(spec, ref) -> None:
    a, b = weights(spec), weights(ref)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.equal(v, b[k]) for k, v in a.items()), f"weights differ by up to {worst:.3g}"


def test_group_run_trains_every_group_once_and_shards_its_resume_state(group_run):
    ids = trained_groups(group_run)
    assert sorted(ids) == expected_group_ids(group_run) and len(ids) == len(set(ids))
    ckpt = Path(group_run.runtime.out_dir) / "grp" / "checkpoint"
    assert read_state(ckpt)["learner_ranks"] == 2
    shards = sorted(p.name for p in (ckpt / "dcp").iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards and ".metadata" in shards
    assert "optimizer" not in torch.load(ckpt / "trainer_state.pt", weights_only=True)  # it is in the shards
    records = [json.loads(x) for x in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, group_run.train.steps + 1))


def test_killed_group_run_resumes_bit_identical(ray_cluster, redis_server, tmp_path, group_run):
    spec = group_spec(tmp_path, ray_cluster)
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
    assert read_state(tmp_path / "grp" / "checkpoint")["version"] == 2
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=DEADLINE_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ids = trained_groups(spec)
    assert sorted(ids) == expected_group_ids(spec) and len(ids) == len(set(ids))
    _same_weights(spec, group_run)


def test_killed_learner_rank_is_rebuilt_with_its_group(ray_cluster, redis_server, tmp_path, monkeypatch,
                                                       group_run):
    monkeypatch.setenv("DLRL_REDIS_URL", redis_server.url)
    spec = group_spec(tmp_path, ray_cluster)
    thread, out = run_in_thread(spec)
    wait_for_step(spec, 2, thread)  # steps 0-2 done; the checkpoint holds steps 0-1
    os.kill(actor_pid(ray_cluster, "dlrl:grp:learner:1"), signal.SIGKILL)  # not the lead: rank 1
    finish(thread, out)
    ids = trained_groups(spec)
    assert sorted(ids) == expected_group_ids(spec) and len(ids) == len(set(ids))
    records = [json.loads(x) for x in (tmp_path / "grp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, spec.train.steps + 1))
    _same_weights(spec, group_run)


def test_a_group_checkpoint_refuses_another_group_size(group_run):
    ckpt = Path(group_run.runtime.out_dir) / "grp" / "checkpoint"
    single = group_run.model_copy(update={"runtime": group_run.runtime.model_copy(update={"learner_ranks": 1})})
    with pytest.raises(GroupSizeError, match=r"learner group of 2 rank\(s\); this run has 1.*learner_ranks = 2"):
        Learner(single, "grp", str(ckpt))


def test_lead_killed_inside_a_group_checkpoint_write_is_rebuilt_with_its_group(ray_cluster, redis_server, tmp_path,
                                                                               monkeypatch, group_run):
    """Issue 20: a rank SIGKILLed while the group writes its checkpoint ended the run. The lead is
    held inside the write of step 4 (after every rank wrote its shards, before the rename) and
    killed there; its peer, waiting in the barrier, is killed with the group, which is rebuilt
    from step 2 and ends bit-identical, with no temporary folder left."""
    from bench.chaos import Fault, run_with_faults

    monkeypatch.setenv("DLRL_REDIS_URL", redis_server.url)
    spec = group_spec(tmp_path, ray_cluster)
    report = run_with_faults(spec, ray_cluster, redis_server, [Fault(2, "save")], timeout_s=DEADLINE_S * 2)
    assert report["steps_logged"] == list(range(1, spec.train.steps + 1))
    assert report["trained_groups"] == report["distinct_trained_groups"] == report["expected_groups"]
    assert [f["target"] for f in report["faults"]] == ["save"] and report["temporary_folders_left"] == []
    assert report["drops_in_metrics"] == report["drops_in_checkpoint"]
    _same_weights(spec, group_run)
