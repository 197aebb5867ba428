"""Whether the Ray cluster can ever hold a job's actors, checked before anything is placed.

A placement group Ray cannot grant waits, by design, for an autoscaler to add nodes: on a cluster
with none (the in-process Ray of `dlrl train`, a `ray start --head` machine) a `device = "cuda"`
job on a machine without GPUs used to wait out `runtime.placement_timeout_s` (600 s) while Ray
printed "No available node types can fulfill resource request". This module compares the
requests (`services.driver.placement.Placement`) with the most the cluster can ever have, and
fails at once, naming the request and the remedy.

What the cluster can ever have, read the way `ray status` reads it:
- an autoscaler that reported its node groups (autoscaler v2 / KubeRay: the GCS's cluster
  config, the same source Ray Train's worker group checks before it waits): every group at its
  max count, and the largest node a group can add;
- a head whose monitor runs the read-only provider (no autoscaling config: `ray start --head`
  or `ray.init()`): its node types are the live nodes themselves, named "node_<node id>"
  (ray.autoscaler._private.util.format_readonly_node_type), so the nodes up now are all there
  will be;
- any other autoscaler (`ray up`'s v1 monitor, whose node types this process cannot read): the
  check is skipped and the placement timeout stays the only bound, since nodes may still come.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from dlrl.config import JobSpec
from services.driver.placement import Placement

KINDS = ("GPU", "CPU")
STATUS_WAIT_S = 15.0
"""How long to wait for the head's monitor to publish its first status (it does every ~5 s)."""


class CapacityError(RuntimeError):
    """The cluster can never grant the job's resources; the message says what was asked and why."""


@dataclass(frozen=True)
class Capacity:
    """The most the cluster can ever have: in all, and on the largest node it has or can add."""

    total: dict[str, float]
    largest_node: dict[str, float]
    autoscaler: bool
    """Whether an autoscaler may add nodes (the figures above then include what it can add)."""


def shortfall(spec: JobSpec, placement: Placement, capacity: Capacity) -> str | None:
    """Why the job's actors can never be placed on a cluster of `capacity`, with the remedy; None
    when they can (pure: what the job asks for against what the cluster can have)."""
    actors = {"learner rank": (placement.learner, placement.learner_ranks),
              "rollout worker": (placement.worker, placement.num_workers)}
    where = ("this cluster can have at most {have:g} {kind}s, what its autoscaler can add included"
             if capacity.autoscaler
             else "this cluster has {have:g} {kind}s and no autoscaler")
    for kind in KINDS:
        key = "num_gpus" if kind == "GPU" else "num_cpus"
        need = sum(res.get(key, 0.0) * count for res, count in actors.values())
        have = capacity.total.get(kind, 0.0)
        if need > have + 1e-9:
            asks = " and ".join(f"{res.get(key, 0.0):g} {kind} per {name} (x{count})"
                                for name, (res, count) in actors.items() if res.get(key))
            return (f"{_request(spec, kind)} asks for {asks}: {need:g} {kind}s in all; "
                    f"{where.format(have=have, kind=kind)}: {_remedy(spec, kind)}")
        for name, (res, count) in actors.items():
            one = res.get(key, 0.0)
            if count and one > capacity.largest_node.get(kind, 0.0) + 1e-9:
                return (f"{_request(spec, kind)} asks for {one:g} {kind}s per {name}, on one node; the largest "
                        f"node {'this cluster has or can add' if capacity.autoscaler else 'of this cluster'} "
                        f"has {capacity.largest_node.get(kind, 0.0):g}: {_remedy(spec, kind)}")
    return None


def _request(spec: JobSpec, kind: str) -> str:
    if kind == "GPU":
        return f"runtime.device = {spec.runtime.device!r}"
    return f"the job ({spec.runtime.learner_ranks} learner rank(s), {spec.rollout.num_workers} rollout worker(s))"


def _remedy(spec: JobSpec, kind: str) -> str:
    if kind == "GPU":
        return ("set runtime.device = 'cpu' (or 'auto': GPUs when the cluster has some), lower "
                "runtime.learner_gpus / worker_gpus / learner_ranks or rollout.num_workers, or connect to a "
                "cluster with GPUs (runtime.ray_address or RAY_ADDRESS)")
    return ("lower rollout.num_workers or runtime.learner_ranks, give an in-process Ray more CPUs "
            "(runtime.num_cpus), or connect to a bigger cluster (runtime.ray_address or RAY_ADDRESS)")


def _cpu_gpu(resources: dict) -> dict[str, float]:
    return {k: float(resources.get(k, 0.0)) for k in KINDS}


def cluster_capacity(wait_s: float = STATUS_WAIT_S) -> Capacity | None:
    """The connected cluster's `Capacity`, or None when an autoscaler of unknown reach runs (or
    the cluster says nothing about one within `wait_s`): then no limit is known."""
    import ray

    nodes = [_cpu_gpu(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    now = _cpu_gpu(ray.cluster_resources())
    largest = {k: max((n[k] for n in nodes), default=0.0) for k in KINDS}
    groups = _node_groups()
    if groups:  # an autoscaler that reported what it can add
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
        total = {k: max(now[k], float(most.get(k, 0))) for k in KINDS}
        largest = {k: max(largest[k], *(float(g.get(k, 0)) for g in groups)) for k in KINDS}
        return Capacity(total, largest, autoscaler=True)
    deadline = time.monotonic() + wait_s
    while True:
        static = _readonly_monitor()
        if static is not None:
            return Capacity(now, largest, autoscaler=False) if static else None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def _node_groups() -> list[dict]:
    """The node groups an autoscaler reported to the GCS (their per-node resources), or []."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray without it: no groups known
        return []
    if config is None:
        return []
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]


def _readonly_monitor() -> bool | None:
    """Whether the head's monitor runs the read-only provider (no autoscaler: True), a real
    autoscaler (False), or has published no status yet (None)."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # noqa: BLE001
        return None
    if not raw:
        return None
    try:
        report = json.loads(raw).get("autoscaler_report") or {}
    except (ValueError, AttributeError):
        return None
    mapping = report.get("node_type_mapping") or {}
    if not mapping:
        return None
    return all(node_type == f"node_{node_id}" for node_id, node_type in mapping.items())


def check_capacity(spec: JobSpec, placement: Placement) -> None:
    """Raise CapacityError, at once, when the connected cluster can never place the job's actors."""
    capacity = cluster_capacity()
    if capacity is None:
        return
    problem = shortfall(spec, placement, capacity)
    if problem is not None:
        raise CapacityError(problem)
