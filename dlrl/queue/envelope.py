"""One queue entry on the wire: the fields both backends store, and the checks on reading them.

An entry is `{b"v": b"<wire format version>", b"data": TrajectoryGroup.to_bytes()}`. The version
is repeated outside the data so a reader can refuse an entry from a newer writer by looking at
one small field, and so a dead letter says which version it was. Whatever a backend hands back
is untrusted: `unpack` accepts nothing but these two byte fields and decodes the data only
through `TrajectoryGroup.from_bytes`.
"""

from __future__ import annotations

import time
from typing import Any

from dlrl.trajectory import WIRE_VERSION, TrajectoryGroup, WireError

VERSION = b"v"
DATA = b"data"
DEAD_PAYLOAD_BYTES = 64 * 1024  # a dead letter keeps at most this much of the bad payload
DEAD_MAXLEN = 10_000  # dead letters kept per queue (oldest dropped first)


def pack(group: TrajectoryGroup) -> dict[bytes, bytes]:
    return {VERSION: str(WIRE_VERSION).encode(), DATA: group.to_bytes()}


def unpack(fields: Any) -> TrajectoryGroup:
    """The group in an entry; WireError saying why when the entry is not one this reader knows."""
    if fields is None:
        raise WireError("entry has no fields (deleted from the stream before it was acknowledged)")
    if not isinstance(fields, dict) or set(fields) != {VERSION, DATA}:
        keys = sorted(repr(k)[:32] for k in fields) if isinstance(fields, dict) else type(fields).__name__
        raise WireError(f"entry fields {keys} are not exactly {VERSION!r} and {DATA!r}")
    version, data = fields[VERSION], fields[DATA]
    if not isinstance(version, bytes) or not isinstance(data, bytes):
        raise WireError("entry fields must be bytes")
    if version != str(WIRE_VERSION).encode():
        raise WireError(f"unknown wire format version {version[:16]!r} (this reader knows {WIRE_VERSION})")
    return TrajectoryGroup.from_bytes(data)


def payload(fields: Any) -> bytes:
    """The raw data of an entry, whatever its shape, for the dead-letter record."""
    if isinstance(fields, dict):
        data = fields.get(DATA)
        if isinstance(data, bytes):
            return data
    return repr(fields)[:DEAD_PAYLOAD_BYTES].encode("utf-8", "replace")


def dead_record(entry_id: str, reason: str, fields: Any, consumer: str) -> dict[str, Any]:
    """A dead letter: JSON-safe description plus a bounded copy of the payload under "payload"."""
    raw = payload(fields)
    return {"entry_id": entry_id, "reason": reason[:1000], "size": len(raw), "time": time.time(),
            "consumer": consumer, "payload": raw[:DEAD_PAYLOAD_BYTES]}
