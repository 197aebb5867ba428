"""Job records and metric history in Redis: what the job API remembers across restarts.

The API process keeps nothing in memory that matters: every job it accepted is a Redis hash, its
metrics a Redis list that the running Ray Job appends to (through `MetricMirror`, the `on_record`
sink of `services.driver.driver.run`), and sorted sets index the jobs for listing. A restarted API (or a
second replica) therefore reports the same jobs, and a job's metrics keep arriving while no API
runs at all.

Everything read back is parsed as JSON and validated; nothing is ever unpickled or evaluated.

Keys, under a configurable prefix (default "dlrl"):

    <p>:job:<id>             hash: one JSON-encoded value per field of `JobRecord`
    <p>:job:<id>:metrics     list: one JSON object per metrics record, in the order written
    <p>:jobs                 zset: id -> creation sequence number (paging, newest first)
    <p>:jobs:<STATE>         zset: the same, for the jobs currently in STATE (filter by state)
    <p>:jobs:seq             counter behind the sequence numbers (the paging cursor)
    <p>:idem:<sha256(key)>   string: the job id an Idempotency-Key created
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from typing import Any, Literal

import redis
from pydantic import BaseModel

from dlrl.config import JobSpec

log = logging.getLogger(__name__)

JobState = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]
STATES: tuple[str, ...] = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ID_PREFIX = "j-"
IDEMPOTENCY_TTL_S = 7 * 24 * 3600  # a retried submission is honoured for a week
METRICS_PAGE = 500
"""Metric records read from Redis at a time."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was already used for a different job spec."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Idempotency-Key already used for job {job_id} with a different spec")
        self.job_id = job_id


class ActiveLimitReached(Exception):
    """`count` jobs are already PENDING or RUNNING: the API's `max_active_jobs` allows no more."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} job(s) already pending or running")
        self.count = count


_CREATE = """
-- KEYS: job hash, all-jobs index, PENDING index, RUNNING index, sequence counter[, idempotency key]
-- ARGV: max active jobs (-1: no limit), job id, idempotency TTL (s), then the record's field/value pairs
if KEYS[6] then
  local earlier = redis.call('GET', KEYS[6])
  if earlier then return {'replay', earlier} end
