"""The job API's own settings (`ApiSettings`): where Redis and Ray are, the token, and the limits.

They come from the environment (DLRL_*), an optional TOML settings file (`dlrl serve --settings
FILE`) and `dlrl serve` flags, each overriding the one before. None of them can be set by a request:
they are the operator's. The admission policy (`services.api.admission.AdmissionPolicy`) is one table
of them, `[admission]` in the file.

    # api.toml
    max_active_jobs = 4
    rate_limit_per_minute = 600
    header_timeout_s = 10
    [admission]
    data_root = "/srv/dlrl/data"
    model_roots = ["/srv/dlrl/models"]
    models = ["GSAI-ML/LLaDA-8B-Instruct"]
    max_job_seconds = 21600
    [admission.limits]
    "train.steps" = 2000
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from services.api.admission import AdmissionPolicy


class ConfigError(Exception):
    """The server's own settings are unusable (it refuses to start)."""


MIN_TOKEN_LENGTH = 16
"""Characters an API token must have at least: a short one can be guessed over the network."""


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
    """The job store; jobs get it too (for their metrics and a Redis queue), never from their spec."""
    redis_prefix: str = "dlrl"
    """Prefix of every Redis key of the job store (several deployments can share one Redis)."""
    ray_address: str = "http://127.0.0.1:8265"
    """The Ray dashboard / Jobs API URL the jobs are submitted to (and the cluster they join)."""
    dashboard_url: str | None = None
    """Base of the dashboard links in job views (None: ray_address), e.g. a URL reachable by users."""
    runs_dir: Path = field(default_factory=lambda: Path("runs").resolve())
    """Job runs are written to <runs_dir>/<job id>/<name>/ (must be shared with the Ray nodes)."""
    max_body_bytes: int = 64 * 1024
    max_active_jobs: int | None = 4
    """Jobs PENDING or RUNNING at once before submissions get 429 (None: no limit; 0: drain)."""
    rate_limit_per_minute: int | None = 600
    """Requests per token per minute to the /v1 routes before 429 with Retry-After (None: off)."""
    submit_limit_per_minute: int | None = 10
    """Jobs a token may start per minute (admitted submissions; replays do not count; None: off)."""
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)
    """What a submitted spec may ask for (services.api.admission)."""
    header_timeout_s: float = 10.0
    """A client has this long to send a request's headers (from connecting, or from the request's
    first byte on a kept-alive connection); the connection is closed past it."""
    body_timeout_s: float = 30.0
    """... and this long, once the headers are in, to send its body."""
    max_log_bytes: int = 1024 * 1024
    """The most of a job's log one /logs reply carries (its end; follow=true streams it all)."""
    max_connections: int = 512
    """Open connections before a new one is answered 503 and closed (the process's open-file limit
    is raised to fit them, or the server refuses to start)."""
    job_command: tuple[str, ...] = (sys.executable, "-m", "services.cli")
    """The `dlrl` command as the Ray nodes run it (default: this interpreter's)."""
    ray_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_active_jobs", "rate_limit_per_minute", "submit_limit_per_minute",
                     "max_log_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise ConfigError(f"{name} must be a number of seconds in (0, 3600], got {value!r}")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int) \
                or self.max_connections < 1:
            raise ConfigError(f"max_connections must be a positive integer, got {self.max_connections!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ = os.environ, settings_file: str | Path | None = None,
                 admission: dict[str, Any] | None = None, **overrides: Any) -> "ApiSettings":
        """Environment, then `settings_file` (TOML), then `overrides` (flags; None means "not given").
        `admission` holds AdmissionPolicy fields given as flags (None values skipped)."""

        def pick(name: str, default: Any) -> Any:
            return environ.get(name) or default

        values: dict[str, Any] = dict(
            token=read_token(environ),
            redis_url=pick("DLRL_REDIS_URL", cls.redis_url),
            redis_prefix=pick("DLRL_REDIS_PREFIX", cls.redis_prefix),
            ray_address=pick("DLRL_RAY_ADDRESS", cls.ray_address),
            dashboard_url=pick("DLRL_RAY_DASHBOARD_URL", None),
            runs_dir=Path(pick("DLRL_RUNS_DIR", "runs")).resolve(),
        )
        if (max_active := pick("DLRL_MAX_ACTIVE_JOBS", None)) is not None:
            values["max_active_jobs"] = None if max_active == "none" else _int(max_active, "DLRL_MAX_ACTIVE_JOBS")
        if command := pick("DLRL_JOB_COMMAND", None):
            values["job_command"] = tuple(shlex.split(command))
        policy: dict[str, Any] = {}
        if data_root := pick("DLRL_DATA_ROOT", None):
            policy["data_root"] = data_root
        if settings_file is not None:
            from_file = _read_file(Path(settings_file))
            policy.update(from_file.pop("admission", {}))
            values.update(from_file)
        values.update({k: v for k, v in overrides.items() if v is not None})
        policy.update({k: v for k, v in (admission or {}).items() if v is not None})
        try:
            values["admission"] = AdmissionPolicy.from_dict(policy)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"admission settings: {exc}") from exc
        return cls(**values)

    def with_admission(self, **changes: Any) -> "ApiSettings":
        return replace(self, admission=replace(self.admission, **changes))


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"{what} must be an integer, got {text!r}") from exc


_FILE_KEYS = {f.name for f in fields(ApiSettings)} - {"token", "admission", "job_command"}


def _read_file(path: Path) -> dict[str, Any]:
    """The settings file's values (no token in it: secrets come from the environment or a secret file)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
    unknown = sorted(set(data) - _FILE_KEYS - {"admission"})
    if unknown:
        raise ConfigError(f"settings file {path}: unknown keys {unknown} (known: {sorted(_FILE_KEYS | {'admission'})})")
    if "runs_dir" in data:
        data["runs_dir"] = Path(data["runs_dir"]).resolve()
    if not isinstance(data.get("admission", {}), dict):
        raise ConfigError(f"settings file {path}: [admission] must be a table")
    return data
