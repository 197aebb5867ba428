"""ASGI gates in front of the job API: the bearer token and the body size, checked before FastAPI
reads a byte of the body (an unauthenticated client learns nothing about what it sent)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: no token, and they reveal only ok/not ok

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
    body is read, so an unauthenticated client learns nothing about what it sent. Two Authorization
    headers are a 400, never "the last one wins": a proxy and the app must not disagree on who asks."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given_headers = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        if len(given_headers) > 1:
            return await _send_json(send, 400, {"detail": "more than one Authorization header"})
        header = given_headers[0] if given_headers else b""
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
        lengths = {v for k, v in scope["headers"] if k.lower() == b"content-length"}
        if len(lengths) > 1:
            return await _send_json(send, 400, {"detail": "conflicting Content-Length headers"})
        length = next(iter(lengths), None)
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
