"""The job API over real HTTP: a `dlrl serve` process, a real Ray head (jobs run as Ray Jobs) and a
real redis-server (job records and metrics), from the session fixtures.

What it shows: a tiny job submitted over HTTP reaches SUCCEEDED with its metrics, and an API
process restarted mid-job still reports it; a running job can be stopped; no token or a wrong one
is 401; ten kinds of bad spec are 422 with the field path and reason; an oversized body is 413;
with Redis and Ray down the API says 503, never 500. The job store's paging, filtering,
idempotency and metric mirroring are checked against Redis directly.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dlrl.config import JobSpec
from tests.local_cluster import RedisProcess, free_port
from services.cli import load_spec
from services.api.jobstore import IdempotencyConflict, JobStore, MetricMirror

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "deploy/jobs/tiny-sudoku.toml"


class ApiServer:
    """`dlrl serve` as a child process on a free loopback port (stopped by pid)."""

    def __init__(self, redis_url: str, ray_address: str, runs_dir: Path, *extra_args: str,
                 token: str | None = None, prefix: str | None = None) -> None:
        self.port = free_port()
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.prefix = prefix or f"dlrl-test-{secrets.token_hex(4)}"
        self.runs_dir = runs_dir
        self.extra_args = extra_args
        self.env = {**os.environ, "DLRL_REDIS_URL": redis_url, "DLRL_RAY_ADDRESS": ray_address,
                    "DLRL_REDIS_PREFIX": self.prefix, "DLRL_RUNS_DIR": str(runs_dir)}
        self.env.pop("DLRL_API_TOKEN_FILE", None)
        if self.token:
            self.env["DLRL_API_TOKEN"] = self.token
        else:
            self.env.pop("DLRL_API_TOKEN", None)
        self.proc: subprocess.Popen | None = None
        self.log_path = runs_dir / f"api-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def http(self, **kwargs: Any) -> httpx.Client:
        # Long enough for a submission to a just-started Ray head (the API waits for its job agent).
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=150, **kwargs)

    def start(self, timeout: float = 60.0) -> "ApiServer":
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", *self.extra_args],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dlrl serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"dlrl serve not up after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def tiny_spec(name: str, *overrides: str) -> dict[str, Any]:
    """The shipped tiny Sudoku job shrunk to seconds: few prompts, short evaluations."""
    spec = load_spec(str(TINY), ["train.steps=3", "eval.every=2", "eval.steps=5", "task.eval_size=4",
                                 "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.steps=5",
                                 "train.n_mc=2", f"name={name}", *overrides])
    return spec.model_dump(mode="json")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not after {timeout:.0f}s")


@pytest.fixture(scope="module")
def api(redis_server, ray_cluster, tmp_path_factory) -> Iterator[ApiServer]:
    server = ApiServer(redis_server.url, ray_cluster.dashboard_url, tmp_path_factory.mktemp("api-runs")).start()
    yield server
    server.stop()


@pytest.fixture
def http(api: ApiServer) -> Iterator[httpx.Client]:
    with api.http() as client:
        yield client


def assert_not_ended(http: httpx.Client, job_id: str) -> None:
    """Fail at once, with the job's log, if a job that should still run has ended."""
    job = http.get(f"/v1/jobs/{job_id}").json()
    if job["state"] in ("SUCCEEDED", "FAILED", "STOPPED"):
        log = http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 40}).text
        pytest.fail(f"job {job_id} ended early: {job['state']} ({job['message']})\n{log}")


def job_state(http: httpx.Client, job_id: str) -> str:
    r = http.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()["state"]


# ---------------------------------------------------------------- jobs end to end


