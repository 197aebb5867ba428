"""Compose-equivalent smoke test: the four services of docker-compose.yml as local processes, and a
tiny job submitted through the API's HTTP interface, end to end.

Docker is never started on these machines, so this test reads docker-compose.yml and runs each
service's own `command` with its own `environment`, secrets and health check, in the compose
start order (depends_on: service_healthy), as child processes of the test. `localize` is the one
place where the container world is mapped to this machine, and its docstring lists every
substitution. Then it submits deploy/jobs/tiny-sudoku.toml (shrunk to two steps, Redis queue)
to the API over HTTP and waits for SUCCEEDED with metrics, checkpoints and run files on the
shared run volume. What it proves: the compose commands, flags, ports, environment (Redis URL
with the password, the shared Ray token, the API token file, the Ray Jobs address) and the
volume layout make a working deployment; a typo in any of them fails here.

It starts its own redis-server and Ray cluster (head + one worker) because they are what it
tests, and stops every process it started by process group.

    .venv/bin/python -m pytest -q tests/test_compose_smoke.py      # about 1.5-2 minutes
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import dlrl  # noqa: F401  (sets RAY_AUTH_MODE before anything imports ray)
from services.cli import load_spec
from tests.test_api import wait_for
from tests.test_deploy_files import (DOCKERFILE, REPO, dockerfile_instructions, example_env, load_compose,
                                     service_secret_paths)

LOOPBACK = "127.0.0.1"
IMAGE_VENV = "/opt/dlrl/venv"  # where deploy/Dockerfile puts the project's Python environment
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Docker's default PATH
TINY = REPO / "deploy" / "jobs" / "tiny-sudoku.toml"
DEADLINE_S = 170.0  # the whole test; each wait below is bounded by what is left of it


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def seconds(duration: str | int | float | None, default: float) -> float:
    """A compose duration ("5s", "1m30s", "250ms") in seconds."""
    if duration is None:
        return default
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a compose duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


@dataclass
class LocalService:
    """One compose service as a process on this machine."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    health_argv: list[str]
    health_interval: float
    health_timeout: float
    health_retries: int
    start_period: float
    depends_on: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        # A session of its own: `ray start --block` leaves raylet, GCS and workers in it, so the
        # whole group can be stopped by its id.
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def healthy_once(self) -> bool:
        try:
            return subprocess.run(self.health_argv, env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=self.health_timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def wait_healthy(self, deadline: float) -> None:
        """Docker's rule: failures inside start_period do not count; after it, `retries`
        consecutive failures make the container unhealthy (and its dependents never start)."""
        started, failures = time.monotonic(), 0
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy_once():
                return
            in_start_period = time.monotonic() - started < self.start_period
            failures = 0 if in_start_period else failures + 1
            if failures >= self.health_retries:
                raise RuntimeError(f"{self.name} is unhealthy ({failures} failed checks):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy before the test's deadline:\n{self.log_tail()}")
            time.sleep(self.health_interval)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the leader (ray start --block takes its node down), SIGKILL to the group after."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (Ray workers, the job driver)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@dataclass
class Localized:
    """docker-compose.yml mapped onto this machine (see `localize`)."""

    services: dict[str, LocalService]
    ports: dict[tuple[str, int], int]
    """(service, container port) -> the loopback port that stands for it."""
    volumes: dict[str, Path]
    """named volume -> its folder."""
    secret_files: dict[str, Path] = field(default_factory=dict)

    def url(self, service: str, container_port: int) -> str:
        return f"http://{LOOPBACK}:{self.ports[(service, container_port)]}"

    def start_order(self) -> list[str]:
        order: list[str] = []

        def visit(name: str, path: tuple[str, ...] = ()) -> None:
            if name in path:
                raise ValueError(f"depends_on cycle: {' -> '.join(path + (name,))}")
            for dep in self.services[name].depends_on:
                visit(dep, path + (name,))
            if name not in order:
                order.append(name)

        for name in self.services:
            visit(name)
        return order


def _image_environment(service: dict) -> tuple[dict[str, str], str | None]:
    """The ENV and final WORKDIR a service's image gives its processes. The dlrl image's come from
    deploy/Dockerfile; another image (redis) contributes Docker's default PATH only."""
    build = service.get("build") or {}
    if not (isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"):
        return {"PATH": SYSTEM_PATH}, None
    env: dict[str, str] = {"PATH": SYSTEM_PATH}
    workdir = None
    for op, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if op == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
        elif op == "WORKDIR":
            workdir = rest
    return env, workdir


def localize(compose: dict, root: Path, secret_values: dict[str, str]) -> Localized:
    """Map the interpolated compose file onto this machine. These are ALL the substitutions; the
    commands, flags, environment variables and health checks are otherwise the compose file's.

    1. Service host names -> 127.0.0.1 (every service runs on this host).
    2. Container ports -> free loopback ports, one per (service, port) for every port a service
       lists under `expose` (containers each have their own network namespace; here all share
       one): `ray-head:6385` in any service's strings becomes `127.0.0.1:<port>`, and a bare
       `6385` or `127.0.0.1:6385` / `localhost:6385` in ray-head's own command, environment and
       health check becomes `<port>` / `127.0.0.1:<port>`. A published port
       (`127.0.0.1:8000:8000`) is reached on the port that stands for its container port.
    3. `0.0.0.0` -> `127.0.0.1`: listen on loopback only.
    4. Named volumes -> folders under `root`; a volume's mount target in a string becomes its
       folder, and inside the image's working directory (a per-service folder here) the mount
       point is a link to the volume's folder, so relative paths such as `runs/` resolve as in
       the container.
    5. Secrets -> files under `root` holding the value of the variable they are declared from;
       `/run/secrets/<name>` becomes that file.
    6. The image -> this machine: the image's ENV from deploy/Dockerfile with its Python
       environment (/opt/dlrl/venv) replaced by the one running this test; HOME and TMPDIR are
       per-service folders (a container's private filesystem: Ray's temp dir and ~/.ray stay
       apart, so the cluster token can only come from the compose environment).

    Ignored, since they describe the container and not the process: build, image, deploy (the
    GPU reservation), shm_size, init, restart.
    """
    services = compose["services"]
    ports = {(name, int(p)): free_port() for name, svc in services.items() for p in svc.get("expose", [])}
    volumes = {name: root / "volumes" / name for name in compose.get("volumes") or {}}
    for path in volumes.values():
        path.mkdir(parents=True)
    secret_files = {}
    for name, decl in (compose.get("secrets") or {}).items():
        path = root / "secrets" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(secret_values[decl["environment"]])
        path.chmod(0o400)
        secret_files[name] = path

    hosts = "|".join(re.escape(name) for name in sorted(services, key=len, reverse=True))

    def mapper(name: str, svc: dict) -> tuple[Any, dict[str, Path]]:
        paths: dict[str, Path] = {}
        for vol in svc.get("volumes", []):
            source, _, target = vol.partition(":")
            paths[target.split(":")[0]] = volumes[source]
        for secret, target in service_secret_paths(svc).items():
            paths[target] = secret_files[secret]
        paths[IMAGE_VENV] = Path(sys.prefix)
        own_ports = "|".join(str(p) for (s, p) in ports if s == name) or "(?!)"
        path_alt = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
        pattern = re.compile(
            rf"(?P<hostport>\b(?P<host>{hosts}):(?P<port>\d+)\b)"  # 1 and 2: another service
            rf"|(?P<self>\b(?:127\.0\.0\.1|localhost):(?P<selfport>{own_ports})\b)"  # 2: itself
            rf"|(?P<any>\b0\.0\.0\.0\b)"  # 3
            rf"|(?P<path>(?<![\w/.])(?:{path_alt})(?=$|[/\s\"':]))"  # 4, 5, 6: container paths
            rf"|(?P<own>(?<![\w.:-])(?:{own_ports})(?![\w.]))"  # 2: this service's own ports
        )

        def substitute(m: re.Match) -> str:
            if m["hostport"]:
                return f"{LOOPBACK}:{ports[(m['host'], int(m['port']))]}"
            if m["self"]:
                return f"{LOOPBACK}:{ports[(name, int(m['selfport']))]}"
            if m["any"]:
                return LOOPBACK
            if m["path"]:
                return str(paths[m["path"]])
            return str(ports[(name, int(m["own"]))])

        return (lambda s: pattern.sub(substitute, s)), paths

    local: dict[str, LocalService] = {}
    for name, svc in services.items():
        sub, paths = mapper(name, svc)
        home = root / name
        (home / "home").mkdir(parents=True)
        (home / "tmp").mkdir()
        image_env, workdir = _image_environment(svc)
        cwd = home / "workdir"
        cwd.mkdir()
        if workdir:
            for target, folder in paths.items():
                if target.startswith(workdir.rstrip("/") + "/"):
                    link = cwd / target[len(workdir.rstrip("/")) + 1:]
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(folder, target_is_directory=True)
        env = {k: sub(v) for k, v in image_env.items()}
        env.update(HOME=str(home / "home"), TMPDIR=str(home / "tmp"))
        compose_env = svc.get("environment", {})
        env.update({k: sub(str(v)) for k, v in compose_env.items()})
        command = svc["command"]
        argv = [sub(a) for a in (shlex.split(command) if isinstance(command, str) else command)]
        test = svc["healthcheck"]["test"]
        if isinstance(test, str):
            health = ["/bin/sh", "-c", sub(test)]
        elif test[0] == "CMD-SHELL":
            health = ["/bin/sh", "-c", sub(test[1])]
        elif test[0] == "CMD":
            health = [sub(a) for a in test[1:]]
        else:
            raise ValueError(f"{name}: healthcheck test {test[0]!r}")
        hc = svc["healthcheck"]
        interval = seconds(hc.get("start_interval", hc.get("interval")), 30.0)
        local[name] = LocalService(
            name=name, argv=argv, env=env, cwd=cwd, health_argv=health, health_interval=interval,
            health_timeout=seconds(hc.get("timeout"), 30.0), health_retries=int(hc.get("retries", 3)),
            start_period=seconds(hc.get("start_period"), 0.0), depends_on=list(svc.get("depends_on", {})),
            log_path=home / "service.log")
    return Localized(local, ports, volumes, secret_files)


# --- the test --------------------------------------------------------------------------------


def test_localize_maps_only_hosts_ports_volumes_and_secrets(tmp_path: Path):
    """The mapping itself, on the real compose file: nothing else of a command changes."""
    values = {"DLRL_API_TOKEN": "api-token", "REDIS_PASSWORD": "redispw", "RAY_AUTH_TOKEN": "raytoken"}
    compose = load_compose(example_env(values))
    local = localize(compose, tmp_path, values)
    head = local.services["ray-head"]
    gcs, dash = local.ports[("ray-head", 6385)], local.ports[("ray-head", 8265)]
    expected = list(compose["services"]["ray-head"]["command"])
    for i, arg in enumerate(expected):
        if arg in {"6385", "8265", "10001", "52365"}:
            expected[i] = str(local.ports[("ray-head", int(arg))])
        elif arg == "0.0.0.0":
            expected[i] = LOOPBACK
    assert head.argv == expected and str(gcs) in head.argv and str(dash) in head.argv
    assert f"http://{LOOPBACK}:{dash}/api/gcs_healthz" in head.health_argv[-1]
    worker = local.services["ray-worker"]
    assert f"{LOOPBACK}:{gcs}" in worker.argv
    assert f"http://{LOOPBACK}:{local.ports[('ray-worker', 52365)]}/api/local_raylet_healthz" in worker.health_argv[-1]
    assert worker.env["DLRL_REDIS_URL"] == f"redis://:redispw@{LOOPBACK}:{local.ports[('redis', 6379)]}/0"
    api = local.services["api"]
    assert api.env["DLRL_RAY_ADDRESS"] == f"http://{LOOPBACK}:{dash}"
    assert Path(api.env["DLRL_API_TOKEN_FILE"]).read_text() == "api-token"
    assert Path(api.env["RAY_AUTH_TOKEN_PATH"]).read_text() == "raytoken"
    assert api.env["DLRL_RUNS_DIR"] == str(local.volumes["dlrl-runs"])
    assert (api.cwd / "runs").resolve() == local.volumes["dlrl-runs"].resolve()
    assert api.env["PATH"].split(":")[0] == str(Path(sys.prefix) / "bin")
    redis = local.services["redis"]
    assert f"--port {local.ports[('redis', 6379)]}" in redis.argv[-1]
    assert f"-p {local.ports[('redis', 6379)]} " in redis.health_argv[-1]
    assert f"http://{LOOPBACK}:{local.ports[('api', 8000)]}/readyz" in api.health_argv[-1]
    assert f"--dir {local.volumes['redis-data']}" in redis.argv[-1] and "--bind 127.0.0.1" in redis.argv[-1]
    assert redis.env["REDIS_PASSWORD"] == "redispw" and '"$REDIS_PASSWORD"' in redis.argv[-1]
    # The ports are distinct: four processes share one loopback interface.
    assert len(set(local.ports.values())) == len(local.ports)
    assert local.start_order().index("redis") < local.start_order().index("ray-head") \
        < local.start_order().index("ray-worker")


@pytest.mark.slow
def test_compose_services_run_a_tiny_job_end_to_end():
    deadline = time.monotonic() + DEADLINE_S
    values = {"DLRL_API_TOKEN": secrets.token_hex(24), "REDIS_PASSWORD": secrets.token_hex(24),
              "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    compose = load_compose(example_env(values))
    root = Path(tempfile.mkdtemp(prefix="dcs-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    local = localize(compose, root, values)
    started: list[LocalService] = []
    try:
        for name in local.start_order():
            service = local.services[name]
            service.start()
            started.append(service)
            service.wait_healthy(deadline)

        dashboard = local.url("ray-head", 8265)
        ray_auth = {"Authorization": f"Bearer {values['RAY_AUTH_TOKEN']}"}
        # Token auth is on: the dashboard refuses a request without the cluster token ...
        assert httpx.get(f"{dashboard}/api/jobs/", timeout=10).status_code == 401
        # ... and with it, shows the head and the worker as one cluster.
        nodes = httpx.get(f"{dashboard}/nodes?view=summary", headers=ray_auth, timeout=10).json()
        alive = [n for n in nodes["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]
        assert len(alive) == 2, nodes

        api = local.url("api", 8000)
        auth = {"Authorization": f"Bearer {values['DLRL_API_TOKEN']}"}
        spec = load_spec(str(TINY), ["name=compose-smoke", "train.steps=2", "eval.every=2", "eval.steps=5",
                                     "task.eval_size=4", "rollout.prompts_per_step=4", "rollout.group_size=4",
                                     "rollout.steps=5", "train.n_mc=2", "queue.backend=redis"])
        with httpx.Client(base_url=api, headers=auth, timeout=30) as http:
            r = http.post("/v1/jobs", json=spec.model_dump(mode="json"))
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]

            def finished() -> dict | None:
                job = http.get(f"/v1/jobs/{job_id}").json()
                return job if job["state"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

            job = wait_for(finished, deadline - time.monotonic(), f"job {job_id} to end", every=2.0)
            logs = http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 60}).text
            assert job["state"] == "SUCCEEDED", f"{job}\n{logs}"
            assert job["progress"]["step"] == 2 and job["reward"] is not None
            records = http.get(f"/v1/jobs/{job_id}/metrics").json()["records"]
            assert [m["step"] for m in records if m["kind"] == "train"] == [1, 2], records
            assert all(isinstance(m["reward"], float) for m in records if m["kind"] == "train"), records
            assert [m["step"] for m in records if m["kind"] == "eval"] == [0, 2], records
            checkpoints = http.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]
            assert checkpoints, "no checkpoint listed"

        # The run lives on the shared run volume, where the API found it.
        run_dir = Path(job["run_dir"])
        volume = local.volumes["dlrl-runs"].resolve()
        assert run_dir.resolve().is_relative_to(volume), (run_dir, volume)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["kind"] for m in lines] == [r["kind"] for r in records]
        assert (run_dir / "checkpoint").is_dir()
        # Redis ran with its data (AOF) in its volume.
        assert any(local.volumes["redis-data"].iterdir())
    finally:
        for service in reversed(started):
            service.stop()
        shutil.rmtree(root, ignore_errors=True)
    for service in started:
        assert service.proc is not None and service.proc.poll() is not None, f"{service.name} still runs"
