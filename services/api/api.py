"""The job API: submit, watch and stop dlrl RL jobs over HTTP (FastAPI; `dlrl serve` runs it).

A submission's body *is* a `dlrl.config.JobSpec`, the same type as the TOML file of `dlrl train`,
but a request is untrusted input: `services.api.admission` decides what it may ask for. Each admitted
job runs as a Ray Job (`services.api.launcher`), so it appears in the Ray dashboard with its logs. The
API itself is stateless: job records and metric history live in Redis (`services.api.jobstore`), and
job states are read back from Ray, so a restarted API reports the same jobs.

    DLRL_API_TOKEN=... DLRL_REDIS_URL=redis://:pw@127.0.0.1:6379/0 \
    DLRL_RAY_ADDRESS=http://127.0.0.1:8265 dlrl serve --host 127.0.0.1 --port 8000

Every route but /healthz and /readyz needs `Authorization: Bearer <token>` (`services.api.gates`). A
client mistake is never a 500: bad specs and refused ones are 422 with the field path and reason,
oversized bodies 413, unknown jobs 404, stopping a finished job 409, limits 429, Redis or Ray
unreachable 503; no error reply shows the server's folders (`ServerPaths`). The server closes
connections that send their headers or body too slowly and caps how many are open
(`services.api.connections`).

Modules: settings (`ApiSettings`), admission (the policy), routes (the handlers), launcher (Ray
Jobs), gates (token and body size), connections (read timeouts, connection cap), ratelimit,
views (response bodies), checkpoints.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import redis
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from dlrl.config import CHECKOUT, FILE_CHECKS
from services.api.connections import GuardedH11
from services.api.gates import BearerAuth, BodyLimit
from services.api.jobstore import JobStore
from services.api.launcher import RayJobs, RayUnavailable
from services.api.routes import AdmissionError, JobsContext, health_router, jobs_router
from services.api.settings import MIN_TOKEN_LENGTH, ApiSettings, ConfigError, is_loopback, read_token
from services.api.views import FieldError, ValidationErrorResponse

API_VERSION = "0.2.0"

__all__ = ["API_VERSION", "ApiSettings", "ConfigError", "create_app", "is_loopback", "read_token", "serve"]


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


class ServerPaths:
    """Hides the server's own folders in error replies: a caller learns from a refusal what was
    wrong with its request, not where the server keeps its checkout, runs, data or models.
    Every error handler passes its text through `hide` (the success bodies, e.g. a job's run_dir,
    are what the caller asked for)."""

    def __init__(self, settings: ApiSettings) -> None:
        policy = settings.admission
        named = [(settings.runs_dir, "<runs dir>"), (CHECKOUT, "<dlrl checkout>"), (Path.cwd(), "<server folder>"),
                 (Path(sys.prefix), "<python>"), (Path.home(), "<home>")]
        named += [(Path(r), "<model root>") for r in policy.model_roots]
        if policy.data_root is not None:
            named.append((Path(policy.data_root), "<data root>"))
        spelled: dict[str, str] = {}
        for folder, label in named:
            for form in (folder.expanduser(), _resolved_or_same(folder)):
                if len(form.parts) > 1:  # never "/" itself
                    spelled.setdefault(str(form), label)
        # Longest first, so a data root inside the checkout reads "<data root>", not "<dlrl checkout>/data";
        # a folder only where a name ends ("/root" hides in "/root/x", not in "/rootfs").
        self._pairs = [(re.compile(re.escape(path) + r"(?![\w.-])"), label)
                       for path, label in sorted(spelled.items(), key=lambda kv: -len(kv[0]))]

    def hide(self, text: str) -> str:
        for pattern, label in self._pairs:
            text = pattern.sub(label, text)
        return text


def _resolved_or_same(folder: Path) -> Path:
    try:
        return folder.expanduser().resolve()
    except (OSError, RuntimeError):
        return folder


def _invalid_response(errors: list[FieldError], what: str, paths: ServerPaths) -> JSONResponse:
    errors = [e.model_copy(update={"reason": paths.hide(e.reason)}) for e in errors]
    return JSONResponse(status_code=422, content=ValidationErrorResponse(
        detail=f"{what}: " + "; ".join(f"{e.path}: {e.reason}" for e in errors[:10]), errors=errors).model_dump())


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


class UntrustedSpecs:
    """ASGI middleware: while a request is served, spec validation reads no file the spec names
    (dlrl.config.FILE_CHECKS); services.api.admission reads only what it allows."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        token = FILE_CHECKS.set(False)
        try:
            await self.app(scope, receive, send)
        finally:
            FILE_CHECKS.reset(token)