@pytest.mark.slow
def test_tiny_job_reaches_succeeded_with_metrics_across_an_api_restart(api: ApiServer, http: httpx.Client):
    spec = tiny_spec("api-tiny", "train.steps=6", "eval.every=3")
    key = f"tiny-{secrets.token_hex(4)}"
    r = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    assert r.status_code == 201, r.text
    job = r.json()
    job_id = job["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    assert job["state"] in ("PENDING", "RUNNING") and job["progress"] == {"step": 0, "total_steps": 6, "fraction": 0.0}
    assert job["spec"]["train"]["steps"] == 6
    assert job["spec"]["runtime"]["out_dir"] == str(api.runs_dir / job_id)  # the API decides where runs go
    assert job["links"]["dashboard_job"] == f"{api.env['DLRL_RAY_ADDRESS']}/#/jobs/{job['submission_id']}"

    # Idempotency: the same key and spec is the same job; the same key with another spec is 409.
    again = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["id"] == job_id
    other = http.post("/v1/jobs", json={**spec, "name": "api-other"}, headers={"Idempotency-Key": key})
    assert other.status_code == 409 and job_id in other.json()["detail"]

    # Restart the API while the job runs: the new process reports the same job and its metrics.
    def train_records() -> list[dict]:
        r = http.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "train"})
        assert r.status_code == 200, r.text
        if not r.json()["records"]:
            assert_not_ended(http, job_id)
        return r.json()["records"]

    wait_for(train_records, 150, "the first learner step's metrics")
    before = http.get(f"/v1/jobs/{job_id}").json()
    assert before["state"] == "RUNNING", before
    n_before = len(http.get(f"/v1/jobs/{job_id}/metrics").json()["records"])
    api.restart()
    after = http.get(f"/v1/jobs/{job_id}")
    assert after.status_code == 200 and after.json()["id"] == job_id
    assert len(http.get(f"/v1/jobs/{job_id}/metrics").json()["records"]) >= n_before

    wait_for(lambda: job_state(http, job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), 180, "the job's end")
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "SUCCEEDED", http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 40}).text

    history = http.get(f"/v1/jobs/{job_id}/metrics").json()
    records = history["records"]
    assert history["count"] == len(records) > n_before  # metrics kept arriving after the restart
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 7))  # the steps done, = the version
    assert [r["version"] for r in train] == list(range(1, 7))
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0.0 <= r["reward"] <= 1.0 for r in train) and all(0.0 <= r["eval_reward"] <= 1.0 for r in evals)
    assert job["progress"] == {"step": 6, "total_steps": 6, "fraction": 1.0}
    assert job["policy_version"] == 6 and job["latest_metrics"]["step"] == 6
    assert job["reward"] == train[-1]["reward"] and job["eval_reward"] == evals[-1]["eval_reward"]
    since = http.get(f"/v1/jobs/{job_id}/metrics", params={"since": 3, "kind": "train"}).json()["records"]
    assert [r["step"] for r in since] == [3, 4, 5, 6]

    ckpts = http.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]
    assert [c["path"] for c in ckpts] == ["checkpoint"] and ckpts[0]["size_bytes"] > 100_000
    assert ckpts[0]["step"] == 6 and ckpts[0]["policy_version"] == 6
    assert (Path(job["run_dir"]) / "checkpoint").is_dir() and Path(job["run_dir"]).parent == api.runs_dir / job_id

    log = http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 0}).text
    assert "step    6/6" in log and "held-out reward" in log
    assert len(http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 3}).text.splitlines()) == 3
    with http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": True}) as stream:  # ends: job is over
        assert "step    6/6" in "".join(stream.iter_text())

    succeeded = http.get("/v1/jobs", params={"state": "SUCCEEDED"}).json()["jobs"]
    assert job_id in [j["id"] for j in succeeded]
    assert job_id not in [j["id"] for j in http.get("/v1/jobs", params={"state": "RUNNING"}).json()["jobs"]]
    finished = http.post(f"/v1/jobs/{job_id}/stop")
    assert finished.status_code == 409 and "SUCCEEDED" in finished.json()["detail"]


def test_a_running_job_can_be_stopped(http: httpx.Client):
    r = http.post("/v1/jobs", json=tiny_spec("api-stop", "train.steps=1000"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: assert_not_ended(http, job_id) or job_state(http, job_id) == "RUNNING", 60, "RUNNING")
    stop = http.post(f"/v1/jobs/{job_id}/stop")
    assert stop.status_code == 202 and stop.json()["stop_requested"] is True
    wait_for(lambda: job_state(http, job_id) == "STOPPED", 60, "STOPPED")
    assert http.post(f"/v1/jobs/{job_id}/stop").status_code == 409
    assert http.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] < 1000


