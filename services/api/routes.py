"""The job API's routes: the probes, and /v1/jobs (submit, list, view, metrics, logs, stop, resume,
checkpoints). Each route is a plain function over a `JobsContext`; `services.api.api` assembles them
into the app with its error handlers and gates.

A submission passes, in order: JobSpec validation (422), the idempotency replay (200/409), the
admission policy (422, `services.api.admission`), the active-job limit and the per-token start rate
(429), then the job store and Ray (503 if down). Every /v1 request also counts against the
per-token request rate (429 with Retry-After). A resume passes the same gates but the idempotency
replay: the job's spec is admitted again under the current policy, and it starts a job.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from dlrl.config import JobSpec
from services.api.admission import AdmissionRefused, admit
from services.api.checkpoints import checkpoint_step, list_checkpoints
from services.api.jobstore import (TERMINAL, ActiveLimitReached, IdempotencyConflict, JobNotResumable, JobRecord,
                                   JobState, JobStore, new_job_id, spec_digest)
from services.api.launcher import RayJobs, RayUnavailable, job_entrypoint, job_env, wall_clock_message
from services.api.ratelimit import RateLimit, token_key
from services.api.settings import ApiSettings
from services.api.views import (CheckpointList, ErrorResponse, FieldError, Health, JobList, JobView, MetricHistory,
                            Readiness, ValidationErrorResponse, summary, view)

JOB_ID = re.compile(r"j-[0-9a-f]{12}")
"""What `services.api.jobstore.new_job_id` makes; anything else is no job (and never a Redis key)."""

_ERR = {"model": ErrorResponse}
_INVALID = {"model": ValidationErrorResponse}
_LIMITED = {"model": ErrorResponse, "description": "over a limit (a Retry-After header says when to retry a rate)"}
COMMON: dict[int | str, dict[str, Any]] = {400: _ERR, 401: _ERR, 422: _INVALID, 429: _LIMITED, 503: _ERR}
_BAD_BODY = {"model": ErrorResponse, "description": "the body is not UTF-8, its Content-Length is invalid, "
                                                    "or the request has two Authorization headers"}


def http_error(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=detail, headers=headers)


class AdmissionError(Exception):
    """A spec refused by the admission policy: answered 422 like a validation error."""

    def __init__(self, refused: AdmissionRefused) -> None:
        self.errors = [FieldError(path=p, loc=["body", *p.split(".")], reason=r, type="admission")
                       for p, r in refused.errors]


@dataclass
class JobsContext:
    """What the routes share: the settings, the job store, the Ray Jobs client, the limits."""

    settings: ApiSettings
    store: JobStore
    ray: RayJobs
    dashboard: str

    def __post_init__(self) -> None:
        self.requests = RateLimit(self.store.r, self.store.p, "requests", self.settings.rate_limit_per_minute)
        self.starts = RateLimit(self.store.r, self.store.p, "starts", self.settings.submit_limit_per_minute)

    def load(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise http_error(404, f"no job {job_id[:200]!r}")
        return job

    def refresh(self, job: JobRecord) -> JobRecord:
        """Bring the record's state up to date with Ray (the source of truth while a job runs)."""
        if job.state in TERMINAL or job.submission_id is None:
            return job
        try:
            info = self.ray.info(job.submission_id)
        except RayUnavailable:
            return job  # report what we last knew; /readyz tells that Ray is down
        if info is None:
            state, message = "FAILED", f"Ray has no record of submission {job.submission_id}"
        else:
            state, message = info[0], wall_clock_message(info[1], self.settings)
        if state == "FAILED":  # the job said why (services.cli): that line, not Ray's log excerpt
            failure = job.failure or getattr(self.store.get(job.id), "failure", None)
            message = failure or message
        if state not in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"):
            return job
        if state != job.state or message != job.message:
            job = self.store.update(job.id, state=state, message=message) or job
        return job

    def active_count(self) -> int:
        """Jobs PENDING or RUNNING, after asking Ray about each (an ended job leaves the count)."""
        jobs = [self.store.get(i) for i in self.store.ids_in("PENDING", "RUNNING")]
        return sum(1 for j in jobs if j is not None and self.refresh(j).state not in TERMINAL)

    def full(self) -> HTTPException:
        limit = self.settings.max_active_jobs
        return http_error(429, f"{limit} job(s) already pending or running (the API's limit); retry when one "
                               "ends" if limit else "the API is draining: it accepts no new jobs")

    def rate_limited(self, request: Request) -> None:
        """Dependency of every /v1 route: the per-token request rate."""
        retry = self.requests.hit(token_key(request.headers.get("authorization")))
        if retry is not None:
            raise http_error(429, f"more than {self.settings.rate_limit_per_minute} requests a minute with this "
                                  f"token; retry in {retry} s", {"Retry-After": str(retry)})


