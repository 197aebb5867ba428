"""The job API: submit, watch and stop dlrl RL jobs over HTTP (FastAPI; `dlrl serve` runs it).

A submission's body *is* a `dlrl.config.JobSpec`, the same type as the TOML file of `dlrl train`.
Each accepted job runs as a Ray Job (ray.job_submission), so it appears in the Ray dashboard with
its logs; its entrypoint is `dlrl train --spec-env DLRL_JOB_SPEC --job-id <id>`, which reads the
validated spec as JSON from its runtime environment (never a pickle) and mirrors every metrics
record into Redis. The API itself is stateless: job records and metric history live in Redis
(`services.jobstore`), and job states are read back from Ray, so a restarted API reports the same
jobs.

    DLRL_API_TOKEN=... DLRL_REDIS_URL=redis://:pw@127.0.0.1:6379/0 \
    DLRL_RAY_ADDRESS=http://127.0.0.1:8265 dlrl serve --host 127.0.0.1 --port 8000

Every route but /healthz and /readyz needs `Authorization: Bearer <token>`. A client mistake is
never a 500: bad specs are 422 with the field path and reason, oversized bodies 413, unknown jobs
404, stopping a finished job 409, Redis or Ray unreachable 503.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from dlrl.config import JobSpec
from services.jobstore import (TERMINAL, IdempotencyConflict, JobRecord, JobState, JobStore, new_job_id,
                               spec_digest)

API_VERSION = "0.1.0"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: no token, and they reveal only ok/not ok
SPEC_ENV = "DLRL_JOB_SPEC"
SUBMIT_TIMEOUT_S = 120.0


class ConfigError(Exception):
    """The server's own settings are unusable (it refuses to start)."""


# ---------------------------------------------------------------- settings


def read_token(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The API token: DLRL_API_TOKEN, else the contents of the file DLRL_API_TOKEN_FILE (a secret mount)."""
    token = environ.get("DLRL_API_TOKEN", "").strip()
    if token:
        return token
    path = environ.get("DLRL_API_TOKEN_FILE", "").strip()
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read DLRL_API_TOKEN_FILE {path}: {exc}") from exc
        if not token:
            raise ConfigError(f"DLRL_API_TOKEN_FILE {path} is empty")
        return token
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ApiSettings:
    token: str | None
    """Bearer token every protected route requires; None only when serving open on loopback."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "dlrl"
    """Prefix of every Redis key of the job store (several deployments can share one Redis)."""
    ray_address: str = "http://127.0.0.1:8265"
    """The Ray dashboard / Jobs API URL the jobs are submitted to."""
    dashboard_url: str | None = None
    """Base of the dashboard links in job views (None: ray_address), e.g. a URL reachable by users."""
    runs_dir: Path = field(default_factory=lambda: Path("runs").resolve())
    """Job runs are written to <runs_dir>/<job id>/<name>/ (must be shared with the Ray nodes)."""
    max_body_bytes: int = 64 * 1024
    max_active_jobs: int | None = None
    """Jobs PENDING or RUNNING at once before submissions get 429 (None: no limit; 0: drain)."""
    job_command: tuple[str, ...] = (sys.executable, "-m", "services.cli")
    """The `dlrl` command as the Ray nodes run it (default: this interpreter's)."""
    ray_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ = os.environ, **overrides: Any) -> "ApiSettings":
        def pick(name: str, default: Any) -> Any:
            return environ.get(name) or default

        max_active = pick("DLRL_MAX_ACTIVE_JOBS", None)
        command = pick("DLRL_JOB_COMMAND", None)
        values: dict[str, Any] = dict(
            token=read_token(environ),
            redis_url=pick("DLRL_REDIS_URL", cls.redis_url),
            redis_prefix=pick("DLRL_REDIS_PREFIX", cls.redis_prefix),
            ray_address=pick("DLRL_RAY_ADDRESS", cls.ray_address),
            dashboard_url=pick("DLRL_RAY_DASHBOARD_URL", None),
            runs_dir=Path(pick("DLRL_RUNS_DIR", "runs")).resolve(),
            max_active_jobs=int(max_active) if max_active is not None else None,
        )
        if command:
            values["job_command"] = tuple(shlex.split(command))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ---------------------------------------------------------------- Ray Jobs


class RayUnavailable(Exception):
    """The Ray Jobs API could not be reached or refused the request."""


