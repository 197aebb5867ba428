"""Run model-written Python in contained child processes, and judge from outside it whether its
tests passed.

Code rewards (HumanEval, MBPP) execute whatever the policy wrote.  `run_tests(program, tests)`
starts two interpreters, the candidate's (the model's program) and the judge's (the reference
solution and the tests, with the candidate's functions bound to proxies over a pipe; see
dlrl/judge.py), each

- inside **bubblewrap** (`bwrap`, the sandbox Flatpak uses) with new network, PID, IPC and UTS
  namespaces: no network beyond the namespace's own loopback (the host's 127.0.0.1 services,
  Redis and Ray among them, are unreachable), no view of host processes or of the other side (so
  `os.kill` of the parent, of a worker or of the judge cannot reach them), and a filesystem of
  read-only /usr, the interpreter (read-only at /python), a fresh /proc and /dev, and a
  size-capped tmpfs of its own as the working directory (/sandbox; /tmp points there).  Nothing
  of the host's /etc, /root, /home, /run, /work, Ray or Redis files is mounted;
- as a fresh random unprivileged uid per side when the caller is root (`setpriv`, with
  no_new_privs and an empty capability bounding set), so even a mount mistake could not hand
  root to the program, and the two sides cannot signal or trace each other in any mode;
- unable to create user namespaces (a seccomp filter the interpreter installs before any model
  code runs; a backend whose probe can still make one is not used): with none, the unprivileged
  program has no capability to mount a tmpfs of its own outside the caps below;
- under rlimits set by `prlimit` on the interpreter: CPU seconds, address space, processes
  (a fork bomb hits the process cap), open files, file size, no core dumps;
- in **one memory cgroup for the whole run** where this host lets us make one
  (`memory_cgroup()`: cgroup v2 with the memory controller delegated, or v1's memory hierarchy
  writable; `DLRL_SANDBOX_CGROUP` names a delegated one): both sides, everything they fork and
  the tmpfs pages they write count against the same `memory_bytes`, and past it the kernel kills
  the run (status "memory_limit").  cgroup v2 forbids processes in a cgroup whose children get
  controllers, so this process's own cgroup serves only where it is the root or already
  delegated; otherwise the operator delegates one (systemd `Delegate=yes`, a pod's subtree) and
  names an empty child of it with memory in its subtree_control.  Where none can be made, a
  warning is logged once and memory is capped per process only (a run may then hold up to
  memory_bytes x max_procs);
- with a wall-clock deadline: on expiry both process groups are SIGKILLed, and since each side
  runs in its own PID namespace under `--die-with-parent`, so is anything it spawned;
- with a scrubbed environment (`PATH`, `LANG`, `HOME` only: no Redis password, Ray token or
  other secret of the worker's environment) and the interpreter in isolated mode (`-I`);
- with stdout + stderr capped: a run that writes more than `max_output_bytes` is killed.

**Judging a pass.**  The verdict is reached in the judge's interpreter, which never runs model
code: the tests' asserts execute there, on values that cross from the candidate as JSON of plain
data (None, bool, int, float, str, bytes, complex, list, tuple, dict, set, frozenset), rebuilt
with exactly those types, so comparisons run the builtin types' own code.  Anything else the
candidate returns stays in its process; the judge holds a bare reference, equal only to itself.
The judge writes a per-run random nonce to its own stdout only after every test returned, and
the parent counts a pass only if the judge exited 0 with stdout ending in that nonce (the nonce
is kept, but nothing relies on it: the candidate never sees it, nor the judge's stdout).
So every trick that works by changing the interpreter the tests run in — replacing the exit or
exception printing of a harness, `sys.settrace` jumping over asserts, `atexit`, `sys.exit(0)` /
`os._exit(0)` before the asserts, patching builtins (`abs`, `AssertionError`, `print`), an
answer whose `__eq__` is always true — changes only the candidate's own interpreter, and scores
0 (tests/test_reward_attacks.py runs each through the real `task.reward`).

What remains, and why it cannot reach a reward: the candidate controls its own process, so it
can answer each call with any plain value it likes, write anything on its reply pipe, or keep
state between calls — all of which is just "returning values", which the tests judge.  It can
return a correct value only by computing it: the tests' expected values live in the judge,
never in its process (MBPP's prompt does show its three asserts, so a completion may hard-code
those answers; that is the benchmark's weakness, not the harness's).  It can hang, crash or
flood output, which fails.  `run_program(source)` (no tests) reports whether the program ran to
its end as the program's own process says so; that is forgeable and serves containment tests
only, never a reward.

**Fallbacks.**  If bwrap is missing or cannot create namespaces (e.g. a container whose seccomp
profile blocks them), `unshare` from util-linux is tried: network, PID, IPC, UTS and mount
namespaces, fresh size-capped tmpfs mounts over /tmp, /var/tmp, /dev/shm and /run (the cwd is the
new /tmp), the same uid drop and caps, `--kill-child` plus a parent-death signal on unshare
and again after the uid drop (which clears it), so the run dies with its caller — but the rest
of the host filesystem stays visible, so world-readable files can be read and world-writable ones
outside those four written.  If neither works, `require()` / `run_tests` raise
`SandboxUnavailable` unless the operator sets `DLRL_SANDBOX_UNISOLATED=1`, which runs the
program with rlimits, uid drop (when root), the user-namespace filter, scrubbed environment,
output cap and timeouts but WITH network access and the host filesystem, in a private host
temporary directory (when root, every process of the run's fresh uids is killed afterwards, so
a `setsid()` child does not linger) — only for machines that hold nothing worth protecting (and
when not root, the two sides share a uid there, so the candidate could trace the judge).

Not contained in any mode: CPU cache / timing side channels, kernel exploits, and disk or memory
pressure up to the caps (tmpfs size; memory_bytes per run with a cgroup, per process without).
A legitimate program that prints more than the output cap fails.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

UNISOLATED_ENV = "DLRL_SANDBOX_UNISOLATED"
"""Set to "1" to run code rewards without namespaces when neither bwrap nor unshare works."""
BACKEND_ENV = "DLRL_SANDBOX_BACKEND"
"""Optional: "bwrap", "unshare" or "none" to use that backend instead of the best one found
("none" still needs DLRL_SANDBOX_UNISOLATED=1)."""
SANDBOX_DIR = "/sandbox"
"""Working directory of the program inside bwrap (a size-capped tmpfs)."""
PYTHON_MOUNT = "/python"
"""Where bwrap mounts this interpreter's installation (read-only)."""
MAX_SOURCE_BYTES = 1 << 20

