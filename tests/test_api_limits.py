"""The job API under load and abuse, over real HTTP: a `dlrl serve` process on the session's real
Ray head and redis-server (issue 20, "The job API races and stalls").

- 20 concurrent submissions against `max_active_jobs = 4` start exactly 4 jobs; the other 16 get a
  429 that says why, and leave nothing in Redis (no record, no index entry, no idempotency key).
- Slow clients (slowloris): connections that trickle header bytes, or body bytes, are closed once
  their header or body timeout passes, and /healthz answers all along; connections past the cap
  are answered 503 and closed at once.
- Paths that cannot be resolved (a symlink loop, another process's /proc/<pid>/cwd) are 422s, and
  no error reply shows the server's folders.
- A job's log is read from its end, bounded in bytes.

The jobs run a stand-in command (DLRL_JOB_COMMAND: a Python one-liner that prints and sleeps), so
the admission race is real Ray Jobs without twenty training runs on the test machine.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.test_api import ROOT, ApiServer, job_state, tiny_spec, wait_for

LOG_LINES = 20_000
STAND_IN = (f"import sys, time; [print(f'log line {{i}}') for i in range({LOG_LINES})]; sys.stdout.flush(); "
            "time.sleep(600)")
"""What each job runs instead of `dlrl train`: a long log, then a long sleep (until stopped)."""
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
MAX_CONNECTIONS = 100
MAX_LOG_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def limited(redis_server, ray_cluster, tmp_path_factory) -> Iterator[ApiServer]:
    base = tmp_path_factory.mktemp("limits")
    for folder in ("data", "models"):
        (base / folder).mkdir()
        (base / folder / "a").symlink_to(base / folder / "b")  # a symlink loop
        (base / folder / "b").symlink_to(base / folder / "a")
    (base / "api.toml").write_text(f"max_log_bytes = {MAX_LOG_BYTES}\n")
    server = ApiServer(redis_server.url, ray_cluster.dashboard_url, base / "runs", "--settings", str(base / "api.toml"),
                       "--data-root", str(base / "data"), "--model-root", str(base / "models"),
                       "--max-active-jobs", "4", "--submit-limit", "1000", "--rate-limit", "100000",
                       "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
                       "--max-connections", str(MAX_CONNECTIONS))
    server.env["DLRL_JOB_COMMAND"] = f"{sys.executable} -c {json.dumps(STAND_IN)}"
    server.start()
    server.base = base  # type: ignore[attr-defined]
    server.redis = redis.Redis.from_url(redis_server.url, decode_responses=True)  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture
def http(limited: ApiServer) -> Iterator[httpx.Client]:
    with limited.http() as client:
        yield client


def test_twenty_concurrent_submissions_start_exactly_max_active_jobs(limited: ApiServer, http: httpx.Client):
    def submit(i: int) -> httpx.Response:
        with limited.http() as client:
            return client.post("/v1/jobs", json=tiny_spec(f"race-{i}"), headers={"Idempotency-Key": f"race-{i}"})

    barrier_free = ThreadPoolExecutor(20)
    replies = list(barrier_free.map(submit, range(20)))
    barrier_free.shutdown()
    admitted = [r.json()["id"] for r in replies if r.status_code == 201]
    refused = [r for r in replies if r.status_code != 201]
    try:
        assert len(admitted) == 4, [(r.status_code, r.text[:200]) for r in replies]
        for r in refused:
            assert r.status_code == 429 and "4 job(s) already pending or running (the API's limit)" in r.json()["detail"]
        # Nothing half-created: exactly the admitted jobs are in Redis, with their keys and indexes.
        rdb, p = limited.redis, limited.prefix  # type: ignore[attr-defined]
        listed = [j["id"] for j in http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]]
        assert sorted(listed) == sorted(admitted)
        assert len(list(rdb.scan_iter(f"{p}:idem:*"))) == 4
        assert len(list(rdb.scan_iter(f"{p}:job:*"))) == 4
        assert rdb.zcard(f"{p}:jobs:PENDING") + rdb.zcard(f"{p}:jobs:RUNNING") == 4
        assert all(http.get(f"/v1/jobs/{j}").json()["links"]["dashboard_job"] for j in admitted)

        # The log of a running job, read from its end and bounded in bytes.
        job_id = admitted[0]
        wait_for(lambda: f"log line {LOG_LINES - 1}" in http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 3}).text,
                 120, "the stand-in's log")
        last = http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 3}).text.splitlines()
        assert last == [f"log line {i}" for i in range(LOG_LINES - 3, LOG_LINES)]
        whole = http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 0}).text
        assert whole.startswith("[dlrl: earlier lines left out") and whole.endswith(f"log line {LOG_LINES - 1}\n")
        assert len(whole.encode()) <= MAX_LOG_BYTES + 200
        assert http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 100_001}).status_code == 422
        assert http.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 10_001}).status_code == 422
    finally:
        for job_id in admitted:
            http.post(f"/v1/jobs/{job_id}/stop")
        for job_id in admitted:
            wait_for(lambda: job_state(http, job_id) in ("STOPPED", "FAILED"), 90, f"{job_id} stopped")


def _trickle(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server closed it: what the test waits for


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (EOF or reset); anything it wrote first is read."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_clients_are_closed_after_the_timeouts_and_healthz_keeps_answering(limited: ApiServer):
    headers_slow, body_slow = [], []
    for _ in range(50):  # no token: these never get past the headers
        s = socket.create_connection(("127.0.0.1", limited.port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        headers_slow.append(s)
    for _ in range(10):  # a token and whole headers, then a body that never finishes
        s = socket.create_connection(("127.0.0.1", limited.port))
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + limited.token.encode() + b"\r\nContent-Length: 5000\r\n\r\n{")
        body_slow.append(s)
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    healthz: list[float] = []
    while time.monotonic() - opened < BODY_TIMEOUT_S + 4 and len(closed_at) < 60:
        for i, s in enumerate(headers_slow + body_slow):
            if i in closed_at:
                continue
            _trickle(s, b"X-Slow: 1\r\n" if i < 50 else b" ")
            if _closed_by_server(s):
                closed_at[i] = time.monotonic() - opened
        t0 = time.monotonic()
        assert httpx.get(limited.url + "/healthz", timeout=5).status_code == 200
        healthz.append(time.monotonic() - t0)
        time.sleep(0.3)
    for s in headers_slow + body_slow:
        s.close()
    assert len(closed_at) == 60, f"{60 - len(closed_at)} slow connections still open"
    assert max(closed_at[i] for i in range(50)) < HEADER_TIMEOUT_S + 3
    assert min(closed_at[i] for i in range(50)) > HEADER_TIMEOUT_S - 0.5  # trickling does not reset the clock
    assert max(closed_at[i] for i in range(50, 60)) < BODY_TIMEOUT_S + 3
    assert max(healthz) < 2.0, healthz  # answered at once (loose: the test machine is shared)


def test_connections_past_the_cap_get_503_and_the_server_recovers(limited: ApiServer):
    idle = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", limited.port))
        extra.settimeout(5)
        reply = b""
        while chunk := extra.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
        extra.close()
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: httpx.get(limited.url + "/healthz", timeout=5).status_code == 200, 10, "healthz after the cap")


def test_paths_that_cannot_be_resolved_are_422_and_errors_show_no_server_path(limited: ApiServer,
                                                                               http: httpx.Client):
    base: Path = limited.base  # type: ignore[attr-defined]

    def with_(section: str, values: dict) -> dict:
        spec = tiny_spec("paths")
        spec[section] = {**spec[section], **values}
        return spec

    cases = [(with_("model", {"path": str(base / "models/a/x")}), "model.path", "symlink loop"),
             (with_("model", {"path": "/proc/1/cwd/models"}), "model.path", ""),
             (with_("eval", {"protocol": str(base / "data/a/p.toml")}), "eval.protocol", "symlink loop"),
             (with_("eval", {"protocol": "/proc/1/cwd/p.toml"}), "eval.protocol", ""),
             (with_("eval", {"protocol": "nowhere/p.toml"}), "eval.protocol", "not a protocol file"),
             (with_("task", {"name": "math", "options": {"path": "a/m.jsonl"}}), "task.options.path", "symlink loop"),
             (with_("task", {"name": "math", "options": {"path": "../secret.jsonl"}}), "task.options.path",
              "outside the API's data root")]
    replies = []
    for body, field, words in cases:
        r = http.post("/v1/jobs", json=body)
        assert r.status_code == 422, (field, r.status_code, r.text)
        assert any(e["path"] == field and words in e["reason"] for e in r.json()["errors"]), r.text
        replies.append(r.text)
    replies += [http.get("/v1/jobs/j-000000000000").text, http.get("/v1/jobs/nope/metrics").text,
                http.post("/v1/jobs", json={"model": {"path": 5}}).text,
                http.get("/v1/jobs", params={"stat": "x"}).text]
    for text in replies:
        for server_path in (str(base), str(ROOT), sys.prefix, str(limited.runs_dir)):
            assert server_path not in text, (server_path, text)
    assert "<model root>/a/x" in replies[0] and "<dlrl checkout>/nowhere/p.toml" in replies[4]


def test_a_bug_is_a_plain_json_500_without_server_detail(redis_server, tmp_path):
    from fastapi.testclient import TestClient

    from services.api.api import ApiSettings, create_app

    token = "t" * 32
    app = create_app(ApiSettings(token=token, redis_url=redis_server.url, runs_dir=tmp_path))

    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError(f"cannot open {ROOT / 'secret'}")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/boom", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 500 and r.json() == {"detail": "internal error (the server logged it)"}