def _timed_client_class() -> type:
    from ray.job_submission import JobSubmissionClient

    class TimedJobSubmissionClient(JobSubmissionClient):
        """The SDK's client, with a timeout on every HTTP request (its own requests wait forever)."""

        timeout_s: float = 10.0

        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self.timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return TimedJobSubmissionClient


class RayJobs:
    """The Ray Jobs API of the cluster the jobs run on; connects lazily, so the API starts (and
    /readyz says 503) while Ray is down."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    def connect(self) -> Any:
        with self._lock:
            if self._client is None:
                cls = _timed_client_class()
                cls.timeout_s = self.timeout_s
                try:
                    self._client = cls(self.address)
                except Exception as exc:  # ConnectionError, auth errors, bad address: all "Ray is not usable"
                    raise RayUnavailable(f"Ray Jobs API at {self.address}: {exc}") from exc
            return self._client

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        client = self.connect()
        try:
            return fn(client)
        except Exception as exc:
            if "does not exist" in str(exc):
                raise KeyError(what) from exc
            with self._lock:
                self._client = None  # a restarted cluster may have a new token: reconnect next time
            raise RayUnavailable(f"Ray Jobs API ({what}): {exc}") from exc

    def ping(self) -> bool:
        try:
            self._call("version", lambda c: c.get_version())
            return True
        except (RayUnavailable, KeyError):
            return False

    def submit(self, submission_id: str, entrypoint: str, env: dict[str, str], metadata: dict[str, str]) -> str:
        def go(c: Any) -> str:
            # Ray answers once the job's supervisor actor exists: the first job on a fresh (or busy)
            # cluster can take tens of seconds, so submission gets a longer timeout than the rest.
            c.timeout_s = max(self.timeout_s, SUBMIT_TIMEOUT_S)
            deadline = time.monotonic() + SUBMIT_TIMEOUT_S
            try:
                while True:
                    try:
                        return c.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                            runtime_env={"env_vars": env}, metadata=metadata)
                    except RuntimeError as exc:
                        if "already exists" in str(exc):  # a retry after Ray accepted it: same job
                            return submission_id
                        # A head node that just started has no job agent yet; Ray says to retry.
                        if "No available agent" not in str(exc) or time.monotonic() > deadline:
                            raise
                        time.sleep(1.0)
            finally:
                c.timeout_s = self.timeout_s

        return self._call("submit", go)

    def info(self, submission_id: str) -> tuple[str, str | None] | None:
        """(status, message) of the Ray Job, or None when Ray has no such job."""
        try:
            info = self._call("info", lambda c: c.get_job_info(submission_id))
        except KeyError:
            return None
        status = getattr(info.status, "value", str(info.status))
        return status, info.message

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self._call("stop", lambda c: c.stop_job(submission_id)))
        except KeyError:
            return False

    def logs(self, submission_id: str) -> str:
        try:
            return self._call("logs", lambda c: c.get_job_logs(submission_id))
        except KeyError:
            return ""

    async def follow(self, submission_id: str) -> AsyncIterator[str]:
        """The job's log from the start, then as it is written; ends when the job ends."""
        client = self.connect()
        async for chunk in client.tail_job_logs(submission_id):
            yield chunk


# ---------------------------------------------------------------- response models


class FieldError(BaseModel):
    path: str
    """Dotted field path, e.g. rollout.block_length ("(body)" for the body as a whole)."""
    loc: list[str | int]
    reason: str
    type: str


class ErrorResponse(BaseModel):
    detail: str


class ValidationErrorResponse(BaseModel):
    detail: str
    errors: list[FieldError]


class Progress(BaseModel):
    step: int
    """Learner steps done."""
    total_steps: int
    fraction: float


class Links(BaseModel):
    self: str
    metrics: str
    logs: str
    checkpoints: str
    dashboard: str
    """The Ray dashboard."""
    dashboard_job: str | None
    """This job's page in the Ray dashboard (its logs, driver and actors)."""


class JobSummary(BaseModel):
    id: str
    name: str
    state: JobState
    created: float
    updated: float
    progress: Progress
    policy_version: int | None
    reward: float | None
    """Rollout reward of the latest learner step."""
    eval_reward: float | None
    """Held-out reward of the latest evaluation."""