JUDGE_SOURCE = (Path(__file__).resolve().parent / "judge.py").read_text()
"""Both sides of a run (dlrl/judge.py), passed to each interpreter with -c."""
PROBE = ("\ndeny_user_namespaces()\nimport ctypes\n"
         "print('ok' if ctypes.CDLL(None).unshare(0x10000000) != 0 else 'made a user namespace')\n")
"""A backend's probe: it runs, and the program in it cannot create a user namespace."""
CGROUP_ENV = "DLRL_SANDBOX_CGROUP"
"""Optional: a cgroup directory (v2 with the memory controller in its subtree_control, or in
v1's memory hierarchy) that this process may create children in; each run gets one, capped at
the run's memory limit.  Unset: this process's own memory cgroup, where that works."""


class SandboxUnavailable(RuntimeError):
    """No working isolation mechanism here and the operator did not opt in to running unisolated."""


@dataclass(frozen=True)
class Limits:
    """Resource caps of one run. Defaults fit HumanEval / MBPP tests with a wide margin."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    """Address space (RLIMIT_AS) of each process."""
    max_procs: int = 32
    max_open_files: int = 64
    max_file_bytes: int = 16 << 20
    tmpfs_bytes: int = 64 << 20
    """Size of the working directory under bwrap (all files together)."""
    max_output_bytes: int = 1 << 20
    """stdout + stderr; more than this and the program is killed (and fails)."""

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if not (isinstance(v, (int, float))
                                                            and 0 < v < float("inf"))}
        if bad:
            raise ValueError(f"sandbox limits must be finite and positive, got {bad}")


@dataclass(frozen=True)
class Result:
    passed: bool
    status: str
    """"passed", "failed" (nonzero exit or no nonce), "timeout" or "output_limit"."""
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float


BACKENDS = ("bwrap", "unshare")
"""Isolating backends, best first; "none" (opt-in only) runs without namespaces."""
TOOLS = {"bwrap": ("bwrap", "prlimit", "setpriv"), "unshare": ("unshare", "prlimit", "setpriv"),
         "none": ("prlimit", "setpriv")}
"""Programs each backend needs (all from util-linux but bwrap; setpriv only when root, but
always for unshare, which gets a parent-death signal from it)."""


@functools.lru_cache(maxsize=1)
def backend() -> str:
    """The best isolation this host supports: "bwrap", "unshare" or "none" (probed once), or
    the one `DLRL_SANDBOX_BACKEND` names."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in (*BACKENDS, "none"):
            raise ValueError(f"{BACKEND_ENV}={forced!r}; expected one of {(*BACKENDS, 'none')}")
        return forced
    for name in BACKENDS:
        if works(name):
            return name
    return "none"