def test_a_job_the_cluster_can_never_place_is_failed_with_why(http: httpx.Client):
    """runtime.device = "cuda" on the tests' Ray head (no GPU, no autoscaler): the job fails within
    seconds of starting, and its message is the job's own sentence with the remedy, not RUNNING for
    the 600 s placement timeout nor Ray's log excerpt."""
    r = http.post("/v1/jobs", json=tiny_spec("api-cuda", "runtime.device=cuda"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: job_state(http, job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), 180, "the job's end")
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "FAILED", job
    assert job["message"].startswith("CapacityError: runtime.device = 'cuda' asks for 1 GPU per learner rank"), job
    assert "this cluster has 0 GPUs and no autoscaler: set runtime.device = 'cpu'" in job["message"]
    assert job["progress"]["step"] == 0


@pytest.mark.slow
def test_a_stopped_job_resumes_from_its_last_checkpoint_in_the_same_run_folder(api: ApiServer, http: httpx.Client):
    """Checkpoints by default (every eval.every = 2 steps): a job stopped mid-run resumes with
    `dlrl resume ID` (the CLI client over HTTP), trains every remaining step once and succeeds."""
    r = http.post("/v1/jobs", json=tiny_spec("api-resume", "train.steps=8"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def saved() -> int | None:
        assert_not_ended(http, job_id)
        steps = [c["step"] for c in http.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]]
        return steps[0] if steps and steps[0] else None

    wait_for(saved, 240, "the job's first checkpoint")
    assert http.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    wait_for(lambda: job_state(http, job_id) == "STOPPED", 120, "STOPPED")
    step = http.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"][0]["step"]
    assert 2 <= step < 8 and step % 2 == 0
    run_dir = Path(http.get(f"/v1/jobs/{job_id}").json()["run_dir"])

    env = {k: v for k, v in os.environ.items() if not k.startswith("DLRL_API")}
    resumed = subprocess.run([sys.executable, "-m", "services.cli", "resume", job_id], cwd=ROOT, capture_output=True,
                             text=True, timeout=180, env={**env, "DLRL_API_URL": api.url, "DLRL_API_TOKEN": api.token})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # the reply: PENDING, its progress (and metric history) cut back to the checkpoint
    assert resumed.stdout.startswith(f"resuming {job_id} (api-resume) from step {step}: PENDING")
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["resumes"] == 1 and job["submission_id"] == f"dlrl-{job_id}-r1" and job["run_dir"] == str(run_dir)
    again = http.post(f"/v1/jobs/{job_id}/resume")  # it runs: one resume at a time
    assert again.status_code == 409 and "only a STOPPED or FAILED job resumes" in again.json()["detail"]

    wait_for(lambda: job_state(http, job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), 300, "the resumed job's end")
    job = http.get(f"/v1/jobs/{job_id}").json()
    log = http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 0}).text
    assert job["state"] == "SUCCEEDED", log[-3000:]
    assert f"steps {step}->8 -> {run_dir}" in log
    records = http.get(f"/v1/jobs/{job_id}/metrics").json()["records"]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))  # each step once
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4, 6, 8]
    on_disk = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "train"]
    assert on_disk == list(range(1, 9))
    finished = http.post(f"/v1/jobs/{job_id}/resume")
    assert finished.status_code == 409 and "SUCCEEDED" in finished.json()["detail"]