class JobView(JobSummary):
    message: str | None
    submission_id: str | None
    idempotency_key: str | None
    stop_requested: bool
    run_dir: str
    latest_metrics: dict[str, Any] | None
    latest_eval: dict[str, Any] | None
    spec: dict[str, Any]
    links: Links


class JobList(BaseModel):
    jobs: list[JobSummary]
    next_cursor: int | None
    """Pass as `cursor` for the next page (None: this was the last page)."""


class MetricHistory(BaseModel):
    job_id: str
    count: int
    records: list[dict[str, Any]]


class CheckpointInfo(BaseModel):
    name: str
    path: str
    """Relative to the run directory."""
    step: int | None
    """Learner steps done when it was saved (from its resume state; None if it has none)."""
    policy_version: int | None
    size_bytes: int
    mtime: float


class CheckpointList(BaseModel):
    job_id: str
    run_dir: str
    checkpoints: list[CheckpointInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    redis: Literal["ok", "unreachable"]
    ray: Literal["ok", "unreachable"]


def _num(record: dict[str, Any] | None, key: str) -> float | None:
    value = (record or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summary(job: JobRecord) -> JobSummary:
    return JobSummary(
        id=job.id, name=job.name, state=job.state, created=job.created, updated=job.updated,
        progress=Progress(step=job.step, total_steps=job.total_steps,
                          fraction=min(job.step / max(job.total_steps, 1), 1.0)),
        policy_version=job.policy_version, reward=_num(job.latest_metrics, "reward"),
        eval_reward=_num(job.latest_eval, "eval_reward"))


def view(job: JobRecord, dashboard: str) -> JobView:
    base = f"/v1/jobs/{job.id}"
    links = Links(self=base, metrics=f"{base}/metrics", logs=f"{base}/logs", checkpoints=f"{base}/checkpoints",
                  dashboard=dashboard,
                  dashboard_job=f"{dashboard}/#/jobs/{job.submission_id}" if job.submission_id else None)
    return JobView(**summary(job).model_dump(), message=job.message, submission_id=job.submission_id,
                   idempotency_key=job.idempotency_key, stop_requested=job.stop_requested, run_dir=job.run_dir,
                   latest_metrics=job.latest_metrics, latest_eval=job.latest_eval, spec=job.spec, links=links)


# ---------------------------------------------------------------- checkpoints on disk

_CHECKPOINT_MARKERS = ("config.json", "adapter_config.json", "model.safetensors", "adapter_model.safetensors")


def list_checkpoints(run_dir: Path, max_depth: int = 3) -> list[CheckpointInfo]:
    """HF checkpoint folders under the run directory (half-written `.tmp-*` / `.old` ones skipped)."""
    found: list[CheckpointInfo] = []
    if not run_dir.is_dir():
        return found
    for root, dirs, files in os.walk(run_dir):
        here = Path(root)
        depth = len(here.relative_to(run_dir).parts)
        dirs[:] = sorted(d for d in dirs if ".tmp-" not in d and not d.endswith(".old")) if depth < max_depth else []
        if depth == 0 or not any(m in files for m in _CHECKPOINT_MARKERS):
            continue
        size, mtime = 0, 0.0
        for sub, _, names in os.walk(here):
            for name in names:
                try:
                    st = (Path(sub) / name).stat()
                except OSError:
                    continue  # replaced while we looked
                size += st.st_size
                mtime = max(mtime, st.st_mtime)
        step, version = _checkpoint_step(here)
        found.append(CheckpointInfo(name=here.name, path=str(here.relative_to(run_dir)), step=step,
                                    policy_version=version, size_bytes=size, mtime=mtime))
    return found


def _checkpoint_step(path: Path) -> tuple[int | None, int | None]:
    """(learner step, policy version) from the resume state saved with the checkpoint, if any."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(state, dict):
        return None, None
    step = state.get("step")
    version = state.get("version")
    return (step if isinstance(step, int) else None), (version if isinstance(version, int) else None)


# ---------------------------------------------------------------- ASGI gates

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class BearerAuth:
    """Rejects every request but the probes without `Authorization: Bearer <token>` — before the
    body is read, so an unauthenticated client learns nothing about what it sent."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
            return await self.app(scope, receive, send)
        await _send_json(send, 401, {"detail": "missing or invalid bearer token"},
                         [(b"www-authenticate", b'Bearer realm="dlrl"')])


class BodyLimit:
    """Reads at most `max_bytes` of a request body (by Content-Length or as it streams in), 413 beyond."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = {"detail": f"request body larger than {self.max_bytes} bytes"}
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_json(send, 400, {"detail": "invalid Content-Length"})
            if int(length) > self.max_bytes:
                return await _send_json(send, 413, too_big)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _send_json(send, 413, too_big)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect, which ends a streaming response

        await self.app(scope, replay, send)


# ---------------------------------------------------------------- the app


def _field_errors(exc: RequestValidationError) -> list[FieldError]:
    out = []
    for err in exc.errors():
        loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        parts = loc[1:] if loc[:1] == ["body"] else loc
        reason = str(err.get("msg", "invalid"))
        ctx_error = (err.get("ctx") or {}).get("error")
        if err.get("type") == "json_invalid" and ctx_error:
            reason = f"{reason}: {ctx_error}"
            parts = []  # the position pydantic puts in loc is a character offset, not a field
        out.append(FieldError(path=".".join(str(p) for p in parts) or "(body)", loc=loc, reason=reason,
                              type=str(err.get("type", "invalid"))))
    return out


_ERR = {"model": ErrorResponse}
_INVALID = {"model": ValidationErrorResponse}
_COMMON: dict[int | str, dict[str, Any]] = {401: _ERR, 422: _INVALID, 503: _ERR}
_BAD_BODY = {"model": ErrorResponse, "description": "the body is not UTF-8 or its Content-Length is invalid"}


def reject_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not take: a typo (?stat=RUNNING) must not silently
    mean "no filter", as an unknown spec key must not silently fall back to a default."""
    route = request.scope.get("route")
    # The endpoint's own query parameters (its dependencies take none).
    known = {p.alias for p in route.dependant.query_params} if isinstance(route, APIRoute) else set()
    unknown = [k for k in request.query_params.keys() if k not in known]
    if unknown:
        raise RequestValidationError([{"type": "extra_forbidden", "loc": ("query", k),
                                       "msg": "Unknown query parameter"} for k in unknown])


def create_app(settings: ApiSettings, store: JobStore | None = None) -> FastAPI:
    """The FastAPI app; `store` defaults to a JobStore on settings.redis_url."""
    store = store or JobStore.from_url(settings.redis_url, settings.redis_prefix)
    ray_jobs = RayJobs(settings.ray_address, settings.ray_timeout_s)
    dashboard = (settings.dashboard_url or settings.ray_address).rstrip("/")

    app = FastAPI(title="dlrl job API", version=API_VERSION, docs_url=None, redoc_url=None,
                  dependencies=[Depends(reject_unknown_query)],
                  description="Submit, watch and stop RL jobs for diffusion language models. "
                              "Authenticate with `Authorization: Bearer <token>`.")
    app.state.settings, app.state.store, app.state.ray = settings, store, ray_jobs

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        return JSONResponse(status_code=422, content=ValidationErrorResponse(
            detail="invalid request: " + "; ".join(f"{e.path}: {e.reason}" for e in errors[:10]),
            errors=errors).model_dump())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette's Allow names the methods of one route; HTTP wants all the path's methods.
        allowed = [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
                   if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in app.router.routes)]
        return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allowed)})

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"job store (Redis) unavailable: {exc}"})

    @app.exception_handler(RayUnavailable)
    async def _ray_down(request: Request, exc: RayUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.get("/healthz", response_model=Health, responses={422: _INVALID}, tags=["health"])
    def healthz() -> Health:
        """The process serves HTTP (no token needed)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, responses={422: _INVALID, 503: {"model": Readiness}},
             tags=["health"])
    async def readyz() -> JSONResponse:
        """Redis and the Ray Jobs API are reachable (no token needed); 503 otherwise."""

        def redis_ok() -> bool:
            try:
                return store.ping()
            except redis.RedisError:
                return False

        r_ok = await run_in_threadpool(redis_ok)
        ray_ok = await run_in_threadpool(ray_jobs.ping)
        body = Readiness(status="ready" if r_ok and ray_ok else "unavailable",
                         redis="ok" if r_ok else "unreachable", ray="ok" if ray_ok else "unreachable")
        return JSONResponse(status_code=200 if r_ok and ray_ok else 503, content=body.model_dump())

    # Documents the scheme in /openapi.json; BearerAuth (below) is what enforces it.
    api = APIRouter(prefix="/v1", tags=["jobs"], responses=_COMMON,
                    dependencies=[Depends(HTTPBearer(auto_error=False, description="the API token"))])

    def load(job_id: str) -> JobRecord:
        job = store.get(job_id) if len(job_id) <= 128 else None
        if job is None:
            raise _http(404, f"no job {job_id!r}")
        return job

    def refresh(job: JobRecord) -> JobRecord:
        """Bring the record's state up to date with Ray (the source of truth while a job runs)."""
        if job.state in TERMINAL or job.submission_id is None:
            return job
        try:
            info = ray_jobs.info(job.submission_id)
        except RayUnavailable:
            return job  # report what we last knew; /readyz tells that Ray is down
        if info is None:
            state, message = "FAILED", f"Ray has no record of submission {job.submission_id}"
        else:
            state, message = info
        if state not in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"):
            return job
        if state != job.state or message != job.message:
            job = store.update(job.id, state=state, message=message) or job
        return job

    def active_count() -> int:
        jobs = [store.get(i) for i in store.ids_in("PENDING", "RUNNING")]
        return sum(1 for j in jobs if j is not None and refresh(j).state not in TERMINAL)

    @api.post("/jobs", status_code=201, response_model=JobView,
              responses={200: {"model": JobView, "description": "replay of an earlier submission with the "
                                                                 "same Idempotency-Key and spec"},
                         400: _BAD_BODY, 409: _ERR, 413: _ERR, 429: _ERR})
    def submit(spec: JobSpec, response: Response,
               idempotency_key: str | None = Header(
                   None, alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
                   description="Retrying with the same key and spec returns the same job; another spec is 409."),
               ) -> JobView:
        """Submit a job: the body is a JobSpec (the same fields as the TOML file of `dlrl train`)."""
        if idempotency_key is not None:
            try:
                earlier = store.find_idempotent(idempotency_key, spec_digest(spec))
            except IdempotencyConflict as exc:
                raise _http(409, str(exc)) from exc
            if earlier is not None:
                response.status_code = 200
                return view(refresh(earlier), dashboard)
        limit = settings.max_active_jobs
        if limit is not None and active_count() >= limit:
            raise _http(429, f"{limit} job(s) already pending or running (the API's limit)" if limit
                        else "the API is draining: it accepts no new jobs")
        job_id = new_job_id()
        out_dir = settings.runs_dir / job_id
        effective = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"out_dir": str(out_dir)})})
        try:
            job, created = store.create(effective, spec, str(out_dir / spec.name), job_id, idempotency_key)
        except IdempotencyConflict as exc:
            raise _http(409, str(exc)) from exc
        if not created:
            response.status_code = 200
            return view(refresh(job), dashboard)
        submission_id = f"dlrl-{job.id}"
        entrypoint = shlex.join([*settings.job_command, "train", "--spec-env", SPEC_ENV, "--job-id", job.id])
        env = {SPEC_ENV: effective.model_dump_json(), "DLRL_JOB_ID": job.id,
               "DLRL_REDIS_URL": settings.redis_url, "DLRL_REDIS_PREFIX": settings.redis_prefix}
        try:
            ray_jobs.submit(submission_id, entrypoint, env, {"dlrl_job_id": job.id, "dlrl_name": job.name})
        except RayUnavailable:
            store.delete(job.id)  # nothing runs: the client is told (503) and may retry with the same key
            raise
        job = store.update(job.id, submission_id=submission_id) or job
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return view(job, dashboard)

    @api.get("/jobs", response_model=JobList)
    def list_jobs(state: JobState | None = Query(None, description="only jobs in this state"),
                  limit: int = Query(20, ge=1, le=200),
                  cursor: int | None = Query(None, ge=0, le=2**53, description="next_cursor of the previous page"),
                  ) -> JobList:
        """Jobs, newest first, a page at a time."""
        for job_id in store.ids_in("PENDING", "RUNNING"):  # so the state filter sees current states
            if (job := store.get(job_id)) is not None:
                refresh(job)
        jobs, next_cursor = store.list(state, limit, cursor)
        return JobList(jobs=[summary(j) for j in jobs], next_cursor=next_cursor)

    @api.get("/jobs/{job_id}", response_model=JobView, responses={404: _ERR})
    def get_job(job_id: str) -> JobView:
        """State, progress, latest metrics, policy version and dashboard links of one job."""
        return view(refresh(load(job_id)), dashboard)

    @api.get("/jobs/{job_id}/metrics", response_model=MetricHistory,
             responses={404: _ERR})
    def metrics(job_id: str, since: int | None = Query(None, ge=0, description="only records with step >= since"),
                kind: Literal["train", "eval"] | None = Query(None),
                limit: int = Query(10_000, ge=1, le=100_000)) -> MetricHistory:
        """The job's metric history: one record per learner step (kind=train) and evaluation (kind=eval)."""
        load(job_id)
        records = store.metrics(job_id, since=since, kind=kind, limit=limit)
        return MetricHistory(job_id=job_id, count=len(records), records=records)

    # Errors are JSON like everywhere else, so the route's default class stays JSON; the text/plain
    # 200 is documented by hand.
    @api.get("/jobs/{job_id}/logs", response_model=None,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "the log text (a stream with follow=true)"},
                        404: _ERR})
    async def logs(job_id: str, tail: int = Query(200, ge=0, le=1_000_000, description="last lines (0: all)"),
                   follow: bool = Query(False, description="stream the whole log until the job ends")) -> Response:
        """The Ray Job's log: its last `tail` lines, or (follow) a stream that ends with the job."""
        job = await run_in_threadpool(load, job_id)
        if job.submission_id is None:
            return PlainTextResponse("")
        sid = job.submission_id
        if not follow:
            text = await run_in_threadpool(ray_jobs.logs, sid)
            lines = text.splitlines(keepends=True)
            return PlainTextResponse("".join(lines[-tail:] if tail else lines))
        await run_in_threadpool(ray_jobs.connect)  # 503 now, not a broken stream, when Ray is down

        async def stream() -> AsyncIterator[str]:
            try:
                async for chunk in ray_jobs.follow(sid):
                    yield chunk
            except Exception as exc:  # the stream's status line is already sent: say it in-band
                yield f"\n[dlrl: log stream ended: {exc}]\n"

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    @api.post("/jobs/{job_id}/stop", status_code=202, response_model=JobView,
              responses={400: _BAD_BODY, 404: _ERR, 409: _ERR, 413: _ERR})
    def stop(job_id: str) -> JobView:
        """Ask Ray to stop a pending or running job (it reaches STOPPED); 409 if it already ended."""
        job = refresh(load(job_id))
        if job.state in TERMINAL:
            raise _http(409, f"job {job_id} already ended ({job.state})")
        if job.submission_id is not None:
            ray_jobs.stop(job.submission_id)
        job = store.update(job.id, stop_requested=True) or job
        return view(refresh(job), dashboard)

    @api.get("/jobs/{job_id}/checkpoints", response_model=CheckpointList, responses={404: _ERR})
    def checkpoints(job_id: str) -> CheckpointList:
        """Checkpoint folders the run has written (HF format: from_pretrained loads them)."""
        job = load(job_id)
        return CheckpointList(job_id=job.id, run_dir=job.run_dir, checkpoints=list_checkpoints(Path(job.run_dir)))

    app.include_router(api)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)
            # FastAPI adds a JSON body to every 200; the log route's 200 is text only.
            doc["paths"]["/v1/jobs/{job_id}/logs"]["get"]["responses"]["200"]["content"].pop("application/json", None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Outermost first: the token is checked before a byte of the body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BearerAuth, token=settings.token)
    return app


def _http(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def serve(settings: ApiSettings, host: str = "127.0.0.1", port: int = 8000, insecure_open: bool = False,
          log_level: str = "info") -> None:
    """Run the API with uvicorn until SIGTERM/SIGINT. Without a token it runs only when told to
    (`insecure_open`) and only on a loopback address."""
    import uvicorn

    if settings.token is None:
        if not insecure_open:
            raise ConfigError("no API token: set DLRL_API_TOKEN or DLRL_API_TOKEN_FILE "
                              "(or --insecure-open, on a loopback host only)")
        if not is_loopback(host):
            raise ConfigError(f"--insecure-open is allowed on a loopback host only, not {host}")
    app = create_app(settings)
    print(f"dlrl: job API on http://{host}:{port} (Ray {settings.ray_address}, runs in {settings.runs_dir})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
