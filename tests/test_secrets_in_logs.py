"""No secret in Ray's logs (issue 20): a job submitted through the real API (a `dlrl serve` process,
the session's real Ray head, a redis-server of its own with a password no other test uses) runs to
the end on the Redis queue, and then nothing Ray wrote under its temp folder (the session dir's
logs, runtime_env_agent.log among them, readable by every local user) nor the job's record in the
Ray Jobs API contains the Redis password. The API once put the Redis URL in the job's
`runtime_env.env_vars`, which Ray writes to runtime_env_agent.log in clear.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.local_cluster import RedisProcess
from tests.test_api import ApiServer, job_state, tiny_spec, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def secret_redis() -> Iterator[RedisProcess]:
    server = RedisProcess(password=f"pw-{secrets.token_hex(16)}").start()
    yield server
    server.cleanup()


def files_containing(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path.relative_to(root)))
        except OSError:  # a socket, or a file Ray removed meanwhile
            continue
    return found


def test_a_jobs_redis_password_reaches_no_ray_log(ray_cluster, secret_redis, tmp_path):
    password = secret_redis.password.encode()
    api = ApiServer(secret_redis.url, ray_cluster.dashboard_url, tmp_path / "runs").start()
    try:
        with api.http() as http:
            spec = tiny_spec("api-secret", "train.steps=2", "eval.every=2", 'queue.backend="redis"')
            r = http.post("/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            wait_for(lambda: job_state(http, job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), 240, "the job's end")
            job = http.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] == "SUCCEEDED", http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 40}).text
            assert len(http.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "train"}).json()["records"]) == 2
            submission_id = job["submission_id"]
    finally:
        api.stop()
    assert not (tmp_path / "runs" / job_id / ".redis-url").exists()  # the job read it, then removed it
    leaks = files_containing(ray_cluster.temp_dir, password)
    assert leaks == [], f"the Redis password is in clear in Ray's files: {leaks}"
    # Ray's record of the job (what anyone holding the cluster token reads) names the file, not the URL.
    info = httpx.get(f"{ray_cluster.dashboard_url}/api/jobs/{submission_id}", headers=ray_auth(ray_cluster),
                     timeout=10)
    assert info.status_code == 200, info.text
    assert "DLRL_REDIS_URL_FILE" in info.text and secret_redis.password not in info.text


def ray_auth(head) -> dict[str, str]:
    """Ray's token header for the head's HTTP API (token auth is on; RayHead.start put the token's
    path, or the caller's token, in this process's environment)."""
    env = {**os.environ, **head.token_env()}
    token = env.get("RAY_AUTH_TOKEN") or Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return {"Authorization": f"Bearer {token}"}
