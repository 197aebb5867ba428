"""Per-token rate limits of the job API, counted in Redis so that every API replica shares them.

A fixed window per token (the token's SHA-256, never the token, names the key): `hit` counts one
request and says how long to wait once the window's budget is spent, which the route answers as
429 with `Retry-After`. With Redis unreachable the limit lets the request through: every route it
guards needs Redis itself and answers 503, so nothing is done unlimited.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

import redis

log = logging.getLogger(__name__)


def token_key(authorization: str | None) -> str:
    """Who is counted: a digest of the Authorization header's token ("open" without one)."""
    if not authorization:
        return "open"
    token = authorization.partition(" ")[2].strip()
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class RateLimit:
    """At most `limit` hits per `window_s` seconds for each key (None or a store-less limit: off)."""

    def __init__(self, r: redis.Redis, prefix: str, name: str, limit: int | None, window_s: float = 60.0) -> None:
        self.r, self.prefix, self.name, self.limit, self.window_s = r, prefix, name, limit, window_s

    def hit(self, who: str, now: float | None = None) -> int | None:
        """Count one hit for `who`; None if within the limit, else the seconds until the window ends."""
        if self.limit is None:
            return None
        now = time.time() if now is None else now
        window = int(now // self.window_s)
        key = f"{self.prefix}:rate:{self.name}:{who}:{window}"
        try:
            pipe = self.r.pipeline()
            pipe.incr(key)
            pipe.expire(key, math.ceil(self.window_s) + 1)
            count = pipe.execute()[0]
        except redis.RedisError as exc:
            log.warning("rate limit %s not counted (Redis: %s)", self.name, exc)
            return None
        if count <= self.limit:
            return None
        return max(1, math.ceil((window + 1) * self.window_s - now))