def health_router(ctx: JobsContext) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Health, responses={422: _INVALID})
    def healthz() -> Health:
        """The process serves HTTP (no token needed)."""
        return Health(status="ok")

    @router.get("/readyz", response_model=Readiness, responses={422: _INVALID, 503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        """Redis and the Ray Jobs API are reachable (no token needed); 503 otherwise."""

        def redis_ok() -> bool:
            try:
                return ctx.store.ping()
            except redis.RedisError:
                return False

        r_ok = await run_in_threadpool(redis_ok)
        ray_ok = await run_in_threadpool(ctx.ray.ping)
        body = Readiness(status="ready" if r_ok and ray_ok else "unavailable",
                         redis="ok" if r_ok else "unreachable", ray="ok" if ray_ok else "unreachable")
        return JSONResponse(status_code=200 if r_ok and ray_ok else 503, content=body.model_dump())

    return router


def jobs_router(ctx: JobsContext) -> APIRouter:
    # HTTPBearer documents the scheme in /openapi.json; services.api.gates.BearerAuth enforces it.
    api = APIRouter(prefix="/v1", tags=["jobs"], responses=COMMON,
                    dependencies=[Depends(HTTPBearer(auto_error=False, description="the API token")),
                                  Depends(ctx.rate_limited)])
    settings, store, dashboard = ctx.settings, ctx.store, ctx.dashboard

    @api.post("/jobs", status_code=201, response_model=JobView,
              responses={200: {"model": JobView, "description": "replay of an earlier submission with the "
                                                                 "same Idempotency-Key and spec"},
                         400: _BAD_BODY, 409: _ERR, 413: _ERR})
    def submit(spec: JobSpec, request: Request, response: Response,
               idempotency_key: str | None = Header(
                   None, alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
                   description="Retrying with the same key and spec returns the same job; another spec is 409."),
               ) -> JobView:
        """Submit a job: the body is a JobSpec (the same fields as the TOML file of `dlrl train`),
        admitted by the API's policy (services/README.md)."""
        if idempotency_key is not None:
            try:
                earlier = store.find_idempotent(idempotency_key, spec_digest(spec))
            except IdempotencyConflict as exc:
                raise http_error(409, str(exc)) from exc
            if earlier is not None:
                response.status_code = 200
                return view(ctx.refresh(earlier), dashboard)
        try:
            admitted = admit(spec, settings.admission)
        except AdmissionRefused as exc:
            raise AdmissionError(exc) from exc
        limit = settings.max_active_jobs
        if limit is not None and ctx.active_count() >= limit:  # early, so a refusal uses no start
            raise ctx.full()
        retry = ctx.starts.hit(token_key(request.headers.get("authorization")))
        if retry is not None:
            raise http_error(429, f"more than {settings.submit_limit_per_minute} jobs a minute with this token; "
                                  f"retry in {retry} s", {"Retry-After": str(retry)})
        job_id = new_job_id()
        out_dir = settings.runs_dir / job_id
        effective = admitted.model_copy(
            update={"runtime": admitted.runtime.model_copy(update={"out_dir": str(out_dir)})})
        try:  # the limit holds here, atomically: the count above may be stale by now
            job, created = store.create(effective, spec, str(out_dir / spec.name), job_id, idempotency_key,
                                        max_active=limit)
        except IdempotencyConflict as exc:
            raise http_error(409, str(exc)) from exc
        except ActiveLimitReached as exc:
            raise ctx.full() from exc
        if not created:
            response.status_code = 200
            return view(ctx.refresh(job), dashboard)
        submission_id = f"dlrl-{job.id}"
        try:
            ctx.ray.submit(submission_id, job_entrypoint(settings, job.id), job_env(settings, effective, job.id),
                           {"dlrl_job_id": job.id, "dlrl_name": job.name})
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
                ctx.refresh(job)
        jobs, next_cursor = store.list(state, limit, cursor)
        return JobList(jobs=[summary(j) for j in jobs], next_cursor=next_cursor)

    @api.get("/jobs/{job_id}", response_model=JobView, responses={404: _ERR})
    def get_job(job_id: str) -> JobView:
        """State, progress, latest metrics, policy version and dashboard links of one job."""
        return view(ctx.refresh(ctx.load(job_id)), dashboard)

    @api.get("/jobs/{job_id}/metrics", response_model=MetricHistory, responses={404: _ERR})
    def metrics(job_id: str, since: int | None = Query(None, ge=0, description="only records with step >= since"),
                kind: Literal["train", "eval"] | None = Query(None),
                limit: int = Query(10_000, ge=1, le=10_000, description="at most this many records; "
                                                                      "page on with since")) -> MetricHistory:
        """The job's metric history: one record per learner step (kind=train) and evaluation (kind=eval)."""
        ctx.load(job_id)
        records = store.metrics(job_id, since=since, kind=kind, limit=limit)
        return MetricHistory(job_id=job_id, count=len(records), records=records)

    # Errors are JSON like everywhere else, so the route's default class stays JSON; the text/plain
    # 200 is documented by hand.
    @api.get("/jobs/{job_id}/logs", response_model=None,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "the log text (a stream with follow=true)"},
                        404: _ERR})
    async def logs(job_id: str, tail: int = Query(200, ge=0, le=100_000, description="last lines (0: all)"),
                   follow: bool = Query(False, description="stream the whole log until the job ends")) -> Response:
        """The Ray Job's log: its last `tail` lines, or (follow) a stream that ends with the job. A
        reply carries at most the server's max_log_bytes (the log's end, after a line saying so)."""
        job = await run_in_threadpool(ctx.load, job_id)
        if job.submission_id is None:
            return PlainTextResponse("")
        sid = job.submission_id
        if not follow:
            cap = settings.max_log_bytes
            text, cut = await run_in_threadpool(ctx.ray.logs, sid, tail, cap)
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:] if tail else lines)
            if cut:
                text = f"[dlrl: earlier lines left out: a reply carries the log's last {cap} bytes at most]\n" + text
            return PlainTextResponse(text)
        await run_in_threadpool(ctx.ray.connect)  # 503 now, not a broken stream, when Ray is down

        async def stream() -> AsyncIterator[str]:
            try:
                async for chunk in ctx.ray.follow(sid):
                    yield chunk
            except Exception as exc:  # noqa: BLE001 - the stream's status line is already sent: say it in-band
                yield f"\n[dlrl: log stream ended: {exc}]\n"

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    @api.post("/jobs/{job_id}/stop", status_code=202, response_model=JobView,
              responses={400: _BAD_BODY, 404: _ERR, 409: _ERR, 413: _ERR})
    def stop(job_id: str) -> JobView:
        """Ask Ray to stop a pending or running job (it reaches STOPPED); 409 if it already ended."""
        job = ctx.refresh(ctx.load(job_id))
        if job.state in TERMINAL:
            raise http_error(409, f"job {job_id} already ended ({job.state})")
        if job.submission_id is not None:
            ctx.ray.stop(job.submission_id)
        job = store.update(job.id, stop_requested=True) or job
        return view(ctx.refresh(job), dashboard)

    @api.post("/jobs/{job_id}/resume", status_code=202, response_model=JobView,
              responses={400: _BAD_BODY, 404: _ERR, 409: _ERR, 413: _ERR})
    def resume(job_id: str, request: Request) -> JobView:
        """Start a STOPPED or FAILED job again from its last checkpoint, in the same run folder
        (`dlrl train --resume`); 409 if it runs, succeeded, or has no checkpoint yet. Its spec is
        admitted again under the API's current policy (422), and the resume counts as a start
        against the active-job limit and the per-token start rate (429)."""
        job = ctx.refresh(ctx.load(job_id))
        if job.state not in ("STOPPED", "FAILED"):
            raise http_error(409, f"job {job_id} is {job.state}: only a STOPPED or FAILED job resumes")
        run = Path(job.run_dir)  # a save killed between its renames left checkpoint.old (learner.train)
        step = checkpoint_step(run / "checkpoint")
        step = checkpoint_step(run / "checkpoint.old") if step is None else step
        if step is None:
            raise http_error(409, f"job {job_id} has no checkpoint to resume from: it stopped before its first "
                                  f"(runtime.checkpoint_every; default every eval.every steps)")
        try:
            admitted = admit(JobSpec.model_validate(job.spec), settings.admission)
        except AdmissionRefused as exc:
            raise AdmissionError(exc) from exc
        effective = admitted.model_copy(update={"runtime": admitted.runtime.model_copy(
            update={"out_dir": job.spec["runtime"]["out_dir"]})})  # the same run folder
        limit = settings.max_active_jobs
        if limit is not None and ctx.active_count() >= limit:
            raise ctx.full()
        retry = ctx.starts.hit(token_key(request.headers.get("authorization")))
        if retry is not None:
            raise http_error(429, f"more than {settings.submit_limit_per_minute} jobs a minute with this token; "
                                  f"retry in {retry} s", {"Retry-After": str(retry)})
        before = job.state
        try:  # the state and the limit are checked again here, atomically
            job = store.reopen(job, effective, step, max_active=limit)
        except JobNotResumable as exc:
            raise http_error(409, str(exc)) from exc
        except ActiveLimitReached as exc:
            raise ctx.full() from exc
        submission_id = f"dlrl-{job.id}-r{job.resumes}"
        try:
            ctx.ray.submit(submission_id, job_entrypoint(settings, job.id, resume=True),
                           job_env(settings, effective, job.id), {"dlrl_job_id": job.id, "dlrl_name": job.name})
        except RayUnavailable:  # nothing runs: back to where it was, and the client may retry
            store.update(job.id, state=before, message="resume failed: Ray was unavailable")
            raise
        job = store.update(job.id, submission_id=submission_id) or job
        return view(job, dashboard)

    @api.get("/jobs/{job_id}/checkpoints", response_model=CheckpointList, responses={404: _ERR})
    def checkpoints(job_id: str) -> CheckpointList:
        """Checkpoint folders the run has written (HF format: from_pretrained loads them)."""
        job = ctx.load(job_id)
        return CheckpointList(job_id=job.id, run_dir=job.run_dir, checkpoints=list_checkpoints(Path(job.run_dir)))

    return api
