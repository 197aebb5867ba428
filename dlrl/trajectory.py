"""The one wire schema: a `TrajectoryGroup` is what a rollout worker produces and the learner eats.

One group = one prompt and its G sampled completions, scored. The same type travels through the
queue (Ray queue locally; Redis Streams in the distributed runtime, serialised safely, never
pickled), the learner and the API. Token ids are int32 numpy arrays so the group is compact and
framework-neutral; `mask_seed` makes the learner's Monte-Carlo masks reproducible anywhere.

Wire format (`to_bytes` / `from_bytes`). Bytes read from Redis are untrusted input, so the format
is plain data only (JSON + raw numbers, never pickle) and the decoder checks everything before it
copies a byte:

    offset 0        magic  b"DLRLTG\r\n"   (8 bytes; the CR LF catches text-mode mangling)
    offset 8        format version, uint16 little-endian (WIRE_VERSION)
    offset 10       header length H, uint32 little-endian (at most MAX_HEADER_BYTES)
    offset 14       header: H bytes of UTF-8 JSON, one object:
                      {"group_id": str, "task": str, "prompt_id": str, "policy_version": int,
                       "mask_seed": int, "timings": {str: float},
                       "arrays": {name: {"dtype": str, "shape": [int, ...], "offset": int}}}
    offset 14 + H   payload: the arrays' raw little-endian bytes, back to back in the order
                    prompt_ids (<i4, (P,)), completion_ids (<i4, (G, L)), rewards (<f4, (G,)),
                    unmask_steps (<i2, (G, L), present only when the group has them),
                    behaviour_elbo (<f8, (G, n_mc), present only when the group has them);
                    each "offset" is relative to the payload start; nothing follows the last one.

The optional arrays were added without a new version number: a group without them is encoded
exactly as before, so every version-1 reader and writer agree on it. A reader that predates
behaviour_elbo refuses a group that carries it (WireError "unknown arrays") rather than misread it.

A reader that meets a version it does not know refuses the bytes (`WireError` naming the
version) rather than guessing; a new layout gets a new version number.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"DLRLTG\r\n"
WIRE_VERSION = 1
_PREFIX = struct.Struct("<8sHI")  # magic, format version, header length

# Caps checked before anything is copied: a corrupt or hostile header must not make the reader
# allocate gigabytes. They are far above any real group (LLaDA-8B, G=64, L=32k is ~12 MB).
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
MAX_DIM = 1 << 24
MAX_TEXT = {"group_id": 256, "task": 128, "prompt_id": 512}
MAX_TIMINGS = 64
MAX_TIMING_KEY = 64
MAX_MC = 4096  # behaviour_elbo columns: TrainSpec.n_mc's bound
_INT_RANGE = (-(1 << 63), 1 << 64)  # policy_version and mask_seed fit an int64 or a uint64

# (name, wire dtype, number of dimensions), in payload order.
_ARRAYS = (("prompt_ids", "<i4", 1), ("completion_ids", "<i4", 2), ("rewards", "<f4", 1),
           ("unmask_steps", "<i2", 2), ("behaviour_elbo", "<f8", 2))
_OPTIONAL_ARRAYS = {"unmask_steps", "behaviour_elbo"}
_HEADER_KEYS = {"group_id", "task", "prompt_id", "policy_version", "mask_seed", "timings", "arrays"}
_ARRAY_KEYS = {"dtype", "shape", "offset"}


class WireError(ValueError):
    """Bytes that are not a valid `TrajectoryGroup` of a known format version (or a group that
    cannot be encoded); the message says what is wrong."""


@dataclass
class TrajectoryGroup:
    """One prompt, its G completions and their rewards.

    `group_id` identity: it is unique within a job and names one (rollout batch, worker, prompt)
    slot, so re-producing the same slot (a restarted worker redoing its batch, a retried `put`)
    yields the same id. The queue delivers at least once, so a consumer may see an id more than
    once; two groups with the same id are the same work, and the learner keeps the first it trains
    on and drops the rest. Ids must therefore never be reused for different work within a job.
    """

    group_id: str  # unique per (job, step, prompt): makes delivery idempotent
    task: str
    prompt_id: str  # the task example's id
    prompt_ids: np.ndarray  # (P,) int32, unpadded prompt tokens
    completion_ids: np.ndarray  # (G, L) int32, generated tokens (EOS-filled tail included)
    rewards: np.ndarray  # (G,) float32
    policy_version: int  # weights version that generated the completions
    mask_seed: int  # seeds the learner's MC masks: mask(i, j) = f(mask_seed, i, j)
    unmask_steps: np.ndarray | None = None  # (G, L) int16, sampler step that revealed each token
    timings: dict[str, float] = field(default_factory=dict)  # seconds: generate, reward, behaviour_elbo
    # (G, n_mc) float64: the ELBO terms l_old of each completion under the MC masks `mask_seed`
    # gives, measured by the weights that generated the group (policy_version). Shipped in
    # asynchronous runs, where the learner's weights have moved on by the time it trains on the
    # group: BGPO's d = l_new - l_old is then taken against the behaviour policy (rollout/behaviour.py).
    behaviour_elbo: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int32)
        self.completion_ids = np.asarray(self.completion_ids, dtype=np.int32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        if self.prompt_ids.ndim != 1 or self.completion_ids.ndim != 2:
            raise ValueError("prompt_ids must be (P,) and completion_ids (G, L)")
        if self.rewards.shape != (self.completion_ids.shape[0],):
            raise ValueError(
                f"rewards {self.rewards.shape} do not match {self.completion_ids.shape[0]} completions"
            )
        if self.unmask_steps is not None:
            self.unmask_steps = np.asarray(self.unmask_steps, dtype=np.int16)
            if self.unmask_steps.shape != self.completion_ids.shape:
                raise ValueError("unmask_steps must have the shape of completion_ids")
        if self.behaviour_elbo is not None:
            self.behaviour_elbo = np.asarray(self.behaviour_elbo, dtype=np.float64)
            _check_behaviour(self.behaviour_elbo, self.completion_ids.shape[0])

    @property
    def size(self) -> int:
        return int(self.completion_ids.shape[0])

    # -- wire format --------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """This group in the wire format (module docstring); WireError if it cannot be encoded
        within the format's limits (so every encoded group is one `from_bytes` accepts)."""
        for name, cap in MAX_TEXT.items():
            _check_text(getattr(self, name), name, cap)
        for name in ("policy_version", "mask_seed"):
            _check_int(getattr(self, name), name)
        timings = _check_timings(self.timings)
        present = [(name, dtype, ndim, getattr(self, name)) for name, dtype, ndim in _ARRAYS
                   if not (name in _OPTIONAL_ARRAYS and getattr(self, name) is None)]
        for name, dtype, ndim, value in present:
            # The dataclass normalised the arrays; a field reassigned since then must not be
            # silently cast (int64 -> int32 would wrap) into bytes that decode to something else.
            want = np.dtype(dtype)
            if not isinstance(value, np.ndarray) or value.ndim != ndim or (value.dtype.kind, value.dtype.itemsize) \
                    != (want.kind, want.itemsize):
                raise WireError(f"{name} must be a {ndim}-D {dtype} array, got {getattr(value, 'dtype', type(value))}")
            if any(d > MAX_DIM for d in value.shape):
                raise WireError(f"{name} shape {value.shape} exceeds the wire limit {MAX_DIM} per dimension")
        shape = self.completion_ids.shape
        if self.rewards.shape != shape[:1] or (self.unmask_steps is not None and self.unmask_steps.shape != shape):
            raise WireError(f"rewards {self.rewards.shape} / unmask_steps do not match completion_ids {shape}")
        if self.behaviour_elbo is not None:
            _check_behaviour(self.behaviour_elbo, shape[0])
        total = sum(value.nbytes for *_, value in present)
        if total > MAX_PAYLOAD_BYTES:
            raise WireError(f"group payload {total} bytes exceeds the wire limit {MAX_PAYLOAD_BYTES}")
        arrays: dict[str, dict[str, Any]] = {}
        chunks: list[bytes] = []
        offset = 0
        for name, dtype, _, value in present:
            chunks.append(np.ascontiguousarray(value, dtype=np.dtype(dtype)).tobytes())
            arrays[name] = {"dtype": dtype, "shape": [int(d) for d in value.shape], "offset": offset}
            offset += len(chunks[-1])
        header = json.dumps(
            {"group_id": self.group_id, "task": self.task, "prompt_id": self.prompt_id,
             "policy_version": int(self.policy_version), "mask_seed": int(self.mask_seed),
             "timings": timings, "arrays": arrays},
            separators=(",", ":"), ensure_ascii=False, allow_nan=False,
        ).encode("utf-8")
        if len(header) > MAX_HEADER_BYTES:
            raise WireError(f"header {len(header)} bytes exceeds the wire limit {MAX_HEADER_BYTES}")
        return b"".join([_PREFIX.pack(MAGIC, WIRE_VERSION, len(header)), header, *chunks])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "TrajectoryGroup":
        """Decode and fully validate untrusted bytes; any defect raises WireError (never another
        exception type), before arrays are allocated."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireError(f"expected bytes, got {type(data).__name__}")
        try:
            data = memoryview(data).cast("B")
        except TypeError as e:  # a strided view cannot be read as one byte string
            raise WireError(f"bytes buffer is not contiguous: {e}") from None
        if len(data) < _PREFIX.size:
            raise WireError(f"{len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix (truncated)")
        magic, version, header_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise WireError(f"bad magic {bytes(magic)!r}: not a dlrl trajectory group")
        if version != WIRE_VERSION:
            raise WireError(f"unknown wire format version {version} (this reader knows {WIRE_VERSION})")
        if header_len > MAX_HEADER_BYTES:
            raise WireError(f"declared header length {header_len} exceeds the limit {MAX_HEADER_BYTES}")
        start = _PREFIX.size + header_len
        if len(data) < start:
            raise WireError(f"header declares {header_len} bytes, only {len(data) - _PREFIX.size} present (truncated)")
        header = _parse_header(bytes(data[_PREFIX.size:start]))
        layout = _check_layout(header["arrays"])
        payload = len(data) - start
        expected = sum(nbytes for _, _, _, nbytes in layout.values())
        if payload < expected:
            raise WireError(f"payload is {payload} bytes, the header declares {expected} (truncated)")
        if payload > expected:
            raise WireError(f"{payload - expected} trailing bytes after the declared payload")
        values = {}
        for name, (dtype, shape, offset, nbytes) in layout.items():
            chunk = data[start + offset:start + offset + nbytes]
            # astype copies into native byte order: the group owns writable arrays, not a view of
            # the (read-only, possibly reused) receive buffer.
            values[name] = np.frombuffer(chunk, dtype=dtype).reshape(shape).astype(np.dtype(dtype).newbyteorder("="))
        try:
            return cls(group_id=header["group_id"], task=header["task"], prompt_id=header["prompt_id"],
                       policy_version=header["policy_version"], mask_seed=header["mask_seed"],
                       timings=header["timings"], **values)
        except ValueError as e:
            raise WireError(f"inconsistent group: {e}") from None


def _check_behaviour(value: np.ndarray, completions: int) -> None:
    """behaviour_elbo is (completions, n_mc) with 1 <= n_mc <= MAX_MC and only finite terms: an
    inf or NaN l_old would turn every ratio of its completion into NaN and poison the update."""
    if value.ndim != 2 or value.shape[0] != completions:
        raise WireError(f"behaviour_elbo shape {value.shape} does not match {completions} completions "
                        f"(expected ({completions}, n_mc))")
    if not 1 <= value.shape[1] <= MAX_MC:
        raise WireError(f"behaviour_elbo has {value.shape[1]} MC terms per completion, expected 1 to {MAX_MC}")
    if not np.isfinite(value).all():
        raise WireError("behaviour_elbo has non-finite terms (NaN or inf)")


def _check_text(value: Any, name: str, cap: int) -> str:
    if type(value) is not str:
        raise WireError(f"{name} must be a string, got {type(value).__name__}")
    if not value and name == "group_id":
        raise WireError("group_id must not be empty: it is the key that makes delivery idempotent")
    if len(value) > cap:
        raise WireError(f"{name} is {len(value)} characters, the limit is {cap}")
    return value


def _check_int(value: Any, name: str) -> int:
    # bool is an int subclass; numpy integers are accepted on encode (the dataclass allows them).
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WireError(f"{name} must be an integer, got {type(value).__name__}")
    if not _INT_RANGE[0] <= int(value) < _INT_RANGE[1]:
        raise WireError(f"{name} {value} is outside the 64-bit range")
    return int(value)


def _check_timings(timings: Any) -> dict[str, float]:
    if not isinstance(timings, dict):
        raise WireError(f"timings must be an object of numbers, got {type(timings).__name__}")
    if len(timings) > MAX_TIMINGS:
        raise WireError(f"{len(timings)} timings, the limit is {MAX_TIMINGS}")
    out = {}
    for key, value in timings.items():
        if type(key) is not str or len(key) > MAX_TIMING_KEY:
            raise WireError(f"timing name {key!r} must be a string of at most {MAX_TIMING_KEY} characters")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise WireError(f"timing {key!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise WireError(f"timing {key!r} is {value}, not a finite number")
        out[key] = float(value)
    return out


def _show(value: Any) -> str:
    """A bounded repr of an untrusted value, for error messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _reject_constant(name: str) -> Any:
    raise WireError(f"header JSON contains {name}, which is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise WireError("header JSON has a duplicate key")
    return obj


def _parse_header(raw: bytes) -> dict[str, Any]:
    """The header object, with every scalar field checked (arrays are checked by _check_layout)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except WireError:
        raise
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting or numbers
        raise WireError(f"header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, got {type(header).__name__}")
    if set(header) != _HEADER_KEYS:
        missing, extra = _HEADER_KEYS - set(header), set(header) - _HEADER_KEYS
        raise WireError(f"header keys: missing {sorted(missing)}, unexpected {sorted(extra)[:8]}")
    for name, cap in MAX_TEXT.items():
        _check_text(header[name], name, cap)
    for name in ("policy_version", "mask_seed"):
        if type(header[name]) is not int:  # on the wire only a JSON integer will do
            raise WireError(f"{name} must be an integer, got {type(header[name]).__name__}")
        _check_int(header[name], name)
    header["timings"] = _check_timings(header["timings"])
    return header


def _check_layout(arrays: Any) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, offset, nbytes); dtypes exact, shapes capped, offsets contiguous."""
    if not isinstance(arrays, dict):
        raise WireError(f"'arrays' must be an object, got {type(arrays).__name__}")
    known = {name for name, _, _ in _ARRAYS}
    if set(arrays) - known:
        raise WireError(f"unknown arrays {sorted(set(arrays) - known)[:8]}")
    layout = {}
    offset = 0
    for name, dtype, ndim in _ARRAYS:
        if name not in arrays:
            if name in _OPTIONAL_ARRAYS:
                continue
            raise WireError(f"array {name!r} is missing")
        spec = arrays[name]
        if not isinstance(spec, dict) or set(spec) != _ARRAY_KEYS:
            raise WireError(f"array {name!r} must be an object with keys {sorted(_ARRAY_KEYS)}")
        if spec["dtype"] != dtype:
            raise WireError(f"array {name!r} has dtype {_show(spec['dtype'])}, expected {dtype!r}")
        shape = spec["shape"]
        if not isinstance(shape, list) or len(shape) != ndim:
            raise WireError(f"array {name!r} must have a shape of {ndim} dimension(s), got {_show(shape)}")
        for d in shape:
            if type(d) is not int or not 0 <= d <= MAX_DIM:
                raise WireError(f"array {name!r} has dimension {_show(d)}, expected an integer in [0, {MAX_DIM}]")
        if spec["offset"] != offset or type(spec["offset"]) is not int:
            raise WireError(f"array {name!r} is at offset {_show(spec['offset'])}, expected {offset} "
                            "(arrays are contiguous)")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        offset += nbytes
        if offset > MAX_PAYLOAD_BYTES:
            raise WireError(f"declared arrays need {offset} bytes or more, the limit is {MAX_PAYLOAD_BYTES}")
        layout[name] = (dtype, tuple(shape), spec["offset"], nbytes)
    return layout
