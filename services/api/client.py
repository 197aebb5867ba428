"""A small HTTP client of the job API (what `dlrl submit/jobs/status/logs/stop` speak).

Standard library only (urllib), so the CLI needs nothing the server does not. The URL and token
come from the caller, or from DLRL_API_URL and DLRL_API_TOKEN (DLRL_API_TOKEN_FILE).

    client = ApiClient.from_env()
    job = client.submit(JobSpec.from_toml("deploy/jobs/tiny-sudoku.toml"))
    client.job(job["id"])["state"]
"""

from __future__ import annotations

import codecs
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlrl.config import JobSpec

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """The API answered with an error status (or could not be reached: status 0)."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None,
                 payload: Any = None) -> None:
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.payload = payload
        super().__init__(f"HTTP {status}: {detail}" if status else detail)


def _env_token() -> str | None:
    token = os.environ.get("DLRL_API_TOKEN", "").strip()
    if not token and os.environ.get("DLRL_API_TOKEN_FILE"):
        try:
            token = Path(os.environ["DLRL_API_TOKEN_FILE"]).read_text().strip()
        except OSError:
            token = ""
    return token or None


class ApiClient:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    @classmethod
    def from_env(cls, url: str | None = None, token: str | None = None, timeout_s: float = 30.0) -> "ApiClient":
        return cls(url or os.environ.get("DLRL_API_URL") or DEFAULT_URL, token or _env_token(), timeout_s)

    def _open(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None,
              headers: dict[str, str] | None = None, timeout_s: float | None = None) -> Any:
        query = {k: ("true" if v is True else "false" if v is False else v)
                 for k, v in (params or {}).items() if v is not None}
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            return urllib.request.urlopen(req, timeout=timeout_s if timeout_s is not None else self.timeout_s)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"detail": raw.decode(errors="replace").strip() or exc.reason}
            detail = payload.get("detail") if isinstance(payload, dict) else None
            errors = payload.get("errors") if isinstance(payload, dict) else None
            raise ApiError(exc.code, str(detail or exc.reason), errors, payload) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(0, f"cannot reach the job API at {self.url}: {reason}") from None

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._open(method, path, **kwargs) as resp:
            return json.loads(resp.read())

    # ---- the API
    def submit(self, spec: JobSpec | dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", body=body, headers=headers)

    def jobs(self, state: str | None = None, limit: int = 20, cursor: int | None = None) -> dict[str, Any]:
        return self._json("GET", "/v1/jobs", params={"state": state, "limit": limit, "cursor": cursor})

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}")

    def metrics(self, job_id: str, since: int | None = None, kind: str | None = None) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/metrics",
                          params={"since": since, "kind": kind})

    def checkpoints(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/checkpoints")

    def stop(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/stop")

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/resume")

    def logs(self, job_id: str, tail: int = 200) -> str:
        with self._open("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/logs", params={"tail": tail}) as r:
            return r.read().decode(errors="replace")

    def follow_logs(self, job_id: str) -> Iterator[str]:
        """The job's log as it is written; ends when the job ends. No read timeout: a job may be
        silent for minutes (a long evaluation)."""
        resp = self._open("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/logs",
                          params={"follow": True, "tail": 0}, timeout_s=None)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks split characters
        with resp:
            while chunk := resp.read1(65536):
                yield decoder.decode(chunk)
            yield decoder.decode(b"", final=True)

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        try:
            return self._json("GET", "/readyz")
        except ApiError as exc:
            if exc.status == 503 and isinstance(exc.payload, dict):
                return exc.payload
            raise
