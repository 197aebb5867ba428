"""A task import path whose factory raises: what a run that fails inside an actor looks like.

`dlrl validate` finds the module (it resolves), so the run starts; the rollout worker calls the
factory in its `__init__` and dies there (tests/test_fail_fast.py).
"""

from __future__ import annotations

MESSAGE = "deliberate failure in the task factory (tests/failing_task.py)"


def exploding_task(**options):
    raise RuntimeError(MESSAGE)
