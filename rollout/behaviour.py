"""The behaviour policy's ELBO terms l_old, measured by the rollout worker that generated a group.

BGPO's ratio is exp(d) with d = l_new - l_old, the ELBO terms of one completion under one MC mask
by the trained and by the behaviour policy. In a synchronous run the learner still holds the
weights that generated the batch, so it measures l_old itself.
With max_staleness >= 1 it does not: a group made by version v - 1 reaches a learner at version
v, whose own l_old would make d start at exactly 0 and hide the staleness from the clip. The
worker that generated the group holds those weights, and the MC masks are a pure function of the
group's mask_seed, so it computes the same terms the learner would have computed before it moved
on, and ships them in the group (TrajectoryGroup.behaviour_elbo). Both sides run the core's
code for it (dlrl.batch.collate_for, dlrl.elbo_terms).

Whether a job ships them, and with which numbers, the worker is told (an `ElboPass`, or None):
the job driver asks the learner's objective (learner.objectives.behaviour_pass), so this module
reads no objective. diffu-GRPO ships none (the learner's own log-probs, d = 0 at the first update
even when stale): its old terms are per-update prompt-masked one-step log-probs, (updates, N, L)
per batch, and it is the comparison baseline, not the method this correction is for.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import numpy as np
import torch

from dlrl.batch import collate_for
from dlrl.config import TrainSpec
from dlrl.elbo_terms import ElboPass, elbo_terms, micro_batches
from dlrl.models import SpecialIds
from dlrl.models.families import model_family
from dlrl.trajectory import TrajectoryGroup


@torch.no_grad()
def behaviour_terms(model: torch.nn.Module, groups: list[TrajectoryGroup], spec: TrainSpec, p: ElboPass,
                    ids: SpecialIds, device: torch.device | str) -> list[np.ndarray]:
    """l_old (G, n_mc) float64 of each group, by `model` (the weights that generated them):
    `spec`'s MC masks (collate_for), measured by the pass `p`.

    Groups of one prompt length go through the ELBO pass as one batch, without padding; the
    learner pads shorter prompts on the left, which leaves the terms equal up to rounding, since
    positions count from each row's first real token (dlrl.models.forward)."""
    out: list[np.ndarray | None] = [None] * len(groups)
    by_length: dict[int, list[int]] = defaultdict(list)
    for k, g in enumerate(groups):
        by_length[len(g.prompt_ids)].append(k)
    for members in by_length.values():
        batch = collate_for([groups[k] for k in members], spec, ids, model_family(model)).to(device)
        terms = elbo_terms(model, micro_batches(batch, p.micro_batch), p, ids.mask_id).double().cpu().numpy()
        start = 0
        for k in members:
            out[k] = terms[start:start + groups[k].size]
            start += groups[k].size
    return out


def with_behaviour_elbo(model: torch.nn.Module, groups: list[TrajectoryGroup], spec: TrainSpec, p: ElboPass,
                        ids: SpecialIds, device: torch.device | str) -> list[TrajectoryGroup]:
    """The groups with their behaviour_elbo (validated like any group: shape and finite terms) and
    their share of the seconds it took in timings["behaviour_elbo"]."""
    t0 = time.perf_counter()
    terms = behaviour_terms(model, groups, spec, p, ids, device)
    share = (time.perf_counter() - t0) / max(len(groups), 1)
    return [dataclasses.replace(g, behaviour_elbo=t, timings={**g.timings, "behaviour_elbo": share})
            for g, t in zip(groups, terms)]