@functools.cache
def works(name: str) -> bool:
    """True if backend `name` has its tools and runs a program here that cannot create a user
    namespace (probed once per process)."""
    missing = [tool for tool in TOOLS[name] if _tool(tool) is None
               and not (tool == "setpriv" and os.getuid() != 0 and name != "unshare")]
    if missing:
        logger.info("sandbox backend %s unavailable: %s not installed", name, ", ".join(missing))
        return False
    try:
        with tempfile.TemporaryDirectory(prefix="dlrl-sbx-probe-") as tmp:
            uid = _run_uid()
            if uid is not None:
                os.chown(tmp, uid, uid)
            cmd = _command(name, Limits(), uid) + ["-c", JUDGE_SOURCE + PROBE]
            done = subprocess.run(cmd, check=False, cwd=tmp, env=_clean_env(), capture_output=True,
                                  timeout=30)
    except (OSError, subprocess.SubprocessError):
        logger.warning("sandbox backend %s failed its probe", name, exc_info=True)
        return False
    if done.returncode != 0 or done.stdout.strip() != b"ok":  # 97: no seccomp filter here
        logger.warning("sandbox backend %s cannot run here (exit %s): %s", name,
                       done.returncode, done.stderr.decode(errors="replace")[-300:])
        return False
    return True


def host_memory_mb() -> int:
    """This host's physical memory in MiB: the most one run's cap can mean."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


def _run_uid() -> int | None:
    """A fresh unprivileged uid for one run when we are root (none in use: processes of distinct
    runs cannot signal each other, and RLIMIT_NPROC counts one run's processes only)."""
    return 2_000_000 + secrets.randbelow(1_000_000) if os.getuid() == 0 else None


def _tool(name: str) -> str | None:
    return shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")


def require(name: str | None = None) -> str:
    """The backend to use (`name`, or the best available), or `SandboxUnavailable` if there is
    no isolation here and the operator did not opt in to unisolated runs.  Code tasks call it
    when they are built, so such a host fails loudly instead of scoring every completion 0."""
    chosen = name or backend()
    if chosen != "none":
        if not works(chosen):
            raise SandboxUnavailable(f"sandbox backend {chosen!r} does not work on this host")
        _warn_without_memory_cgroup()
        return chosen
    if os.environ.get(UNISOLATED_ENV) != "1":
        raise SandboxUnavailable(
            "no sandbox: neither bwrap nor unshare can create a network namespace on this host "
            "(install bubblewrap, or allow user namespaces); refusing to run model-written code. "
            f"Set {UNISOLATED_ENV}=1 to run it without isolation at your own risk.")
    if _tool("prlimit") is None:
        raise SandboxUnavailable("prlimit (util-linux) is needed even for unisolated runs")
    if not works("none"):
        raise SandboxUnavailable("cannot forbid user namespaces to the program here (seccomp)")
    _warn_unisolated()
    return "none"


@functools.lru_cache(maxsize=1)
def _warn_without_memory_cgroup() -> None:
    if memory_cgroup() is None:
        limits = Limits()
        logger.warning(
            "sandbox: no memory cgroup to join here (cgroup v2 with the memory controller "
            "delegated, or v1's memory hierarchy writable; or set %s): memory is capped per "
            "process only, so one run may hold up to memory x max_procs (%d GiB at the "
            "defaults)", CGROUP_ENV, limits.memory_bytes * limits.max_procs >> 30)


@functools.lru_cache(maxsize=1)
def _warn_unisolated() -> None:
    logger.warning("sandbox: running model-written code WITHOUT isolation (%s=1): it has the "
                   "network and the host filesystem", UNISOLATED_ENV)


def _clean_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": SANDBOX_DIR,
            "PYTHONDONTWRITEBYTECODE": "1"}


