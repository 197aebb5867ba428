"""The job API's response bodies (pydantic models, so /openapi.json documents them) and how a job
record becomes one."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from services.api.jobstore import JobRecord, JobState


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
    resumes: int
    """Times the job was resumed (POST /v1/jobs/{id}/resume)."""
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
                   idempotency_key=job.idempotency_key, stop_requested=job.stop_requested, resumes=job.resumes,
                   run_dir=job.run_dir,
                   latest_metrics=job.latest_metrics, latest_eval=job.latest_eval, spec=job.spec, links=links)
