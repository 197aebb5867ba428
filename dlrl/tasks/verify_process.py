"""math_verify behind a process boundary, so a reward call has a hard deadline from any thread.

Why a child process: math_verify's own timeouts use `signal.alarm`, which only works on the main
thread (rewards run in worker threads of Ray actors), and even there a signal cannot interrupt
sympy while it sits in C: `\\boxed{9^{9^{9}}}` — 13 characters, so no length cap stops it — asks
for a 370-million-digit integer and never returns in useful time.  A child can always be killed.

`check_answer(gold, pred, timeout_s)` sends one JSON line to an idle child from a small pool,
waits with `select` until the deadline, and on timeout kills that child (the next call starts a
fresh one, ~0.5 s of imports).  Inside the child, math_verify runs on its main thread, so its own
signal timeouts stay on as a first, softer line for slow pure-Python paths.

Run as a script (the parent does that via `runpy`, so the child does not import `dlrl`), this
module is the child: one JSON request {"gold", "pred", "timeout"} per stdin line, one "1"/"0"
reply per stdout line.  Only the standard library is imported at module level.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time

STARTUP_TIMEOUT_S = 60.0
"""Generous: the first child imports sympy, which can take seconds on a loaded machine."""
CHILD_MEMORY_BYTES = 4 * 2**30
"""Address-space cap of a child, so a runaway big-integer computation fails with MemoryError."""


class _Child:
    """One child process and its pipes; not thread-safe (the pool lends it to one thread)."""

    def __init__(self) -> None:
        code = f"import runpy; runpy.run_path({__file__!r}, run_name='__main__')"
        env = dict(os.environ)  # the child must import what this process can (venv, Ray paths)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] +
                                            [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        if self._read_line(time.monotonic() + STARTUP_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError("math_verify child did not start")

    def _read_line(self, deadline: float) -> str:
        """One reply line, or TimeoutError once `deadline` passes (the caller kills us)."""
        fd = self.proc.stdout.fileno()
        buf = b""
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("math_verify child timed out")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("math_verify child exited")
            buf += chunk
        return buf.decode().strip()

    def ask(self, gold: str, pred: str, timeout_s: float) -> bool:
        request = json.dumps({"gold": gold, "pred": pred, "timeout": timeout_s}) + "\n"
        self.proc.stdin.write(request.encode())
        self.proc.stdin.flush()
        return self._read_line(time.monotonic() + timeout_s) == "1"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()


class VerifierPool:
    """At most `size` children, each used by one thread at a time; started lazily."""

    def __init__(self, size: int):
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue[_Child] = queue.LifoQueue()

    def check(self, gold: str, pred: str, timeout_s: float) -> bool:
        """Whether `pred` matches `gold` (LaTeX answers); raises TimeoutError past `timeout_s`."""
        with self._slots:
            try:
                child = self._idle.get_nowait()
            except queue.Empty:
                child = _Child()
            try:
                verdict = child.ask(gold, pred, timeout_s)
            except BaseException:
                child.kill()  # busy or dead: never hand it out again
                raise
            self._idle.put(child)
            return verdict

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def check_answer(gold: str, pred: str, timeout_s: float = 5.0) -> bool:
    """Whether the LaTeX answer `pred` equals `gold` per math_verify, decided within `timeout_s`
    (TimeoutError otherwise) whichever thread calls it."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = VerifierPool(size=max(1, min(4, os.cpu_count() or 1)))
            atexit.register(_POOL.close)
    return _POOL.check(gold, pred, timeout_s)


def _verdict(gold: str, pred: str, timeout_s: float) -> bool:
    from math_verify import parse, verify

    seconds = max(1, int(timeout_s))  # math_verify's alarms take whole seconds
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=seconds)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=seconds)
    return bool(gold_parsed and pred_parsed and
                verify(gold_parsed, pred_parsed, timeout_seconds=seconds))


def _serve() -> None:
    """The child's loop (see module docstring)."""
    import logging
    import resource

    logging.disable(logging.CRITICAL)  # math_verify logs every timeout; nobody reads our stderr
    try:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    except (ValueError, OSError):
        pass  # a lower hard limit is already in place
    import math_verify  # noqa: F401  (import before "ready": the first request has a deadline)

    print("ready", flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            ok = _verdict(request["gold"], request["pred"], float(request["timeout"]))
        except Exception:  # noqa: BLE001 - MemoryError included: any failure is a "no"
            ok = False
        print("1" if ok else "0", flush=True)


if __name__ == "__main__":
    _serve()
