"""The learner's objectives, one module each (objective.py says what an objective provides).

A new objective is a module here plus one line in OBJECTIVES (and its name in TrainSpec.algorithm,
the spec schema's closed list, which tests/test_objectives.py keeps equal to this registry).
"""

from __future__ import annotations

from dlrl.config import JobSpec, TrainSpec
from dlrl.elbo_terms import ElboPass, rollout_pass
from learner.objectives import bgpo, diffu_grpo, naive_elbo
from learner.objectives.objective import Objective, RatioStats

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    bgpo.OBJECTIVE,
    naive_elbo.OBJECTIVE,
    diffu_grpo.OBJECTIVE,
)}

__all__ = ["OBJECTIVES", "Objective", "RatioStats", "behaviour_pass", "objective_for"]


def objective_for(train: TrainSpec) -> Objective:
    return OBJECTIVES[train.algorithm]


def behaviour_pass(spec: JobSpec) -> ElboPass | None:
    """The ELBO pass a rollout worker runs to ship its groups' behaviour terms l_old
    (rollout/behaviour.py), or None when this job's groups carry none: a synchronous run (the
    learner still holds the weights that generated the batch) or an objective whose old terms are
    not ELBO terms. The job driver hands it to each worker, so rollout/ never reads an objective;
    the learner reads the same answer to know what the groups carry."""
    if spec.runtime.max_staleness >= 1 and objective_for(spec.train).elbo_old:
        return rollout_pass(spec)
    return None