def test_a_job_stopped_before_its_first_checkpoint_cannot_resume(http: httpx.Client):
    r = http.post("/v1/jobs", json=tiny_spec("api-nockpt", "train.steps=1000", "runtime.checkpoint_every=0"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert r.json()["resumes"] == 0
    wait_for(lambda: assert_not_ended(http, job_id) or job_state(http, job_id) == "RUNNING", 60, "RUNNING")
    running = http.post(f"/v1/jobs/{job_id}/resume")
    assert running.status_code == 409 and "RUNNING" in running.json()["detail"]
    assert http.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    wait_for(lambda: job_state(http, job_id) == "STOPPED", 60, "STOPPED")
    refused = http.post(f"/v1/jobs/{job_id}/resume")
    assert refused.status_code == 409 and "no checkpoint to resume from" in refused.json()["detail"]
    assert job_state(http, job_id) == "STOPPED"
    assert http.post("/v1/jobs/j-000000000000/resume").status_code == 404


# ---------------------------------------------------------------- auth, validation, limits


def test_every_route_but_the_probes_needs_the_token(api: ApiServer):
    with httpx.Client(base_url=api.url, timeout=10) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}
        ready = anon.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "redis": "ok", "ray": "ok"}
        for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/jobs/j-0"), ("POST", "/v1/jobs"),
                             ("POST", "/v1/jobs/j-0/stop"), ("POST", "/v1/jobs/j-0/resume"),
                             ("GET", "/v1/jobs/j-0/logs"), ("GET", "/openapi.json")]:
            for headers in [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {api.token}"},
                            {"Authorization": f"Bearer {api.token}x"}, {"Authorization": "Bearer"}]:
                r = anon.request(method, path, headers=headers, json={"name": "x"} if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
        # An unauthenticated client cannot learn whether its body was valid: 401 before any parsing.
        assert anon.post("/v1/jobs", content=b"{not json").status_code == 401
        assert anon.get("/v1/jobs", headers={"Authorization": f"bearer {api.token}"}).status_code == 200


def test_openapi_document_describes_the_api(http: httpx.Client):
    doc = http.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/logs",
            "/v1/jobs/{job_id}/stop", "/v1/jobs/{job_id}/resume", "/v1/jobs/{job_id}/checkpoints", "/healthz",
            "/readyz"} <= set(doc["paths"])
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    assert "rollout" in doc["components"]["schemas"]["JobSpec"]["properties"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


BAD_SPECS: list[tuple[str, Any, str, str]] = [
    # (kind, body, field path, words of the reason)
    ("unknown key", {"nmae": "x"}, "nmae", "Extra inputs are not permitted"),
    ("unknown nested key", {"train": {"stpes": 3}}, "train.stpes", "Extra inputs are not permitted"),
    ("wrong type", {"train": {"steps": "many"}}, "train.steps", "valid integer"),
    ("out of range", {"train": {"steps": 0}}, "train.steps", "greater than or equal to 1"),
    ("bad enum", {"train": {"algorithm": "ppo"}}, "train.algorithm", "'bgpo', 'naive_elbo' or 'diffu_grpo'"),
    ("bad name pattern", {"name": "../../etc"}, "name", "should match pattern"),
    ("blocks not dividing", {"rollout": {"gen_length": 20, "block_length": 6}}, "rollout",
     "gen_length 20 is not a multiple of block_length 6"),
    ("section not an object", {"model": "GSAI-ML/LLaDA-8B-Instruct"}, "model", "valid dictionary"),
    ("non-object body", [1, 2], "(body)", "valid dictionary"),
    ("invalid JSON", b'{"name": "x",', "(body)", "JSON decode error"),
    ("chunk above n_mc", {"train": {"n_mc": 2, "mc_chunk": 4}}, "train", "mc_chunk 4 exceeds n_mc 2"),
    ("tuple too short", {"train": {"betas": [0.9]}}, "train.betas.1", "Field required"),
    ("null for a number", {"train": {"lr": None}}, "train.lr", "valid number"),
    ("empty body", b"", "(body)", "Field required"),
]


@pytest.mark.parametrize("kind,body,path,reason", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_422_with_field_path_and_reason(http: httpx.Client, kind, body, path, reason):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = http.post("/v1/jobs", **kwargs)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["path"] == path and reason in e["reason"] for e in errors), errors
    assert f"{path}: " in r.json()["detail"]


def test_all_errors_of_a_spec_are_listed_and_bad_queries_are_422(http: httpx.Client):
    r = http.post("/v1/jobs", json={"train": {"steps": -1, "lr": "fast"}, "eval": {"every": 0}, "nope": 1})
    assert r.status_code == 422
    assert {e["path"] for e in r.json()["errors"]} == {"train.steps", "train.lr", "eval.every", "nope"}
    for path, params, field in [("/v1/jobs", {"limit": 0}, "query.limit"), ("/v1/jobs", {"state": "DONE"}, "query.state"),
                                ("/v1/jobs", {"cursor": "abc"}, "query.cursor")]:
        r = http.get(path, params=params)
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == field, r.text
    r = http.post("/v1/jobs", json={"name": "x"}, headers={"Idempotency-Key": "has spaces"})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "header.Idempotency-Key"
    r = http.get("/v1/jobs", params={"stat": "RUNNING"})  # a typo is not "no filter"
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query.stat", r.text
    r = http.delete("/v1/jobs")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}


