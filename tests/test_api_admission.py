"""The job API's admission policy over real HTTP: a `dlrl serve` process on the session's real Ray
head and redis-server, and a caller with a valid token trying what issue 12 found the API would run
("The job API runs whatever a token holder sends"). Each attempt now gets a 4xx naming the field
and the reason, and runs nothing: no job record appears, a marker file the command would create is
never written, a listener the spec points at never sees a connection. One job that is admitted
shows the active-job limit, a job id with a Redis-key suffix, and the wall-clock limit stopping it.
The policy's rules one by one are in tests/test_api_admission_policy.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pathlib import Path

from tests.test_api import ApiServer, job_state, tiny_spec, wait_for

ROOT = Path(__file__).resolve().parents[1]

WALL_CLOCK_S = 15


@pytest.fixture(scope="module")
def guarded(redis_server, ray_cluster, tmp_path_factory) -> Iterator[ApiServer]:
    base = tmp_path_factory.mktemp("admission")
    (base / "data").mkdir()
    (base / "models").mkdir()
    (base / "secret.jsonl").write_text('{"question": "the password?", "answer": "hunter2"}\n')
    server = ApiServer(redis_server.url, ray_cluster.dashboard_url, base / "runs",
                       "--data-root", str(base / "data"), "--model-root", str(base / "models"),
                       "--max-active-jobs", "1", "--max-job-seconds", str(WALL_CLOCK_S)).start()
    server.base = base  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture
def http(guarded: ApiServer) -> Iterator[httpx.Client]:
    with guarded.http() as client:
        yield client


def job_ids(http: httpx.Client) -> list[str]:
    r = http.get("/v1/jobs", params={"limit": 200})
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["jobs"]]


def refused(http: httpx.Client, body: Any, path: str, words: str, status: int = 422) -> dict[str, Any]:
    """POST `body`; it must be refused with `status`, naming `path` with `words`, and create no job."""
    before = job_ids(http)
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = http.post("/v1/jobs", **kwargs)
    assert r.status_code == status, (path, r.status_code, r.text)
    reply = r.json()
    assert any(e["path"] == path and words in e["reason"] for e in reply["errors"]), (path, reply)
    assert f"{path}: " in reply["detail"]
    assert job_ids(http) == before  # nothing stored, so nothing submitted to Ray
    return reply


def with_task(name: str, options: dict[str, Any]) -> dict[str, Any]:
    spec = tiny_spec("adm-task")
    spec["task"] = {**spec["task"], "name": name, "options": options}
    return spec


def test_import_path_tasks_are_refused_and_nothing_runs(guarded: ApiServer, http: httpx.Client):
    marker = guarded.base / "pwned"  # type: ignore[attr-defined]
    script = guarded.base / "payload.py"  # type: ignore[attr-defined]
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name, options in [("os:system", {"command": f"touch {marker}; env > {marker}"}),
                          ("subprocess:run", {"args": ["touch", str(marker)]}),
                          ("runpy:run_path", {"path_name": str(script)}),
                          ("tests.test_tasks_import_paths:_marking_factory", {"marker": str(marker)})]:
        reply = refused(http, with_task(name, options), "task.name", "registered tasks only")
        assert "import path" in reply["detail"]
    refused(http, with_task("sudokku", {}), "task.name", "not a registered task")
    refused(http, with_task("sudoku", {"command": "id"}), "task.options.command", "not an option of task 'sudoku'")
    time.sleep(2)  # had anything been started, it would have had time to write the marker
    assert not marker.exists()


def test_models_must_be_builtin_or_approved_and_remote_code_is_refused(guarded: ApiServer, http: httpx.Client):
    def with_model(**model: Any) -> dict[str, Any]:
        spec = tiny_spec("adm-model")
        spec["model"] = {**spec["model"], **model}
        return spec

    refused(http, with_model(path="someone/backdoored-model"), "model.path", "not on the operator's list")
    refused(http, with_model(path="/etc"), "model.path", "not inside a model folder the operator approved")
    refused(http, with_model(path="builtin:../../../etc"), "model.path", "built-in name")
    approved = str(guarded.base / "models" / "x")  # type: ignore[attr-defined]
    refused(http, with_model(path=approved, trust_remote_code=True), "model.trust_remote_code",
            "remote code is not allowed")


def test_queue_and_ray_addresses_are_refused_and_never_dialled(http: httpx.Client):
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        redis_port, ray_port = (s.getsockname()[1] for s in listeners)
        spec = tiny_spec("adm-addr")
        spec["queue"] = {**spec["queue"], "backend": "redis", "redis_url": f"redis://:guess@127.0.0.1:{redis_port}/0"}
        refused(http, spec, "queue.redis_url", "set by the server")
        spec = tiny_spec("adm-addr")
        spec["runtime"] = {**spec["runtime"], "ray_address": f"127.0.0.1:{ray_port}"}
        refused(http, spec, "runtime.ray_address", "set by the server")
        time.sleep(1)
        for s in listeners:  # a connection attempt would wait in the backlog
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in listeners:
            s.close()


def test_sizes_are_bounded_and_an_empty_spec_starts_nothing(http: httpx.Client):
    def with_value(section: str, key: str, value: Any) -> dict[str, Any]:
        spec = tiny_spec("adm-size")
        spec[section] = {**spec[section], key: value}
        return spec

    for section, key, value in [("train", "steps", 10**30), ("rollout", "gen_length", 10**9),
                                ("rollout", "group_size", 10**6), ("rollout", "num_workers", 1000 * 1000)]:
        refused(http, with_value(section, key, value), f"{section}.{key}", "less than or equal")
    refused(http, with_value("train", "steps", 10**6), "train.steps", "exceeds the API's limit of 10000")
    refused(http, with_value("rollout", "num_workers", 1000), "rollout.num_workers", "exceeds the API's limit of 8")
    reply = refused(http, {}, "train.steps", "required over the API")
    assert {e["path"] for e in reply["errors"]} >= {"model.path", "task.name", "rollout.gen_length"}


def test_types_are_strict_numbers_finite_and_one_authorization_header(guarded: ApiServer, http: httpx.Client):
    spec = tiny_spec("adm-types")
    text = json.dumps(spec).replace('"lr": 0.0002', '"lr": Infinity')
    assert "Infinity" in text
    refused(http, text.encode(), "train.lr", "finite number")
    for bad in ["5", True, 5.0]:
        refused(http, {**spec, "train": {**spec["train"], "steps": bad}}, "train.steps", "valid integer")
    with httpx.Client(base_url=guarded.url, timeout=30) as bare:
        for second in [f"Bearer {guarded.token}", "Bearer wrong"]:
            r = bare.get("/v1/jobs", headers=[("Authorization", "Bearer wrong"), ("Authorization", second)])
            assert r.status_code == 400 and "more than one Authorization header" in r.json()["detail"], r.text
            r = bare.get("/v1/jobs", headers=[("Authorization", second), ("Authorization", second)])
            assert r.status_code == 400, r.text


def test_data_paths_must_lie_in_the_data_root(guarded: ApiServer, http: httpx.Client):
    for path in ["/etc/passwd", "../secret.jsonl", str(guarded.base / "secret.jsonl")]:  # type: ignore[attr-defined]
        refused(http, with_task("math", {"path": path}), "task.options.path", "outside the API's data root")
    # eval.protocol: a valid protocol outside deploy/eval/ and a missing file are refused alike, by
    # admission; validation over HTTP reads neither (no oracle for the server's files).
    outside = guarded.base / "outside.toml"  # type: ignore[attr-defined]
    outside.write_text((ROOT / "deploy/eval/tiny-sudoku.toml").read_text())
    for path in [outside, guarded.base / "absent.toml"]:  # type: ignore[attr-defined]
        body = tiny_spec("protocol")
        body["eval"] = {**body.get("eval", {}), "protocol": str(path)}
        refused(http, body, "eval.protocol", "is not a protocol file in deploy/eval/")


def test_an_admitted_job_holds_the_only_slot_has_exact_ids_and_is_stopped_at_the_wall_clock(
        guarded: ApiServer, http: httpx.Client, redis_server):
    r = http.post("/v1/jobs", json=tiny_spec("adm-long", "train.steps=1000"))
    assert r.status_code == 201, r.text
    job = r.json()
    job_id = job["id"]
    assert job["spec"]["model"]["trust_remote_code"] is False and job["spec"]["runtime"]["ray_address"] is None

    second = http.post("/v1/jobs", json=tiny_spec("adm-second"))  # --max-active-jobs 1
    assert second.status_code == 429 and "1 job(s) already pending or running" in second.json()["detail"]

    # A Redis-key suffix is no job id: 404 without reading `<prefix>:job:<id>:metrics` as a job.
    import redis

    assert redis.Redis.from_url(redis_server.url).exists(f"{guarded.prefix}:job:{job_id}")
    for path in [f"/v1/jobs/{job_id}:metrics", f"/v1/jobs/{job_id}%3Ametrics", f"/v1/jobs/{job_id}:metrics/stop",
                 f"/v1/jobs/{job_id.upper()}", f"/v1/jobs/{job_id}0"]:
        got = http.request("POST" if path.endswith("/stop") else "GET", path)
        assert got.status_code == 404 and "no job" in got.json()["detail"], (path, got.text)

    start = time.monotonic()
    wait_for(lambda: job_state(http, job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), WALL_CLOCK_S + 240,
             "the wall-clock limit to stop the job")
    ended = http.get(f"/v1/jobs/{job_id}").json()
    assert ended["state"] == "FAILED", ended
    assert ended["message"] == f"stopped: the job ran past the API's wall-clock limit of {WALL_CLOCK_S} s", ended
    assert ended["progress"]["step"] < 1000
    assert time.monotonic() - start < WALL_CLOCK_S + 240
    r = http.post("/v1/jobs", json=tiny_spec("adm-after"), headers={"Idempotency-Key": "adm-after"})
    assert r.status_code == 201, r.text  # the slot is free again
    http.post(f"/v1/jobs/{r.json()['id']}/stop")
    wait_for(lambda: job_state(http, r.json()["id"]) in ("FAILED", "STOPPED"), 120, "the second job's end")


def test_rate_limits_answer_429_with_retry_after(redis_server, ray_cluster, tmp_path):
    server = ApiServer(redis_server.url, ray_cluster.dashboard_url, tmp_path, "--rate-limit", "6",
                       "--submit-limit", "0").start()
    try:
        if time.time() % 60 > 45:  # the counts are per minute: start early in one
            time.sleep(61 - time.time() % 60)
        with server.http() as http:
            r = http.post("/v1/jobs", json=tiny_spec("adm-rate"))  # admitted, but no starts allowed
            assert r.status_code == 429 and "jobs a minute" in r.json()["detail"], r.text
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert http.get("/v1/jobs").json()["jobs"] == []
            codes = [http.get("/v1/jobs").status_code for _ in range(5)]
            assert codes == [200] * 4 + [429], codes  # 6 a minute: the POST and the GET above counted
            last = http.get("/v1/jobs/j-000000000000")
            assert last.status_code == 429 and "requests a minute" in last.json()["detail"]
            assert 1 <= int(last.headers["retry-after"]) <= 60
    finally:
        server.stop()