end
local limit = tonumber(ARGV[1])
local active = redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[4])
if limit >= 0 and active >= limit then return {'full', tostring(active)} end
if KEYS[6] then redis.call('SET', KEYS[6], ARGV[2], 'EX', tonumber(ARGV[3])) end
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], seq, ARGV[2])
redis.call('ZADD', KEYS[3], seq, ARGV[2])
return {'created', tostring(seq)}
"""
"""Claim, count and create in one step (Redis runs a script without interleaving other commands)."""


_REOPEN = """
-- KEYS: job hash, all-jobs index, PENDING index, RUNNING index, STOPPED index, FAILED index
-- ARGV: max active jobs (-1: no limit), job id, then the resumed record's field/value pairs
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
local from
if state == '"STOPPED"' then from = KEYS[5] elseif state == '"FAILED"' then from = KEYS[6]
else return {'state', state} end
local limit = tonumber(ARGV[1])
local active = redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[4])
if limit >= 0 and active >= limit then return {'full', tostring(active)} end
local seq = redis.call('ZSCORE', KEYS[2], ARGV[2]) or 0
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZREM', from, ARGV[2])
redis.call('ZADD', KEYS[3], seq, ARGV[2])
return {'reopened', ''}
"""
"""Check the state, count and move the job to PENDING in one step: of two concurrent resumes of one
job only one starts it, and the active-job limit holds as for a submission (`_CREATE`)."""


class JobNotResumable(Exception):
    """The job is not STOPPED or FAILED (it runs, or it succeeded), or is gone."""


class JobRecord(BaseModel):
    """What the store knows about one job (the API's responses are built from it)."""

    id: str
    name: str
    state: JobState = "PENDING"
    message: str | None = None
    created: float
    updated: float
    submission_id: str | None = None
    """The Ray Job's submission id (set once Ray accepted the job)."""
    idempotency_key: str | None = None
    spec: dict[str, Any]
    """The effective JobSpec the job runs (the API sets runtime.out_dir)."""
    spec_sha256: str
    """Hash of the spec as submitted: an Idempotency-Key replay must carry the same one."""
    run_dir: str
    total_steps: int
    step: int = 0
    """Learner steps done (the latest train record's step + 1)."""
    policy_version: int | None = None
    """The policy version after the latest learner step."""
    latest_metrics: dict[str, Any] | None = None
    latest_eval: dict[str, Any] | None = None
    stop_requested: bool = False
    failure: str | None = None
    """The job's own one-line account of why it failed (its root cause, written by the job before it
    exits): a FAILED job's message, instead of the log excerpt Ray puts in its own."""
    resumes: int = 0
    """Times the job was resumed (`POST /v1/jobs/{id}/resume`); its Ray submissions are numbered by it."""


def spec_digest(spec: JobSpec) -> str:
    """A stable hash of a spec's content (field order and formatting of the request do not matter)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def finite_json(value: Any) -> Any:
    """`value` with NaN/inf floats as None: JSON has no such numbers and clients choke on them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _record_json(record: dict[str, Any]) -> dict[str, Any]:
    # numpy scalars and other float-likes become floats, as in metrics.jsonl; then drop NaNs.
    return finite_json(json.loads(json.dumps(record, default=float)))


class JobStore:
    """Job records, their metric history and the listing indexes, in one Redis database."""

    def __init__(self, client: redis.Redis, prefix: str = "dlrl") -> None:
        self.r = client
        self.p = prefix
        self._create = client.register_script(_CREATE)
        self._reopen = client.register_script(_REOPEN)

    @classmethod
    def from_url(cls, url: str, prefix: str = "dlrl", timeout_s: float = 5.0) -> "JobStore":
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      decode_responses=True, health_check_interval=30)
        return cls(client, prefix)

    # ---- keys
    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _metrics(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:metrics"

    def _index(self, state: str | None = None) -> str:
        return f"{self.p}:jobs" if state is None else f"{self.p}:jobs:{state}"

    def _idem(self, key: str) -> str:
        return f"{self.p}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    # ---- records
    def ping(self) -> bool:
        return bool(self.r.ping())

    def _write(self, pipe: Any, job: JobRecord, fields: set[str] | None = None) -> None:
        data = job.model_dump(mode="json")
        pipe.hset(self._job(job.id), mapping={k: json.dumps(v) for k, v in data.items()
                                              if fields is None or k in fields})

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.hgetall(self._job(job_id))
        if not raw:
            return None
        return JobRecord.model_validate({k: json.loads(v) for k, v in raw.items()})

    def create(self, spec: JobSpec, submitted: JobSpec, run_dir: str, job_id: str | None = None,
               idempotency_key: str | None = None, max_active: int | None = None) -> tuple[JobRecord, bool]:
        """Store a new PENDING job for `spec` (the effective spec; `submitted` is what the client sent).

        Returns (record, True) for a new job. With an Idempotency-Key already seen: (the earlier
        job, False) when the spec is the same, IdempotencyConflict when it differs. With
        `max_active`, ActiveLimitReached when that many jobs are already PENDING or RUNNING.

        One Lua script (`_CREATE`) claims the key, counts the active jobs and writes the record and
        its indexes: Redis runs it whole, so concurrent submissions (on one API or on replicas)
        cannot both see room for one more job, and a refused one leaves nothing behind.
        """
        digest = spec_digest(submitted)
        job_id = job_id or new_job_id()
        now = time.time()
        job = JobRecord(id=job_id, name=spec.name, created=now, updated=now, idempotency_key=idempotency_key,
                        spec=spec.model_dump(mode="json"), spec_sha256=digest, run_dir=run_dir,
                        total_steps=spec.train.steps)
        fields = [x for k, v in job.model_dump(mode="json").items() for x in (k, json.dumps(v))]
        keys = [self._job(job_id), self._index(), self._index("PENDING"), self._index("RUNNING"),
                f"{self.p}:jobs:seq"] + ([self._idem(idempotency_key)] if idempotency_key is not None else [])
        outcome, value = self._create(keys=keys, args=[-1 if max_active is None else max_active, job_id,
                                                       IDEMPOTENCY_TTL_S, *fields])
        if outcome == "replay":
            return self._replay(idempotency_key or "", digest), False
        if outcome == "full":
            raise ActiveLimitReached(int(value))
        return job, True

    def reopen(self, job: JobRecord, spec: JobSpec, step: int, max_active: int | None = None) -> JobRecord:
        """Move a STOPPED or FAILED job back to PENDING to resume it from the checkpoint of `step`
        (with `spec`, the effective spec admitted again): one script (`_REOPEN`), so only one of two
        concurrent resumes wins and the active-job limit holds. Its metric history is cut back to
        what the checkpoint holds, as the resumed run cuts metrics.jsonl (the rest is done again).
        JobNotResumable or ActiveLimitReached otherwise."""
        now = time.time()
        new = job.model_copy(update=dict(state="PENDING", message=None, submission_id=None, stop_requested=False,
                                         resumes=job.resumes + 1, step=step, updated=now,
                                         spec=spec.model_dump(mode="json")))
        fields = {k: v for k, v in new.model_dump(mode="json").items()
                  if k in ("state", "message", "submission_id", "stop_requested", "resumes", "step", "updated", "spec")}
        keys = [self._job(job.id), self._index(), self._index("PENDING"), self._index("RUNNING"),
                self._index("STOPPED"), self._index("FAILED")]
        outcome, value = self._reopen(keys=keys, args=[-1 if max_active is None else max_active, job.id,
                                                       *[x for k, v in fields.items() for x in (k, json.dumps(v))]])
        if outcome == "full":
            raise ActiveLimitReached(int(value))
        if outcome != "reopened":
            state = json.loads(value) if value else "gone"
            raise JobNotResumable(f"job {job.id} is {state}: only a STOPPED or FAILED job resumes")
        self.rewind_metrics(job.id, step)
        return self.get(job.id) or new

    def rewind_metrics(self, job_id: str, step: int) -> None:
        """Keep the metric records of what the checkpoint of `step` holds, as the resumed run keeps
        its metrics.jsonl (services.driver.driver.truncate_metrics; the API does not import the
        driver): the train records of steps 1 .. `step` (a train record's step is the number of
        steps done) and the evaluations before `step`; their order kept."""
        key = self._metrics(job_id)
        kept = []
        for line in self.r.lrange(key, 0, -1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and (
                    rec["step"] < step or (rec.get("kind") == "train" and rec["step"] == step)):
                kept.append(line)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if kept:
                pipe.rpush(key, *kept)
            pipe.execute()

    def find_idempotent(self, key: str, digest: str) -> JobRecord | None:
        """The job an Idempotency-Key created (None if unused); IdempotencyConflict if its spec differs."""
        return self._replay(key, digest) if self.r.exists(self._idem(key)) else None

    def _replay(self, key: str, digest: str) -> JobRecord:
        # The key and its record are written by one script, so a claimed key has its record
        # (unless Ray refused that job and `delete` is removing both right now).
        job_id = self.r.get(self._idem(key))
        job = self.get(job_id) if job_id else None
        if job is None or job.spec_sha256 != digest:
            raise IdempotencyConflict(job_id or "?")
        return job

    def delete(self, job_id: str) -> None:
        """Forget a job entirely (used when Ray refused it: the client was told, nothing ran)."""
        job = self.get(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._job(job_id), self._metrics(job_id))
            for state in (None, *STATES):
                pipe.zrem(self._index(state), job_id)
            if job is not None and job.idempotency_key is not None:
                pipe.delete(self._idem(job.idempotency_key))
            pipe.execute()

    def update(self, job_id: str, **fields: Any) -> JobRecord | None:
        """Set some fields of a job (state changes move it between the state indexes atomically)."""
        job = self.get(job_id)
        if job is None:
            return None
        new = job.model_copy(update={**fields, "updated": time.time()})
        JobRecord.model_validate(new.model_dump())  # a bad value must fail here, not on the next read
        with self.r.pipeline(transaction=True) as pipe:
            self._write(pipe, new, set(fields) | {"updated"})
            if new.state != job.state:
                seq = self.r.zscore(self._index(), job_id) or 0
                pipe.zrem(self._index(job.state), job_id)
                pipe.zadd(self._index(new.state), {job_id: seq})
            pipe.execute()
        return new

    def list(self, state: str | None = None, limit: int = 20,
             cursor: int | None = None) -> tuple[list[JobRecord], int | None]:
        """Jobs newest first; `cursor` is the `next_cursor` of the previous page (None: first page)."""
        top = f"({cursor}" if cursor is not None else "+inf"
        rows = self.r.zrevrangebyscore(self._index(state), top, "-inf", start=0, num=limit + 1, withscores=True)
        jobs = [job for job_id, _ in rows[:limit] if (job := self.get(job_id)) is not None]
        next_cursor = int(rows[limit - 1][1]) if len(rows) > limit else None
        return jobs, next_cursor

    def ids_in(self, *states: str) -> list[str]:
        return [job_id for s in states for job_id in self.r.zrange(self._index(s), 0, -1)]

    # ---- metrics
    def append_metric(self, job_id: str, record: dict[str, Any]) -> None:
        """Append one metrics record; a train record also becomes the job's latest metrics and
        policy version, an eval record its latest evaluation."""
        record = _record_json(record)
        fields: dict[str, Any] = {"updated": time.time()}
        if record.get("kind") == "train":
            fields["latest_metrics"] = record
            if isinstance(record.get("step"), int):
                fields["step"] = record["step"]  # the steps done (services.driver.progress.RunLog)
            if isinstance(record.get("version"), int):
                fields["policy_version"] = record["version"]
        elif record.get("kind") == "eval":
            fields["latest_eval"] = record
        with self.r.pipeline(transaction=True) as pipe:
            pipe.rpush(self._metrics(job_id), json.dumps(record))
            pipe.hset(self._job(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})
            pipe.execute()

    def metrics(self, job_id: str, since: int | None = None, kind: str | None = None,
                limit: int = 10_000) -> list[dict[str, Any]]:
        """The job's metric history in write order: the first `limit` records with step >= `since`,
        of `kind`. Read a page (METRICS_PAGE entries) at a time, stopping once `limit` records are
        found: a long run's history is never read whole for one reply."""
        out: list[dict[str, Any]] = []
        start = 0
        while len(out) < limit:
            page = self.r.lrange(self._metrics(job_id), start, start + METRICS_PAGE - 1)
            for line in page:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # not ours: never let one bad entry hide the rest
                if not isinstance(rec, dict):
                    continue
                if kind is not None and rec.get("kind") != kind:
                    continue
                step = rec.get("step")
                if since is not None and not (isinstance(step, int) and step >= since):
                    continue
                out.append(rec)
                if len(out) == limit:
                    break
            if len(page) < METRICS_PAGE:
                break
            start += METRICS_PAGE
        return out


def new_job_id() -> str:
    return ID_PREFIX + secrets.token_hex(6)


class MetricMirror:
    """The `on_record` sink of a job run by the API: copies each metrics record into Redis.

    Training must not die because Redis blinked: a record that cannot be written is kept and
    written, in order, with the next one that can (metrics.jsonl in the run dir has them all anyway).
    """

    def __init__(self, store: JobStore, job_id: str, max_pending: int = 10_000) -> None:
        self.store = store
        self.job_id = job_id
        self.pending: list[dict[str, Any]] = []
        self.max_pending = max_pending
        self._warned = False

    def __call__(self, record: dict[str, Any]) -> None:
        self.pending.append(record)
        del self.pending[:-self.max_pending]
        try:
            while self.pending:
                self.store.append_metric(self.job_id, self.pending[0])
                self.pending.pop(0)
            self._warned = False
        except redis.RedisError as exc:
            if not self._warned:
                log.warning("dlrl: cannot mirror metrics of job %s to Redis (%s); will retry", self.job_id, exc)
                print(f"dlrl: cannot mirror metrics to Redis ({exc}); will retry", flush=True)
                self._warned = True