def test_oversized_body_is_413(http: httpx.Client):
    big = {"name": "big", "task": {"options": {"blob": "a" * 70_000}}}
    r = http.post("/v1/jobs", json=big)
    assert r.status_code == 413 and "65536" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
        yield b'{"name": "big", "task": {"options": {"blob": "'
        for _ in range(100):
            yield b"a" * 1000
        yield b'"}}}'

    r = http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # Just under the limit is read and judged on its content (here: an unknown key).
    r = http.post("/v1/jobs", json={"name": "big", "junk": "a" * 60_000})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "junk"


def test_unknown_jobs_are_404(http: httpx.Client):
    for method, path in [("GET", "/v1/jobs/j-000000000000"), ("GET", "/v1/jobs/j-000000000000/metrics"),
                         ("GET", "/v1/jobs/j-000000000000/logs"), ("GET", "/v1/jobs/j-000000000000/checkpoints"),
                         ("POST", "/v1/jobs/j-000000000000/stop"), ("GET", "/v1/jobs/" + "x" * 300),
                         ("GET", "/v1/jobs/%00%ff..")]:
        r = http.request(method, path)
        assert r.status_code == 404 and "no job" in r.json()["detail"], (path, r.text)


def test_with_redis_and_ray_down_the_api_answers_503(tmp_path):
    dead_redis = f"redis://:pw@127.0.0.1:{free_port()}/0"
    server = ApiServer(dead_redis, f"http://127.0.0.1:{free_port()}", tmp_path).start()
    try:
        with server.http() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {"status": "unavailable", "redis": "unreachable", "ray": "unreachable"}
            for method, path, body in [("GET", "/v1/jobs", None), ("GET", "/v1/jobs/j-000000000001", None),
                                       ("POST", "/v1/jobs", tiny_spec("down"))]:
                r = http.request(method, path, json=body)
                assert r.status_code == 503 and "Redis" in r.json()["detail"], r.text
            assert http.post("/v1/jobs", json={"train": {"steps": 0}}).status_code == 422  # still validated
    finally:
        server.stop()


# ---------------------------------------------------------------- the job store on Redis


@pytest.fixture
def store(redis_server) -> JobStore:
    return JobStore.from_url(redis_server.url, prefix=f"dlrl-store-{secrets.token_hex(4)}")


def test_job_store_pages_filters_and_survives_a_new_connection(store: JobStore, redis_server):
    spec = JobSpec(name="paged")
    ids = [store.create(spec, spec, "/tmp/x")[0].id for _ in range(5)]
    store.update(ids[1], state="RUNNING")
    store.update(ids[3], state="RUNNING")
    store.update(ids[3], state="SUCCEEDED", message="done")

    seen, cursor = [], None
    while True:
        page, cursor = store.list(limit=2, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == ids[::-1]  # newest first, each job once
    assert [j.id for j in store.list("RUNNING")[0]] == [ids[1]]
    assert [j.id for j in store.list("PENDING")[0]] == [ids[4], ids[2], ids[0]]
    fresh = JobStore.from_url(redis_server.url, prefix=store.p)  # what a restarted API sees
    done = fresh.get(ids[3])
    assert done is not None and done.state == "SUCCEEDED" and done.message == "done" and done.spec["name"] == "paged"


def test_job_store_idempotency_keys(store: JobStore):
    spec, other = JobSpec(name="a"), JobSpec(name="b")
    first, created = store.create(spec, spec, "/tmp/a", idempotency_key="k1")
    again, created_again = store.create(spec, spec, "/tmp/a", idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    assert store.find_idempotent("k1", first.spec_sha256).id == first.id
    assert store.find_idempotent("unused", first.spec_sha256) is None
    with pytest.raises(IdempotencyConflict):
        store.create(other, other, "/tmp/b", idempotency_key="k1")
    store.delete(first.id)  # Ray refused the job: the key is free again
    assert store.get(first.id) is None and store.create(other, other, "/tmp/b", idempotency_key="k1")[1]


def test_metric_history_filters_and_keeps_json_finite(store: JobStore):
    spec = JobSpec(name="m")
    job = store.create(spec, spec, "/tmp/m")[0]
    store.append_metric(job.id, {"kind": "eval", "step": 0, "eval_reward": 0.25})
    for step in range(1, 4):  # a train record's step is the steps done (services.driver.progress.RunLog)
        store.append_metric(job.id, {"kind": "train", "step": step, "reward": 0.5, "version": step,
                                     "loss": float("nan") if step == 2 else 0.1})
    store.r.rpush(store._metrics(job.id), "not json", "[1]")  # foreign entries never hide the rest
    assert [r["step"] for r in store.metrics(job.id)] == [0, 1, 2, 3]
    assert [r["step"] for r in store.metrics(job.id, since=2, kind="train")] == [2, 3]
    assert store.metrics(job.id, kind="train")[1]["loss"] is None  # NaN is no JSON number
    got = store.get(job.id)
    assert got.step == 3 and got.policy_version == 3 and got.latest_eval["eval_reward"] == 0.25


def test_a_resumed_jobs_history_keeps_what_its_metrics_file_keeps(store: JobStore, tmp_path):
    """Resuming from the checkpoint of step 2 keeps the same records in Redis (JobStore.rewind_metrics)
    as the resumed run keeps in metrics.jsonl (services.driver.driver.truncate_metrics): train steps
    1..2 (a train record's step is the steps done) and the evaluation of step 0; the evaluation of
    version 2 and everything after it are done again."""
    from services.driver.driver import truncate_metrics
    from services.driver.progress import read_metrics

    spec = JobSpec(name="r")
    job = store.create(spec, spec, "/tmp/r")[0]
    records = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 1}, {"kind": "train", "step": 2},
               {"kind": "eval", "step": 2}, {"kind": "train", "step": 3}, {"kind": "train", "step": 4},
               {"kind": "eval", "step": 4}]
    for r in records:
        store.append_metric(job.id, dict(r))
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    store.rewind_metrics(job.id, 2)
    truncate_metrics(path, 2)
    kept = [(r["kind"], r["step"]) for r in store.metrics(job.id)]
    assert kept == [(r["kind"], r["step"]) for r in read_metrics(path)] == [("eval", 0), ("train", 1), ("train", 2)]


