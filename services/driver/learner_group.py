"""The run's learner as the driver sees it: one actor, or the N ranks of a learner group.

Every learner call the driver makes goes to every rank at once (a rank that is not called would
leave the others waiting in a collective), and the lead's (rank 0's) result is the answer. The
lead keeps the actor name the single learner always had (`dlrl:<run>:learner`), so tools and
tests that look the learner up by name find the lead; the other ranks are `...:learner:<r>`.

A group is rebuilt as a whole: when any rank dies (ray.kill, SIGKILL, OOM) its peers are stuck in
or headed for a collective that can never complete, so every rank is killed and N new ones
restore the last checkpoint together (learner.sharded_state).
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import PlacementGroup

from dlrl.config import JobSpec
from learner.train import Learner
from services.driver.placement import Placement, actor_options

NAME_RELEASE_S = 30.0
"""Longest a dead learner's actor name may stay taken after its handle is released."""
CALL_WAIT_S = 1800.0
"""Longest the driver waits for an actor call (a save, an evaluation, a weight payload)."""


class LearnerDied(RuntimeError):
    """A learner rank died (ray.kill, SIGKILL, OOM, node loss) during a call: the driver rebuilds
    the group from the last checkpoint. `error` is Ray's RayActorError."""

    def __init__(self, error: RayActorError) -> None:
        super().__init__(str(error))
        self.error = error


def get(refs, what: str, timeout: float = CALL_WAIT_S):
    """ray.get with a deadline and an error that says what did not answer."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"dlrl: {what} did not answer within {timeout:.0f}s") from None


class LearnerGroup:
    def __init__(self, spec: JobSpec, run_id: str, namespace: str, placement: Placement,
                 pg: PlacementGroup) -> None:
        self.spec, self.run_id, self.namespace = spec, run_id, namespace
        self.placement, self.pg = placement, pg
        self.size = spec.runtime.learner_ranks
        self.names = [f"dlrl:{run_id}:learner"] + [f"dlrl:{run_id}:learner:{r}" for r in range(1, self.size)]
        self.actors: list = []

    @property
    def lead(self):
        return self.actors[0] if self.actors else None

    def start(self, resume_from: str | None) -> None:
        """Create the ranks (each builds the model empty), then form the group: shard, read each
        rank's shards of the weights, restore."""
        self.actors = [
            ray.remote(Learner).options(
                name=name, namespace=self.namespace, **actor_options(self.placement, self.pg, r),
            ).remote(self.spec, self.run_id, resume_from, r, self.size)
            for r, name in enumerate(self.names)
        ]
        if self.size > 1:
            host, port = get(self.lead.group_address.remote(), "the learner group's rendezvous address")
            get([a.join_group.remote(host, port) for a in self.actors], "forming the learner group")

    def call(self, method: str, *args) -> list[ray.ObjectRef]:
        """`method(*args)` on every rank; the lead's ref first."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def run(self, method: str, *args, what: str, timeout: float = CALL_WAIT_S):
        """`call` and wait for every rank; the lead's result. LearnerDied when a rank died (its
        peers may be stuck in a collective it never joined, so each rank is watched, not only the
        lead); a rank's own exception is raised as is."""
        refs = self.call(method, *args)
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0.0))
            if not ready:
                raise TimeoutError(f"dlrl: {what} did not answer within {timeout:.0f}s")
            try:
                ray.get(ready[0])
            except RayError as e:
                error = self.failure(refs, e)
                raise (LearnerDied(error) if isinstance(error, RayActorError) else error) from e
        return ray.get(refs[0])

    def failure(self, refs: list[ray.ObjectRef], first: Exception, wait_s: float = 60.0) -> Exception:
        """The error to act on when one rank's call failed: a dead rank (RayActorError: rebuild the
        group) wins over the errors its peers then hit in their collectives; else the lead's own
        error, which says what went wrong (the others only know that the lead gave up)."""
        if len(refs) == 1:
            return first
        errors: list[Exception] = []
        ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except RayError as e:
                errors.append(e)
            except Exception as e:  # noqa: BLE001 - still running after wait_s: stuck in a collective
                errors.append(e)
        dead = [e for e in errors if isinstance(e, RayActorError)]
        if dead:
            return dead[0]
        try:
            ray.get(refs[0], timeout=0)
        except RayError as e:
            return e
        except Exception:  # noqa: BLE001
            pass
        return first

    def weight_payload(self) -> tuple[ray.ObjectRef, ray.ObjectRef, list[ray.ObjectRef]]:
        """The lead's (manifest ref, payload ref) for the driver to adopt, and the other ranks'
        refs to wait on (they join the gathers and return nothing)."""
        refs = [a.weight_payload.options(num_returns=2).remote() for a in self.actors]
        (update_ref, payload_ref), rest = refs[0], refs[1:]
        return update_ref, payload_ref, [r for pair in rest for r in pair]

    def release(self) -> None:
        """Kill every rank (dead or alive) and wait until their actor names are free again.

        Ray keeps the name of an actor that died by SIGKILL taken while a handle to it lives, so a
        replacement under the same name would fail with ActorAlreadyExistsError; ray.kill of the
        handle frees it."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except RayError:
                pass  # already gone
        self.actors = []
        deadline = time.monotonic() + NAME_RELEASE_S
        for name in self.names:
            while True:
                try:
                    ray.get_actor(name, namespace=self.namespace)
                except ValueError:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dlrl: the learner's actor name {name!r} is still taken "
                                       f"{NAME_RELEASE_S:.0f}s after the learner was killed; cannot rebuild it")
                time.sleep(0.2)
