"""The sandbox's attack suite: each hostile program is contained (it does not pass) and the host is
unharmed (no file written, no connection made, no process signalled, nothing left running).

Runs against every isolating backend that works on this host (bwrap, and util-linux unshare as
the fallback); skips with the reason when none does.  Short limits keep it quick."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from dlrl import sandbox
from dlrl.sandbox import Limits, run_program

REPO = Path(__file__).resolve().parent.parent
BACKENDS = [b for b in sandbox.BACKENDS if sandbox.works(b)]
LIMITS = Limits(wall_s=4.0, cpu_s=3, max_output_bytes=64 << 10)
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no sandbox backend (bwrap / unshare) works "
                                "on this host; code rewards refuse to run here")


@pytest.fixture(params=BACKENDS)
def backend(request):
    before = _descendants()
    yield request.param
    deadline = time.monotonic() + 5
    while _descendants() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _descendants() - before, "a sandboxed process outlived its run"


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def run(source: str, backend: str, limits: Limits = LIMITS) -> sandbox.Result:
    return run_program(source, limits, backend)


def test_honest_program_passes_and_has_a_private_writable_cwd(backend):
    result = run("import os\nopen('f.txt', 'w').write('x' * 1000)\n"
                 "assert open('f.txt').read() == 'x' * 1000\nprint('cwd', os.getcwd())", backend)
    assert result.passed and result.status == "passed", result
    assert "cwd" in result.stdout


def test_failing_assert_fails(backend):
    result = run("assert 1 + 1 == 3", backend)
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.stderr


def test_infinite_loop_is_stopped(backend):
    start = time.monotonic()
    result = run("while True:\n    pass", backend)
    assert not result.passed and result.status in ("timeout", "failed")
    assert time.monotonic() - start < LIMITS.wall_s + 3


def test_sleeping_forever_hits_the_wall_clock(backend):
    result = run("import time\ntime.sleep(3600)", backend)
    assert not result.passed and result.status == "timeout"
    assert result.wall_s < LIMITS.wall_s + 3


def test_fork_bomb_is_contained(backend):
    start = time.monotonic()
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                 "        pass", backend)
    assert not result.passed
    assert time.monotonic() - start < LIMITS.wall_s + 5
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_memory_bomb_is_contained(backend):
    result = run("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))", backend)
    assert not result.passed
    assert "MemoryError" in result.stderr or result.returncode != 0


def test_a_gigabyte_of_stdout_is_cut_off(backend):
    result = run("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))",
                 backend)
    assert not result.passed and result.status == "output_limit"
    assert len(result.stdout) <= LIMITS.max_output_bytes


def test_stderr_flood_is_cut_off_too(backend):
    result = run("import os\nwhile True:\n    os.write(2, b'e' * 65536)", backend)
    assert not result.passed and result.status == "output_limit"
    assert len(result.stderr) <= LIMITS.max_output_bytes


def test_writing_outside_the_temp_dir_changes_nothing(backend):
    open_dir = tempfile.mkdtemp(prefix="dlrl-sbx-target-")  # world-writable, directly in /tmp
    os.chmod(open_dir, 0o777)
    targets = [os.path.join(open_dir, "escaped"), str(REPO / "tests" / "data" / "escaped"),
               os.path.expanduser("~/dlrl-escaped"), "/usr/lib/dlrl-escaped"]
    try:
        result = run(f"targets = {targets!r}\nwritten = []\nfor t in targets:\n    try:\n"
                     "        open(t, 'w').write('pwned')\n        written.append(t)\n"
                     "    except OSError:\n        pass\nassert written == targets, written",
                     backend)
        assert not result.passed
        assert [t for t in targets if os.path.exists(t)] == []
    finally:
        for t in targets[:1]:
            if os.path.exists(t):
                os.unlink(t)
        os.rmdir(open_dir)


def test_environment_secrets_are_not_visible(backend, monkeypatch):
    secret = "fake-secret-9f8e7d6c5b4a"
    monkeypatch.setenv("DLRL_FAKE_SECRET", secret)
    monkeypatch.setenv("REDIS_PASSWORD", secret)
    source = f"""
import os
found = [k for k, v in os.environ.items() if {secret!r} in v]
for pid in ["self", "1", str(os.getppid()), {str(os.getpid())!r}]:
    try:
        data = open(f"/proc/{{pid}}/environ", "rb").read()
    except OSError:
        continue
    if {secret!r}.encode() in data:
        found.append(pid)
print("env", sorted(os.environ))
print("found", found)
"""
    result = run(source, backend)
    assert result.passed, result  # it ran to the end and looked everywhere ...
    assert "found []" in result.stdout  # ... and found nothing
    assert "DLRL_FAKE_SECRET" not in result.stdout and "REDIS" not in result.stdout


def test_no_connection_to_a_loopback_listener(backend):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(LIMITS.wall_s + 1)
    port = listener.getsockname()[1]
    accepted: list = []

    def accept():
        try:
            accepted.append(listener.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        result = run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), "
                     "timeout=2)\ns.sendall(b'hello')", backend)
        thread.join()
        assert not result.passed
        assert accepted == [], "the sandboxed program reached the host's listener"
    finally:
        listener.close()
        thread.join()


def test_killing_the_parent_and_other_processes_fails(backend):
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        source = f"""
import os, signal
hits = []
for pid in (os.getppid(), {os.getpid()}, {decoy.pid}, -1):
    try:
        os.kill(pid, signal.SIGKILL)
        hits.append(pid)
    except OSError:
        pass
