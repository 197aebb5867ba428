"""The API server's connection guard: how long a client may take to send a request, and how many
connections it may hold open.

uvicorn times out only idle keep-alive connections: a client that sends a request's headers or
body a byte at a time (slowloris) holds its connection, and a file descriptor, for as long as it
likes, token or not, until the process runs out of descriptors and /healthz stops answering.
`GuardedH11` is uvicorn's h11 protocol with three limits added:

- `header_timeout_s`: from the connection's first moment (or, on a kept-alive connection, the
  request's first byte) until its headers are complete;
- `body_timeout_s`: from then until the last byte of its body;
- `max_connections`: a connection past it is answered 503 and closed at once.

A request that runs out of time is closed without an answer (its headers may not even be
complete); one that arrived whole is not limited by them, however long the handler takes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_RECEIVING = (h11.IDLE, h11.SEND_BODY)
"""The client's h11 states in which a request is still being received."""


def _refusal(status: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's H11Protocol with header and body read timeouts and a connection cap (see the module)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_body = False

    @classmethod
    def configured(cls, header_timeout_s: float, body_timeout_s: float, max_connections: int) -> type["GuardedH11"]:
        """The protocol class uvicorn gets (`http=`): uvicorn builds it with its own arguments only."""
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
                                           "max_connections": max_connections})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_refusal("503 Service Unavailable", "too many open connections; retry later"))
            transport.close()
            return
        self._arm(self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm(self.header_timeout_s)  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()  # a pipelined request may have started

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Re-arm or disarm after the client's state moved: headers done starts the body's clock,
        a whole request stops the clock, and an idle connection is the keep-alive timer's."""
        state = self.conn.their_state
        if state is h11.SEND_BODY and not self._reading_body:
            self._reading_body = True
            self._arm(self.body_timeout_s)
        elif state not in _RECEIVING or (state is h11.IDLE and not self.conn.trailing_data[0]):
            if self.timeout_keep_alive_task is not None or state is not h11.IDLE:
                self._disarm()
        if state is not h11.SEND_BODY:
            self._reading_body = False

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