def _python_inside(name: str) -> str:
    """The interpreter path as the sandbox sees it.  bwrap mounts this process's installation at
    /python; the other modes need one the dropped uid can reach (a pyenv build under a 0700
    /root is not), so they fall back to the system /usr/bin/python3."""
    exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if name == "bwrap":
        return os.path.join(PYTHON_MOUNT,
                            os.path.relpath(exe, os.path.realpath(sys.base_prefix)))
    if os.getuid() != 0 or _reachable_by_others(exe):
        return exe
    return os.path.realpath("/usr/bin/python3")


def _reachable_by_others(path: str) -> bool:
    """True if a uid with no rights but "other" can execute `path` (every parent searchable)."""
    parts = path.split(os.sep)
    dirs = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
    try:
        return (all(os.stat(d).st_mode & 0o001 for d in dirs)
                and bool(os.stat(path).st_mode & 0o001))
    except OSError:
        return False


def _uid_drop(uid: int | None) -> list[str]:
    if uid is None:
        return []
    # A uid change clears the parent-death signal (unshare's --kill-child sets one): set it again.
    return [_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--pdeathsig", "KILL", "--"]


def _prlimit(limits: Limits, uid: int | None) -> list[str]:
    nproc = limits.max_procs
    if uid is None and os.getuid() != 0:  # our own uid: RLIMIT_NPROC counts our other processes
        nproc += _count_processes(os.getuid())
    return [_tool("prlimit"), f"--cpu={limits.cpu_s}", f"--as={limits.memory_bytes}",
            f"--nproc={nproc}", f"--nofile={limits.max_open_files}",
            f"--fsize={limits.max_file_bytes}", "--core=0", "--"]


def _processes_of(uid: int) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def _count_processes(uid: int) -> int:
    return len(_processes_of(uid))


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (a run's own fresh uid, so nothing else is hit)."""
    for pid in _processes_of(uid):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


@functools.lru_cache(maxsize=1)
def memory_cgroup() -> str | None:
    """The cgroup directory each run gets its own memory cgroup under (`DLRL_SANDBOX_CGROUP`, or
    this process's own memory cgroup), or None where none can be made here (probed once)."""
    forced = os.environ.get(CGROUP_ENV)
    for path in [forced] if forced else _own_memory_cgroups():
        if os.path.exists(os.path.join(path, "cgroup.controllers")):  # v2: children need it
            try:
                with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory")
            except OSError:
                pass  # not ours to change, or this cgroup holds processes itself
        try:
            RunCgroup.make(path, 64 << 20).remove()
        except OSError as e:
            logger.info("sandbox: no memory cgroup under %s: %s", path, e)
            continue
        return path
    return None


def _own_memory_cgroups() -> list[str]:
    """This process's cgroup in the v2 hierarchy and in v1's memory hierarchy, where mounted."""
    v2 = v1 = None
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mount, fstype, options = line.split()[:4]
            if fstype == "cgroup2":
                v2 = v2 or mount
            elif fstype == "cgroup" and "memory" in options.split(","):
                v1 = v1 or mount
    found = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0" and v2:
                found.append(v2 + path.rstrip("/"))
            elif "memory" in controllers.split(",") and v1:
                found.append(v1 + path.rstrip("/"))
    return found


@dataclass(frozen=True)
class RunCgroup:
    """One run's memory cgroup: every process of the run (both sides, all they fork, and the
    tmpfs pages they write) is charged to it, so together they stay under one limit; past it
    the kernel's OOM killer ends a process of the run, and nothing outside it."""

    path: str

    @classmethod
    def create(cls, limit_bytes: int) -> RunCgroup | None:
        parent = memory_cgroup()
        return cls.make(parent, limit_bytes) if parent else None

    @classmethod
    def make(cls, parent: str, limit_bytes: int) -> RunCgroup:
        path = os.path.join(parent, f"dlrl-run-{secrets.token_hex(8)}")
        os.mkdir(path)
        cgroup = cls(path)
        try:
            if os.path.exists(os.path.join(path, "memory.max")):  # v2
                cgroup._write("memory.max", limit_bytes)
                cgroup._write("memory.swap.max", 0, optional=True)
                cgroup._write("memory.oom.group", 1, optional=True)  # the whole run at once
            else:  # v1: the memory+swap limit must not be below the memory limit
                cgroup._write("memory.limit_in_bytes", limit_bytes)
                cgroup._write("memory.memsw.limit_in_bytes", limit_bytes, optional=True)
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(str(value))
        except OSError:
            if not optional:
                raise

    def enter(self) -> list[str]:
        """argv prefix that moves the command into this cgroup before it execs (its children,
        the sandbox's processes, start inside)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
                os.path.join(self.path, "cgroup.procs")]

    def oom_killed(self) -> bool:
        for name in ("memory.events", "memory.oom_control"):  # v2, v1
            try:
                with open(os.path.join(self.path, name)) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill" and int(value) > 0:
                            return True
            except (OSError, ValueError):
                pass
        return False

    def remove(self) -> None:
        """Kill whatever is left in it and delete it (a cgroup with processes cannot be)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                with open(os.path.join(self.path, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                return
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            try:
                os.rmdir(self.path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    logger.warning("sandbox: could not remove cgroup %s", self.path)
                    return
                time.sleep(0.01)


def _command(name: str, limits: Limits, uid: int | None) -> list[str]:
    """argv up to (and including) the interpreter; the caller appends its arguments."""
    inner = _uid_drop(uid) + _prlimit(limits, uid) + [_python_inside(name), "-I"]
    if name == "bwrap":
        prefix = os.path.realpath(sys.base_prefix)
        mounts = ["--ro-bind", "/usr", "/usr"]
        for link in ("bin", "lib", "lib64", "sbin"):
            if os.path.islink(f"/{link}"):
                mounts += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
            elif os.path.isdir(f"/{link}"):
                mounts += ["--ro-bind", f"/{link}", f"/{link}"]
        return [_tool("bwrap"), "--unshare-net", "--unshare-pid", "--unshare-ipc",
                "--unshare-uts", "--die-with-parent", "--new-session", *mounts,
                "--ro-bind", prefix, PYTHON_MOUNT, "--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--size", str(limits.tmpfs_bytes), "--tmpfs", SANDBOX_DIR,
                "--symlink", SANDBOX_DIR, "/tmp", "--chdir", SANDBOX_DIR, "--", *inner]
    if name == "unshare":
        # Fresh size-capped tmpfs over the world-writable places, and cwd there; the rest of the
        # host filesystem stays visible (protected only by the dropped uid's permissions).
        # /run too: its unix sockets (e.g. a host daemon's) are reachable by path across network
        # namespaces.  --kill-child ends the namespace's init (so everything in it) when unshare
        # dies, and setpriv's parent-death signal kills unshare when its caller dies.
        mount = (f"for d in /tmp /var/tmp /dev/shm /run; do if [ -d $d ]; then mount -t tmpfs "
                 f"-o size={limits.tmpfs_bytes},mode=1777,nosuid,nodev tmpfs $d || exit 97; fi; "
                 'done; cd /tmp && exec "$@"')
        user = [] if os.getuid() == 0 else ["--user", "--map-root-user"]
        return [_tool("setpriv"), "--pdeathsig", "KILL", "--", _tool("unshare"), *user,
                "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
                "--mount-proc", "--", "/bin/sh", "-c", mount, "sh", *inner]
    return inner


def run_program(source: str, limits: Limits = Limits(), backend_name: str | None = None) -> Result:
    """Run `source` (a whole Python program) contained, with no tests.

    passed is True if the program ran to its end without an exception or exit, as its own
    process reports it: a program can fake that, so rewards use `run_tests`, whose verdict comes
    from a process the program never ran in.  This serves tests of the containment itself."""
    return run_tests(source, "", limits=limits, backend_name=backend_name)


def run_tests(program: str, tests: str, names: tuple[str, ...] = (), reference: str = "",
              limits: Limits = Limits(), backend_name: str | None = None) -> Result:
    """Run `program` (the model's code) contained, and `tests` against it in a second contained
    interpreter, the judge (dlrl/judge.py), after `reference` (trusted: the prompt's helpers and
    imports), with each of `names` bound to the program's object of that name (absent if the
    program has none).  passed is True only if the judge ran every test to its end.

    Raises SandboxUnavailable when there is no isolation and `DLRL_SANDBOX_UNISOLATED=1` is not
    set; never raises for anything the program does.  `backend_name` forces a backend."""
    name = require(backend_name)
    data = program.encode("utf-8", "replace")
    if len(data) > MAX_SOURCE_BYTES:
        return Result(False, "failed", None, "", "program too long", 0.0)
    nonce = secrets.token_hex(16).encode()
    plan = json.dumps({"names": list(names), "reference": reference, "tests": tests})
    stdin = {"candidate": json.dumps(list(names)).encode() + b"\n" + data,
             "judge": nonce + b"\n" + plan.encode("utf-8", "replace")}
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    open_fds = [requests_r, requests_w, replies_r, replies_w]
    fds = {"candidate": (requests_r, replies_w), "judge": (requests_w, replies_r)}
    entry = {"candidate": "serve", "judge": "judge"}
    uids = {side: _run_uid() for side in stdin}  # distinct: neither can signal the other
    procs: dict[str, subprocess.Popen] = {}
    with contextlib.ExitStack() as stack:
        cgroup = RunCgroup.create(limits.memory_bytes)
        try:
            for side in stdin:
                cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="dlrl-sbx-"))
                if uids[side] is not None:
                    os.chown(cwd, uids[side], uids[side])
                code = f"{JUDGE_SOURCE}\n{entry[side]}{fds[side]}\n"
                cmd = (cgroup.enter() if cgroup else []) + _command(name, limits, uids[side])
                procs[side] = subprocess.Popen(
                    cmd + ["-c", code], cwd=cwd, env=_clean_env(), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                    pass_fds=fds[side])
            while open_fds:  # only the two sides hold the pipes: each sees EOF when the other ends
                os.close(open_fds.pop())
            return _supervise(procs, stdin, nonce, limits, cgroup)
        finally:
            while open_fds:
                os.close(open_fds.pop())
            for proc in procs.values():
                _kill_group(proc)
                proc.wait()
            for uid in uids.values():
                if uid is not None:
                    _kill_uid(uid)  # whatever escaped the group (setsid) in the unisolated mode
            if cgroup:
                cgroup.remove()


def _supervise(procs: dict[str, subprocess.Popen], stdin: dict[str, bytes], nonce: bytes,
               limits: Limits, cgroup: RunCgroup | None) -> Result:
    """Feed both sides, collect their output until the judge has finished or `limits` end the
    run, and read the verdict from the judge's stdout alone."""
    start = time.monotonic()
    for side, proc in procs.items():
        threading.Thread(target=_feed, args=(proc.stdin, stdin[side]), daemon=True).start()
    buffers = {(side, kind): bytearray() for side in procs for kind in ("out", "err")}
    streams = {}
    for side, proc in procs.items():
        streams[proc.stdout.fileno()] = buffers[side, "out"]
        streams[proc.stderr.fileno()] = buffers[side, "err"]
    judge = procs["judge"]
    judge_fds = {judge.stdout.fileno(), judge.stderr.fileno()}
    total, status = 0, None
    deadline = start + limits.wall_s
    while judge_fds & streams.keys():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status = "timeout"
            break
        for fd in _ready(list(streams), remaining):
            chunk = os.read(fd, 65536)
            if not chunk:
                del streams[fd]
                continue
            total += len(chunk)
            buf = streams[fd]
            buf += chunk[:max(0, limits.max_output_bytes - len(buf))]
        if total > limits.max_output_bytes:
            status = "output_limit"
            break
    if status is None and not _exited(judge, deadline):
        status = "timeout"
    # The leaders are at most zombies until the caller's wait(), so their pids (= the group ids)
    # cannot have been reused: killing the groups never hits an unrelated process.
    for proc in procs.values():
        _kill_group(proc)
    returncode = judge.wait()
    for proc in procs.values():
        proc.stdout.close()
        proc.stderr.close()
    passed = (status is None and returncode == 0
              and buffers["judge", "out"].endswith(b"\n" + nonce + b"\n"))
    if status is None:
        status = "passed" if passed else ("memory_limit" if cgroup and cgroup.oom_killed()
                                          else "failed")
    out = (buffers["candidate", "out"] + buffers["judge", "out"]).decode("utf-8", "replace")
    err = (buffers["candidate", "err"] + buffers["judge", "err"]).decode("utf-8", "replace")
    return Result(passed, status, returncode, out.replace(nonce.decode(), "<pass>"), err,
                  time.monotonic() - start)


def _exited(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until `proc` exits or `deadline`, without reaping it (WNOWAIT)."""
    while True:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _ready(fds: list[int], timeout: float) -> list[int]:
    """The readable fds of `fds` within `timeout` (poll/epoll: fds above 1024 are fine, which
    select() is not, and Ray workers hold many)."""
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        return [key.fd for key, _ in sel.select(timeout)]


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
