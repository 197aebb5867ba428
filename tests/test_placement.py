"""Placement: GPU requests from the spec (not from the GPUs up at start), reserved in one placement
group, and a job the cluster cannot place fails fast with what it asked for."""

from __future__ import annotations

import time

import pytest

from dlrl.config import JobSpec
from services.driver.placement import PlacementError, plan_placement, reserve, worker_bundle


def spec(**runtime) -> JobSpec:
    return JobSpec.model_validate({"rollout": {"num_workers": 2}, "runtime": runtime})


def test_cuda_asks_for_its_gpus_on_a_cluster_that_has_none_yet():
    """An autoscaling cluster whose GPU nodes start at zero: the requests are still there."""
    p = plan_placement(spec(device="cuda", learner_gpus=1, worker_gpus=0.5), cluster_gpus=0)
    assert p.learner == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert p.worker == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert p.bundles() == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.5}]


def test_every_learner_rank_gets_its_own_gpu_bundle_before_the_workers():
    """The paper's layout on one 8-GPU node: a 4-rank learner group and 4 rollout workers."""
    s = JobSpec.model_validate({"rollout": {"num_workers": 4},
                                "runtime": {"device": "cuda", "learner_ranks": 4, "learner_gpus": 1}})
    p = plan_placement(s, cluster_gpus=0)
    assert p.bundles() == [{"CPU": 1.0, "GPU": 1.0}] * 8
    assert [worker_bundle(p, i) for i in range(4)] == [4, 5, 6, 7]
    assert "4 learner rank(s): 1 CPU, 1 GPU each" in p.describe()


def test_cpu_and_auto_share_a_small_machine():
    assert plan_placement(spec(device="cpu"), cluster_gpus=8).bundles() == [{"CPU": 1 / 3}] * 3
    assert plan_placement(spec(device="auto"), cluster_gpus=0).worker == {"num_cpus": 1 / 3}
    assert plan_placement(spec(device="auto"), cluster_gpus=1).worker == {"num_cpus": 1 / 3, "num_gpus": 1 / 3}


def test_bad_gpu_counts_are_refused_by_the_spec():
    with pytest.raises(ValueError, match="learner_gpus"):
        spec(device="cuda", learner_gpus=0)


def test_a_job_the_cluster_cannot_place_fails_fast_with_its_request(ray_cluster):
    """The test cluster has CPUs only: a GPU job's reservation is never granted."""
    import ray

    p = plan_placement(spec(device="cuda", worker_gpus=2), cluster_gpus=0)
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        reserve(p, timeout_s=3, name="dlrl:test-unplaceable")
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert "runtime.placement_timeout_s" in msg and "2 rollout worker(s): 1 CPU, 2 GPU each" in msg
    assert "1 learner rank(s): 1 CPU, 1 GPU each" in msg
    # The refused reservation is removed, not left pending for an autoscaler to chase.
    states = [pg["state"] for pg in ray.util.placement_group_table().values()
              if pg["name"] == "dlrl:test-unplaceable"]
    assert states and all(s == "REMOVED" for s in states)


def test_actors_run_in_their_bundles(ray_cluster):
    import ray
    from ray.util import remove_placement_group

    from services.driver.placement import actor_options

    p = plan_placement(spec(device="cpu"), cluster_gpus=0)
    pg = reserve(p, timeout_s=60, name="dlrl:test-placed")
    try:
        @ray.remote
        class Where:
            def bundle(self) -> str:
                return ray.get_runtime_context().get_placement_group_id()

        actors = [Where.options(**actor_options(p, pg, i)).remote() for i in range(3)]
        assert set(ray.get([a.bundle.remote() for a in actors], timeout=60)) == {pg.id.hex()}
        for a in actors:
            ray.kill(a)
    finally:
        remove_placement_group(pg)


def test_an_unplaceable_job_fails_before_any_actor_starts(ray_cluster, redis_server, tmp_path, monkeypatch):
    """The driver checks the cluster before it reserves or creates anything: a GPU job on this CPU
    cluster, which has no autoscaler, fails at once (services/driver/resources.py; not after the
    placement timeout, which stays the bound on an autoscaling cluster) and leaves no queue behind."""
    import redis

    from services.driver import driver
    from services.driver.resources import CapacityError
    from tests.test_runtime import tiny_spec

    monkeypatch.setenv("DLRL_REDIS_URL", redis_server.url)
    s = tiny_spec(tmp_path, "unplaceable", ray_address=ray_cluster.address, device="cuda",
                  placement_timeout_s=600)
    s = s.model_copy(update={"queue": s.queue.model_copy(update={"backend": "redis"})})
    t0 = time.monotonic()
    with pytest.raises(CapacityError, match="1 GPU per learner rank .* 0 GPUs and no autoscaler"):
        driver.run(s)
    assert time.monotonic() - t0 < 60
    assert not list(redis.Redis.from_url(redis_server.url).scan_iter("dlrl:unplaceable*"))
