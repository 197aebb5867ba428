"""A failed run, said once: its root cause as one line, the whole traceback in a file.

An error raised in an actor reaches the driver wrapped by Ray (a `RayTaskError` holding the
actor's exception as `.cause`; an `ActorDiedError` whose message embeds the traceback of an
exception raised in the actor's `__init__`), and the driver may wrap it once more (`RolloutFailed`,
`LearnerDied`). Printed as Python prints it, that is 60-250 lines in which the one sentence that
matters appears several times. `root_cause` peels Ray's layers, and the driver's own wrappers of a
Ray error, down to the exception the actor raised; `write_traceback` keeps everything for the
person who needs it.
"""

from __future__ import annotations

import traceback
from pathlib import Path

ERROR_LOG = "error.log"
"""The run's failure record: <run>/error.log, the full traceback of the error that ended it."""


def root_cause(exc: BaseException) -> BaseException | str:
    """The innermost error under Ray's wrappers: the exception an actor raised (`RayTaskError.cause`),
    or, for an actor whose `__init__` raised, the last line of the traceback Ray put in the message
    (the exception itself is not kept there). An exception the driver raised about a Ray error
    (its `__cause__`) is peeled too; any other exception is its own root cause."""
    from ray.exceptions import RayActorError, RayError, RayTaskError

    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RayTaskError):
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException) and cause is not exc:
                exc = cause
                continue
            return _last_error_line(str(exc)) or exc
        if isinstance(exc, RayActorError):
            if exc.actor_init_failed:
                return _last_error_line(str(exc)) or exc
            return exc
        inner = getattr(exc, "error", None)  # LearnerDied keeps Ray's error as .error
        if isinstance(inner, RayError):
            exc = inner
            continue
        if isinstance(exc.__cause__, RayError):
            exc = exc.__cause__
            continue
        break
    return exc


def _last_error_line(text: str) -> str | None:
    """The final "Type: message" line of a formatted traceback (where Python names the error)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if ":" in line and head.replace(".", "").replace("_", "").isalnum() and not line.startswith("File "):
            return line
    return lines[-1] if lines else None


def one_line(exc: BaseException) -> str:
    """The root cause of `exc` as one line: "ErrorType: its message" (a message of several lines
    keeps its first, e.g. a Ray error's summary)."""
    cause = root_cause(exc)
    if isinstance(cause, str):
        return cause
    message = str(cause).strip()
    first = message.splitlines()[0] if message else ""
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


def write_traceback(exc: BaseException, run_dir: Path) -> Path | None:
    """Write the full traceback of `exc` (its chain included) to <run>/error.log; None if the run
    directory cannot be written (the caller still prints the root cause)."""
    path = run_dir / ERROR_LOG
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path
