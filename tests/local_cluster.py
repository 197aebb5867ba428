"""Local service processes — a real `redis-server` and a real Ray head — on free loopback ports
(a test and benchmark harness: it lives with the tests, outside the shipped packages).

The tests, the benchmarks and the compose-equivalent smoke test all need the same services the
docker-compose file runs. They start them here as child processes (never Docker), bound to
127.0.0.1, and stop them by pid. Nothing here is a stand-in: it is the same binaries with the
same flags the compose services use.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def _stop(proc: subprocess.Popen | None, timeout: float = 15.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after `timeout`; with `group`, the whole process group it leads."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers the leader did not take down
        except ProcessLookupError:
            pass


@dataclass
class RedisProcess:
    """`redis-server` with AOF persistence and a password, on a free loopback port.

    `restart()` stops the server (SIGTERM: it flushes the AOF) and starts it again on the same port
    and data directory, which is how the queue suite checks that no entry is lost across a restart.
    `appendfsync` "always" makes every acknowledged write survive a SIGKILL of the server too
    ("everysec", Redis's default, may lose the last second of them).
    """

    password: str = "dlrl-test-password"
    appendfsync: str = "everysec"
    port: int = field(default_factory=free_port)
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dlrl-redis-")))
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{LOOPBACK}:{self.port}/0"

    def command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        return [exe, "--bind", LOOPBACK, "--port", str(self.port), "--requirepass", self.password,
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--dir", str(self.data_dir),
                "--save", "", "--protected-mode", "yes"]

    def start(self) -> "RedisProcess":
        log = open(self.data_dir / "redis.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(self.ping, 15, f"redis-server on port {self.port}", self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        _stop(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


LOOPBACK_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray replaces a loopback --node-ip-address by the machine's routable address unless its
single-machine mode is on (the switch is named for the platforms where it is the default); a
one-machine cluster for tests and benchmarks should not listen beyond loopback."""


@dataclass
class RayHead:
    """`ray start --head --block` on free loopback ports, with the dashboard and Jobs API.

    Token authentication stays on (Ray's default for `ray start`). `ray start` does not make a
    token (only `ray.init()` of a local cluster does), so unless the caller names one
    (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) the head gets a fresh random token in its own temp
    dir, never the user's ~/.ray/auth_token; clients in this process and its children find it
    through the variables `env()` supplies, which `start()` also sets in this process.
    """

    num_cpus: int = 2
    object_store_bytes: int = 200 * 1024 * 1024
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dlrl-ray-")))
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        """The node's Prometheus endpoint (ray.util.metrics series, e.g. ray_dlrl_reward)."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def token_env(self) -> dict[str, str]:
        """RAY_AUTH_TOKEN_PATH of this head's token, unless the environment already names one."""
        if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
            return {}
        path = self.temp_dir / "auth_token"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32))
        return {"RAY_AUTH_TOKEN_PATH": str(path)}

    def env(self) -> dict[str, str]:
        """The head's environment (and that of the drivers tests start against it): without the
        quiet variables a test process may have set (dlrl.quiet.quiet_logs), so the head is an
        operator's cluster whose workers inherit nothing from a run's driver."""
        from dlrl.quiet import QUIET_ENV

        env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
        return {**env, **LOOPBACK_ENV, **self.token_env(), "RAY_USAGE_STATS_ENABLED": "0"}

    def command(self) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        return [ray, "start", "--head", "--block", "--port", str(self.port),
                "--node-ip-address", LOOPBACK, "--num-cpus", str(self.num_cpus),
                "--object-store-memory", str(self.object_store_bytes),
                "--dashboard-host", LOOPBACK, "--dashboard-port", str(self.dashboard_port),
                "--metrics-export-port", str(self.metrics_port),
                "--dashboard-agent-listen-port", str(free_port()),  # Ray's fixed default may be taken
                "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.temp_dir),
                "--disable-usage-stats"]

    def start(self, timeout: float = 90.0) -> "RayHead":
        log = open(self.temp_dir / "head.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                     start_new_session=True)
        try:
            _wait(self._jobs_api_up, timeout, f"Ray head on port {self.port}", self.proc)
        except BaseException:
            self.stop()
            raise
        os.environ.update({**LOOPBACK_ENV, **self.token_env()})
        return self

    def _jobs_api_up(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.dashboard_url + "/api/version", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # it answers (401 without Ray's auth token): the server is up
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.proc, timeout=30, group=True)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
