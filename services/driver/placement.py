"""Where a job's actors go: resource requests from the spec, reserved up front in one placement group.

The requests come from the spec, never from what the cluster shows when the job starts: on a
`ray up` or KubeRay cluster whose GPU workers start at zero (deploy/ray-cluster.yaml) a job that
sized its requests from the GPUs present would ask for none, the autoscaler would never scale up
and the actors would land on the CPU head. With `runtime.device = "cuda"` each of the
`runtime.learner_ranks` learner ranks asks for `runtime.learner_gpus` and each rollout worker for
`runtime.worker_gpus`, whatever is up now.

All of a job's actors go into one placement group (strategy PACK: the learner ranks, one bundle
each, and the workers as close together as the cluster allows, as Ray users expect of one job:
PACK puts the ranks of a learner group on one node when one node has room, so their collectives
stay on NVLink). The reservation is pending demand
that an autoscaler acts on; if it is not granted within `runtime.placement_timeout_s` the job fails
with what it asked for and what the cluster has, instead of hanging with actors that never start.
A request no node of the cluster (or of what its autoscaler can add) could ever grant fails before
that, in seconds (services.driver.resources).
A learner rebuilt after a crash, or a worker Ray restarts, takes its own bundle again.

`device = "auto"` keeps the small-machine behaviour: GPUs only if the cluster has some at start,
shared in fractions; `"cpu"`: none. Actors get a fraction of a CPU each on the CPU, so that a
2-core laptop can hold a learner and two workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util import placement_group, remove_placement_group
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dlrl.config import JobSpec


class PlacementError(RuntimeError):
    """The cluster did not grant the job's resources in time; the message says what was asked."""


@dataclass(frozen=True)
class Placement:
    """Per-actor requests: bundles 0..R-1 are the learner ranks', then the n rollout workers'."""

    learner: dict[str, float]
    worker: dict[str, float]
    num_workers: int
    learner_ranks: int = 1

    def bundles(self) -> list[dict[str, float]]:
        return ([_bundle(self.learner) for _ in range(self.learner_ranks)]
                + [_bundle(self.worker) for _ in range(self.num_workers)])

    def describe(self) -> str:
        def one(res: dict[str, float]) -> str:
            return ", ".join(f"{v:g} {'GPU' if k == 'num_gpus' else 'CPU'}" for k, v in res.items())
        return (f"{self.learner_ranks} learner rank(s): {one(self.learner)} each; "
                f"{self.num_workers} rollout worker(s): {one(self.worker)} each")


def _bundle(res: dict[str, float]) -> dict[str, float]:
    return {"CPU": res["num_cpus"], **({"GPU": res["num_gpus"]} if res.get("num_gpus") else {})}


def plan_placement(spec: JobSpec, cluster_gpus: float) -> Placement:
    """The job's requests (pure). `cluster_gpus` matters only for device = "auto"."""
    rt, n, r = spec.runtime, spec.rollout.num_workers, spec.runtime.learner_ranks
    if rt.device == "cuda":
        learner = {"num_cpus": 1.0, "num_gpus": rt.learner_gpus}
        worker = {"num_cpus": 1.0, "num_gpus": rt.worker_gpus}
        return Placement(learner, worker, n, r)
    share = {"num_cpus": 1.0 / (n + r)}
    if rt.device == "auto" and cluster_gpus >= 1:
        share["num_gpus"] = min(1.0, cluster_gpus / (n + r))
    return Placement(dict(share), dict(share), n, r)


def reserve(placement: Placement, timeout_s: float, name: str = "") -> PlacementGroup:
    """Reserve every bundle (PACK) or fail with PlacementError after `timeout_s`."""
    pg = placement_group(placement.bundles(), strategy="PACK", name=name)
    try:
        ready = pg.wait(timeout_seconds=timeout_s)
    except Exception:
        remove_placement_group(pg)
        raise
    if not ready:
        remove_placement_group(pg)
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise PlacementError(
            f"the cluster did not grant the job's resources within {timeout_s:g} s "
            f"(runtime.placement_timeout_s): it asked for {placement.describe()} "
            f"(bundles {placement.bundles()}, strategy PACK); the cluster has {have or 'no CPU/GPU'}. "
            "Add nodes (or let the autoscaler), lower runtime.learner_ranks / learner_gpus / worker_gpus or "
            "rollout.num_workers, or set runtime.device = 'cpu'.")
    return pg


def actor_options(placement: Placement, pg: PlacementGroup, index: int) -> dict:
    """Ray actor options for bundle `index` (r < learner_ranks: learner rank r; then the workers:
    `worker_bundle(placement, i)`)."""
    res = placement.learner if index < placement.learner_ranks else placement.worker
    return {**res, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index)}


def worker_bundle(placement: Placement, i: int) -> int:
    """The bundle index of rollout worker i."""
    return placement.learner_ranks + i
