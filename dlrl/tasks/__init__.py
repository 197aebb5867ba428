"""Verifiable tasks (Sudoku 4×4, Countdown, GSM8K / MATH-500 / local math files), looked up by name.

    from dlrl.tasks import get_task
    task = get_task("sudoku", max_blanks=8)
    ex = task.examples("test", n=4, seed=0)[0]
    task.prompt(ex, "compact"), task.target(ex, "compact"), task.reward("1234\\n...", ex)

A name outside `TASKS` may be an import path "package.module:factory"; the factory is called
with the options and must return a `Task` (or an object with the same methods). Importing a named
module runs its code, so import paths are opt-in: `allow_import_paths=True`, or the environment
variable `DLRL_TASK_IMPORT_PATHS` ("*": any; else a comma-separated list of the allowed import
paths). `dlrl train` with a spec file sets "*" (its user is the operator); a job started by the job
API gets only the import paths the operator listed (none by default), so a request body naming
`os:system` fails here even if it got past the API's admission policy.
"""

from __future__ import annotations

import importlib
import os
from functools import partial
from collections.abc import Callable

from dlrl.tasks.code import code_task
from dlrl.tasks.countdown import countdown_task
from dlrl.tasks.math_task import math_task
from dlrl.tasks.sudoku import sudoku_task
from dlrl.tasks.task import Example, Task

TASKS: dict[str, Callable[..., Task]] = {
    "sudoku": sudoku_task,
    "countdown": countdown_task,
    "gsm8k": partial(math_task, dataset="gsm8k"),
    "math500": partial(math_task, dataset="math500"),
    "math": math_task,  # needs path=... (or dataset=...)
    "humaneval": partial(code_task, dataset="humaneval"),
    "mbpp": partial(code_task, dataset="mbpp"),
    "mbpp_sanitized": partial(code_task, dataset="mbpp_sanitized"),
}
"""Name → factory; the factory's keyword arguments are the task's options."""


IMPORT_PATHS_ENV = "DLRL_TASK_IMPORT_PATHS"


class ImportPathRefused(ValueError):
    """A task import path was named where import paths are not allowed."""


def import_path_allowed(name: str, allow_import_paths: bool | None = None) -> bool:
    """Whether the import path `name` may be imported: `allow_import_paths` if given, else
    $DLRL_TASK_IMPORT_PATHS ("*" allows all; otherwise the exact names listed, comma-separated)."""
    if allow_import_paths is not None:
        return allow_import_paths
    allowed = {p.strip() for p in os.environ.get(IMPORT_PATHS_ENV, "").split(",") if p.strip()}
    return "*" in allowed or name in allowed


def get_task(name: str, *, allow_import_paths: bool | None = None, **options) -> Task:
    """The task registered as `name`, or built by the factory at import path "pkg.mod:factory"
    when import paths are allowed (see `import_path_allowed`)."""
    if name in TASKS:
        return TASKS[name](**options)
    if ":" not in name:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                         "(or an import path 'package.module:factory')")
    if not import_path_allowed(name, allow_import_paths):
        raise ImportPathRefused(f"task import path {name!r} is not allowed here (known tasks: "
                                f"{', '.join(sorted(TASKS))}); the operator enables import paths with "
                                f"{IMPORT_PATHS_ENV}=* or a list of them")
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load task factory {name!r}: {e}") from e
    task = factory(**options)
    if not all(callable(getattr(task, m, None)) for m in ("examples", "prompt", "reward")):
        raise TypeError(f"factory {name!r} returned {type(task).__name__}, not a Task")
    return task


__all__ = ["Example", "Task", "TASKS", "IMPORT_PATHS_ENV", "ImportPathRefused", "get_task", "import_path_allowed",
           "countdown_task", "math_task", "sudoku_task"]