assert {os.getpid()} in hits and {decoy.pid} in hits, hits
"""
        result = run(source, backend)
        assert not result.passed
        time.sleep(0.2)
        assert decoy.poll() is None, "the sandbox killed a host process"
    finally:
        decoy.kill()
        decoy.wait()


def test_a_detached_child_does_not_outlive_the_run(backend):
    # The fixture asserts no descendant of this process is left once the run returns.
    result = run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n",
                 backend)
    assert result.passed  # the parent returned normally; its orphan is killed with the sandbox


@pytest.mark.parametrize("source", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit",
    "print('passed')\nprint('<pass>')\nimport os\nos._exit(0)",
    "import atexit, os\natexit.register(lambda: os._exit(0))\nraise ValueError",
    "import os\nos.close(1)\nos.close(2)",
    "import os, sys\nprint(open('/proc/self/cmdline').read())\nprint(sys.stdin.read())\nos._exit(0)",
    "import __main__, os\nfor v in vars(__main__).values():\n    print(v)\nos._exit(0)",
], ids=["sys.exit", "os._exit", "SystemExit", "print-marker", "atexit", "close-stdout",
        "read-stdin-and-cmdline", "print-harness-globals"])
def test_faking_success_fails(backend, source):
    if source.startswith("import os\nos.close"):
        source += "\nraise SystemExit(0)"  # closes the pipes, then leaves early
    result = run(source, backend)
    assert not result.passed


def test_no_user_namespace_inside_the_sandbox(backend):
    # With one, an unprivileged program could mount a tmpfs of its own that no cap counts.
    source = """
import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
assert libc.unshare(0x10000000) == -1 and ctypes.get_errno() == 1  # CLONE_NEWUSER: EPERM
made = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                       "mount -t tmpfs -o size=1g tmpfs /tmp && echo mounted"],
                      capture_output=True, text=True)
assert made.returncode != 0 and "mounted" not in made.stdout, made
t = threading.Thread(target=print, args=("threads still start",))  # clone3 falls back to clone
t.start()
t.join()
"""
    result = run(source, backend)
    assert result.passed, result
    assert "threads still start" in result.stdout


def test_host_run_folder_is_not_visible(backend):
    # Host daemons' unix sockets live there; a socket path reaches across network namespaces.
    result = run("import os\nassert not os.path.isdir('/run') or os.listdir('/run') == []",
                 backend)
    assert result.passed, result


MEMORY = Limits(wall_s=8.0, cpu_s=6, memory_bytes=256 << 20, max_output_bytes=64 << 10)


def _forks(children: int, mib: int) -> str:
    """A program whose `children` processes each hold `mib` MiB (written, so resident) at once."""
    return f"""
import os, time
pids = []
for _ in range({children}):
    pid = os.fork()
    if pid == 0:
        block = b"x" * ({mib} << 20)
        time.sleep(1.5)
        os._exit(0)
    pids.append(pid)
assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids), "a child was killed"
"""


@pytest.mark.skipif(sandbox.memory_cgroup() is None,
                    reason="no memory cgroup can be made here (cgroup v2 with the memory "
                           "controller delegated, or a writable v1 memory hierarchy): memory is "
                           "capped per process only")
def test_one_memory_cap_for_all_processes_of_a_run(backend):
    # 6 x 100 MiB: each child is under the 256 MiB per-process limit, together far over it.
    result = run(_forks(6, 100), backend, MEMORY)
    assert not result.passed and result.status == "memory_limit", result
    assert run(_forks(2, 40), backend, MEMORY).passed  # the same program within the cap


def test_the_run_dies_with_its_caller(backend, tmp_path):
    # SIGKILL the process that called run_program: nothing of the run may live on.
    half = f"{os.getpid()}-{backend}"
    marker = "dlrl-orphan-" + half  # the caller's command line holds it only in two pieces
    program = f"import subprocess\nsubprocess.run(['sh', '-c', 'sleep 60; : ' + 'dlrl-orphan-' + {half!r}])"
    caller = subprocess.Popen(
        [sys.executable, "-c", (f"from dlrl import sandbox\nsandbox.run_program({program!r}, "
                                f"sandbox.Limits(wall_s=60, cpu_s=60), {backend!r})")],
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 30
        while not _with_marker(marker):
            assert time.monotonic() < deadline, "the sandboxed program never started"
            time.sleep(0.1)
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 5
    while _with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _with_marker(marker), "the sandboxed program outlived its killed caller"


def _with_marker(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def test_refuses_without_isolation_unless_the_operator_opts_in(tmp_path):
    code = ("from dlrl import sandbox\n"
            "try:\n    sandbox.run_program('pass')\nexcept sandbox.SandboxUnavailable as e:\n"
            "    print('refused', e)\nelse:\n    print('ran')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), sandbox.BACKEND_ENV: "none"}
    env.pop(sandbox.UNISOLATED_ENV, None)
    refused = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.stdout.startswith("refused") and sandbox.UNISOLATED_ENV in refused.stdout
    env[sandbox.UNISOLATED_ENV] = "1"
    opted_in = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60)
    assert opted_in.stdout.strip() == "ran", opted_in.stderr
    assert "WITHOUT isolation" in opted_in.stderr


def test_unknown_backend_name_is_an_error(monkeypatch):
    monkeypatch.setenv(sandbox.BACKEND_ENV, "docker")
    sandbox.backend.cache_clear()
    try:
        with pytest.raises(ValueError, match="DLRL_SANDBOX_BACKEND"):
            sandbox.backend()
    finally:
        sandbox.backend.cache_clear()
