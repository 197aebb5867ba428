"""Group ids name a rollout slot: `<run>/b<batch>-w<worker>-<k>`.

The id is the unit of exactly-once delivery (dlrl.trajectory.TrajectoryGroup) and it also says
which rollout batch a group belongs to, which is what lets the learner train step b on exactly
the groups of batch b however the workers' puts interleave. One place writes and parses it.
"""

from __future__ import annotations

import re

_ID = re.compile(r"^(?P<run>.+)/b(?P<batch>\d+)-w(?P<worker>\d+)-(?P<k>\d+)$")


def group_id(run_id: str, batch: int, worker: int, k: int) -> str:
    """The id of the k-th prompt of `worker`'s share of rollout batch `batch`."""
    return f"{run_id}/b{batch}-w{worker}-{k}"


def batch_of(gid: str) -> int:
    """The rollout batch a group id belongs to; ValueError for an id not made by `group_id`."""
    m = _ID.match(gid)
    if m is None:
        raise ValueError(f"group id {gid!r} is not <run>/b<batch>-w<worker>-<k>")
    return int(m["batch"])
