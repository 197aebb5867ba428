"""The Ray side of the job API: submitting, watching and stopping Ray Jobs, and what a job is started
with (its entrypoint and environment).

Each accepted job runs as a Ray Job whose entrypoint is `dlrl train --spec-env DLRL_JOB_SPEC
--job-id <id>`: the admitted spec travels as JSON in the job's runtime environment (parsed by
pydantic again in the job, never a pickle), with the data root and the task import paths the
operator allows; nothing of the spec decides where the job connects.

The server's Redis URL (it holds the Redis password) never goes into the runtime environment: Ray
writes a job's runtime environment in plain text to its logs (runtime_env_agent.log, under a temp
folder every local user can read) and shows it to anyone holding the cluster token. The URL is
written instead to `<runs dir>/<job id>/.redis-url`, mode 0600 (the runs dir is already shared
with the Ray nodes, and jobs run as the server's user), and only that path travels, as
DLRL_REDIS_URL_FILE; the job reads it into its own environment and deletes it before it starts
(`adopt_redis_url_file`).

Under a wall-clock limit the entrypoint runs under coreutils `timeout`, which stops it (SIGTERM, then
SIGKILL 30 s later) even while no API process runs; Ray reports the exit status 124 and
`wall_clock_message` turns that into words.
"""

from __future__ import annotations

import math
import os
import shlex
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

from dlrl.config import JobSpec
from dlrl.quiet import QUIET_ENV
from dlrl.tasks import IMPORT_PATHS_ENV
from dlrl.tasks.data_root import DATA_ROOT_ENV
from services.api.settings import ApiSettings

SPEC_ENV = "DLRL_JOB_SPEC"
REDIS_URL_ENV = "DLRL_REDIS_URL"
REDIS_URL_FILE_ENV = "DLRL_REDIS_URL_FILE"
"""The path of the file holding the job's Redis URL (the URL itself is never in the job's runtime env)."""
REDIS_URL_FILE = ".redis-url"
SUBMIT_TIMEOUT_S = 120.0
TIMEOUT_EXIT = 124
"""coreutils `timeout`'s exit status when it stopped the command."""
KILL_AFTER_S = 30
"""Grace between the wall-clock SIGTERM and SIGKILL."""


def job_entrypoint(settings: ApiSettings, job_id: str, resume: bool = False) -> str:
    """The shell command Ray runs for the job (under `timeout` when there is a wall-clock limit);
    `resume`: continue its run from the last checkpoint (`POST /v1/jobs/{id}/resume`)."""
    command = [*settings.job_command, "train", "--spec-env", SPEC_ENV, "--job-id", job_id,
               *(["--resume"] if resume else [])]
    limit = settings.admission.max_job_seconds
    if limit is not None:
        command = ["timeout", f"--kill-after={KILL_AFTER_S}",
                   str(math.ceil(limit)), *command]
    return shlex.join(command)


def write_redis_url_file(settings: ApiSettings, job_id: str) -> Path:
    """Write the server's Redis URL to <runs dir>/<job id>/.redis-url, readable by this user only
    (created 0600, never through a symlink, and chmod-ed again should it exist already)."""
    folder = settings.runs_dir / job_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REDIS_URL_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(settings.redis_url)
    return path


def adopt_redis_url_file(environ: MutableMapping[str, str] = os.environ) -> None:
    """In the job: read the Redis URL from the file DLRL_REDIS_URL_FILE names into this process's
    DLRL_REDIS_URL (where the queue and the metric mirror look for it), then delete the file: the
    secret is on disk only until the job starts. Nothing when the variable is not set."""
    name = environ.pop(REDIS_URL_FILE_ENV, None)
    if not name:
        return
    path = Path(name)
    environ[REDIS_URL_ENV] = path.read_text().strip()
    path.unlink(missing_ok=True)


def job_env(settings: ApiSettings, spec: JobSpec, job_id: str) -> dict[str, str]:
    """The job's environment: its spec, where to read the server's Redis URL (written here, see
    the module docstring), and the operator's data root and task import paths (set even when
    empty, so a value on the Ray nodes cannot widen them)."""
    env = {SPEC_ENV: spec.model_dump_json(), "DLRL_JOB_ID": job_id,
           REDIS_URL_FILE_ENV: str(write_redis_url_file(settings, job_id)),
           "DLRL_REDIS_PREFIX": settings.redis_prefix,
           IMPORT_PATHS_ENV: ",".join(settings.admission.import_paths),
           **QUIET_ENV}  # no progress bars in the job's log (dlrl.runtime)
    if settings.admission.data_root is not None:
        env[DATA_ROOT_ENV] = settings.admission.data_root
    return env


def wall_clock_message(message: str | None, settings: ApiSettings) -> str | None:
    """Ray's message for a job `timeout` stopped, said plainly (other messages unchanged)."""
    limit = settings.admission.max_job_seconds
    if limit is not None and message and f"exit code {TIMEOUT_EXIT}" in message:
        return f"stopped: the job ran past the API's wall-clock limit of {limit:g} s"
    return message


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

    def logs(self, submission_id: str, lines: int, max_bytes: int) -> tuple[str, bool]:
        """The last `lines` lines of the job's log (0: all), at most its last `max_bytes` bytes;
        and whether bytes were left out. Ray's log API reads the tail from the end of the file, and
        the reply is read a chunk at a time, keeping the last `max_bytes`: a huge log is never held
        whole (the SDK's get_job_logs returns it whole)."""

        def read(c: Any) -> tuple[bytes, bool]:
            node = getattr(c.get_job_info(submission_id), "driver_node_id", None)
            if not node:
                return b"", False  # no driver yet: no log yet
            query = urllib.parse.urlencode({"node_id": node, "filename": f"job-driver-{submission_id}.log",
                                            "lines": lines or -1, "media_type": "file",
                                            "timeout": int(self.timeout_s)})
            with c._do_request("GET", f"/api/v0/logs/file?{query}", stream=True) as r:
                if r.status_code == 404 or (r.status_code != 200 and "not found" in r.text.lower()):
                    raise RuntimeError(f"job {submission_id} does not exist")  # _call: KeyError
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
                kept, cut = bytearray(), False
                for chunk in r.iter_content(chunk_size=64 * 1024):
                    kept += chunk
                    if len(kept) > max_bytes:
                        del kept[:len(kept) - max_bytes]
                        cut = True
                return bytes(kept), cut

        try:
            data, cut = self._call("logs", read)
        except KeyError:
            return "", False
        text = data.decode("utf-8", errors="replace")
        if cut:
            text = text.split("\n", 1)[1] if "\n" in text else text  # drop the partial first line
        return text, cut

    async def follow(self, submission_id: str) -> AsyncIterator[str]:
        """The job's log from the start, then as it is written; ends when the job ends."""
        client = self.connect()
        async for chunk in client.tail_job_logs(submission_id):
            yield chunk