def test_metric_mirror_rides_out_a_redis_restart(tmp_path):
    server = RedisProcess().start()
    try:
        store = JobStore.from_url(server.url, timeout_s=1)
        spec = JobSpec(name="mirror")
        job = store.create(spec, spec, str(tmp_path))[0]
        mirror = MetricMirror(store, job.id)
        mirror({"kind": "train", "step": 0, "reward": 0.1, "version": 1})
        server.stop()
        mirror({"kind": "train", "step": 1, "reward": 0.2, "version": 2})  # kept, training goes on
        assert len(mirror.pending) == 1
        server.start()
        mirror({"kind": "train", "step": 2, "reward": 0.3, "version": 3})
        assert mirror.pending == []
        assert [r["step"] for r in store.metrics(job.id)] == [0, 1, 2]
        assert store.get(job.id).policy_version == 3
    finally:
        server.cleanup()


def test_metric_history_is_read_a_page_at_a_time_up_to_the_limit(store: JobStore, redis_server):
    """A long run's history is never read whole for one reply: Redis sees LRANGE over pages only
    as far as the records the reply needs (watched with MONITOR on the real server)."""
    import threading

    import redis as redis_lib

    from services.api.jobstore import METRICS_PAGE

    spec = JobSpec(name="long")
    job = store.create(spec, spec, "/tmp/long")[0]
    key = store._metrics(job.id)
    store.r.rpush(key, *[json.dumps({"kind": "train", "step": s}) for s in range(5 * METRICS_PAGE)])
    seen: list[str] = []
    watcher = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    ready = threading.Event()

    def watch() -> None:
        with watcher.monitor() as m:
            ready.set()
            for command in m.listen():
                seen.append(command["command"])
                if command["command"] == "ECHO dlrl-monitor-done":
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)
    assert [r["step"] for r in store.metrics(job.id, limit=10)] == list(range(10))
    assert [r["step"] for r in store.metrics(job.id, since=METRICS_PAGE + 3, limit=2)] == \
        [METRICS_PAGE + 3, METRICS_PAGE + 4]
    assert len(store.metrics(job.id)) == 5 * METRICS_PAGE  # the default limit: all of these
    store.r.echo("dlrl-monitor-done")
    thread.join(10)
    ranges = [c for c in seen if c.startswith("LRANGE") and key in c]
    assert ranges and not any(c.endswith(" -1") for c in ranges), ranges
    assert ranges[0].endswith(f"0 {METRICS_PAGE - 1}") and len(ranges) == 1 + 2 + 6, ranges