def create_app(settings: ApiSettings, store: JobStore | None = None) -> FastAPI:
    """The FastAPI app; `store` defaults to a JobStore on settings.redis_url."""
    store = store or JobStore.from_url(settings.redis_url, settings.redis_prefix)
    ray_jobs = RayJobs(settings.ray_address, settings.ray_timeout_s)
    ctx = JobsContext(settings, store, ray_jobs, (settings.dashboard_url or settings.ray_address).rstrip("/"))

    app = FastAPI(title="dlrl job API", version=API_VERSION, docs_url=None, redoc_url=None,
                  dependencies=[Depends(reject_unknown_query)],
                  description="Submit, watch and stop RL jobs for diffusion language models. "
                              "Authenticate with `Authorization: Bearer <token>`.")
    app.state.settings, app.state.store, app.state.ray = settings, store, ray_jobs

    paths = ServerPaths(settings)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid_response(_field_errors(exc), "invalid request", paths)

    @app.exception_handler(AdmissionError)
    async def _refused(request: Request, exc: AdmissionError) -> JSONResponse:
        return _invalid_response(exc.errors, "refused by the API's admission policy", paths)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.detail, str):
            exc.detail = paths.hide(exc.detail)
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette's Allow names the methods of one route; HTTP wants all the path's methods.
        allowed = [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
                   if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in app.router.routes)]
        return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allowed)})

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": paths.hide(f"job store (Redis) unavailable: {exc}")})

    @app.exception_handler(RayUnavailable)
    async def _ray_down(request: Request, exc: RayUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": paths.hide(str(exc))})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client mistake: the traceback goes to the server's log (uvicorn logs the
        # exception Starlette re-raises), the caller gets a plain 500 with no server detail.
        return JSONResponse(status_code=500, content={"detail": "internal error (the server logged it)"})

    app.include_router(health_router(ctx))
    app.include_router(jobs_router(ctx))

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
    app.add_middleware(UntrustedSpecs)
    return app


def serve(settings: ApiSettings, host: str = "127.0.0.1", port: int = 8000, insecure_open: bool = False,
          log_level: str = "info") -> None:
    """Run the API with uvicorn until SIGTERM/SIGINT. Without a token it runs only when told to
    (`insecure_open`) and only on a loopback address."""
    import uvicorn

    if settings.token is not None and len(settings.token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"the API token is {len(settings.token)} characters long; it must have at least "
                          f"{MIN_TOKEN_LENGTH} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if settings.token is None:
        if not insecure_open:
            raise ConfigError("no API token: set DLRL_API_TOKEN or DLRL_API_TOKEN_FILE "
                              "(or --insecure-open, on a loopback host only)")
        if not is_loopback(host):
            raise ConfigError(f"--insecure-open is allowed on a loopback host only, not {host}")
    _open_file_room(settings.max_connections)
    app = create_app(settings)
    print(f"dlrl: job API on http://{host}:{port} (Ray {settings.ray_address}, runs in {settings.runs_dir})",
          flush=True)
    http = GuardedH11.configured(settings.header_timeout_s, settings.body_timeout_s, settings.max_connections)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, http=http)


FILES_BESIDES_CONNECTIONS = 256
"""Open files the server needs besides its client connections (Redis, Ray, logs, the runtime)."""


def _open_file_room(max_connections: int) -> None:
    """Raise the soft open-file limit so `max_connections` clients cannot starve the server of
    descriptors; refuse to start when the hard limit is too low for them."""
    import resource

    need = max_connections + FILES_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ConfigError(f"max_connections {max_connections} needs {need} open files; this process may "
                              f"have {hard} (ulimit -n): lower max_connections or raise the limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
