"""SIGTERM ends a run as Ctrl-C does.

`kill PID`, `docker stop`, coreutils `timeout` (the API's wall-clock limit) and `ray job stop` (the
API's stop, which signals the entrypoint's whole process group) send SIGTERM. Python's default
would end the driver on the spot and leave its actors, placement group and queue in the cluster;
Ray's own handler (installed by `ray.init`) exits without a word. `stop_on_sigterm` instead raises
SystemExit(143) in the main thread wherever it is, so the run unwinds through the same `finally`
as a KeyboardInterrupt (the calls still running are cancelled, the actors ended, the queue
deleted, the run folder released), and `dlrl train` then prints the checkpoint's step and the
resume command, exiting 143 (128 + SIGTERM) where Ctrl-C exits 130.

The exception alone cannot say it came from SIGTERM: raised inside `ray.get` / `ray.wait`, Ray
turns a SystemExit into its own SystemExit(1). So the handler also records the signal, and the CLI
asks `received()`. The module imports nothing heavy: the CLI asks without importing Ray.
"""

from __future__ import annotations

import signal
import threading

_received = False


def _exit(signum: int, frame: object) -> None:
    global _received
    _received = True
    raise SystemExit(128 + signum)


def stop_on_sigterm() -> None:
    """Install the handler (main thread only: Python delivers signals there). Call it after
    `ray.init`, which installs its own."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit)


def received() -> bool:
    """Whether this process got SIGTERM since `stop_on_sigterm`."""
    return _received
