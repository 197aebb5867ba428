"""The TrajectoryGroup wire format: exact round trips, and every kind of bad input is a WireError.

Corrupt frames are built here with `struct` and `json` from the layout the module docstring
documents, independently of the encoder, so these tests also pin the format itself.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlrl import trajectory as wire
from dlrl.trajectory import MAGIC, WIRE_VERSION, TrajectoryGroup, WireError

I32 = st.integers(-(2**31), 2**31 - 1)
I16 = st.integers(-(2**15), 2**15 - 1)
TEXT = st.text(max_size=40)


@st.composite
def groups(draw) -> TrajectoryGroup:
    g = draw(st.integers(0, 6))
    length = draw(st.integers(0, 12))
    prompt = draw(st.lists(I32, max_size=20))
    completions = draw(st.lists(st.lists(I32, min_size=length, max_size=length), min_size=g, max_size=g))
    rewards = draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=g, max_size=g))
    steps = draw(st.none() | st.lists(st.lists(I16, min_size=length, max_size=length), min_size=g, max_size=g))
    return TrajectoryGroup(
        group_id=draw(st.text(min_size=1, max_size=40)),
        task=draw(TEXT),
        prompt_id=draw(TEXT),
        prompt_ids=np.array(prompt, dtype=np.int32),
        completion_ids=np.array(completions, dtype=np.int32).reshape(g, length),
        rewards=np.array(rewards, dtype=np.float32),
        policy_version=draw(st.integers(-(2**63), 2**63 - 1)),
        mask_seed=draw(st.integers(0, 2**64 - 1)),
        unmask_steps=None if steps is None else np.array(steps, dtype=np.int16).reshape(g, length),
        timings=draw(st.dictionaries(st.text(max_size=16), st.floats(allow_nan=False, allow_infinity=False),
                                     max_size=4)),
    )


def assert_same(a: TrajectoryGroup, b: TrajectoryGroup) -> None:
    assert (a.group_id, a.task, a.prompt_id, a.policy_version, a.mask_seed, a.timings) == \
           (b.group_id, b.task, b.prompt_id, b.policy_version, b.mask_seed, b.timings)
    for name in ("prompt_ids", "completion_ids", "rewards", "unmask_steps"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name  # bitwise: NaN rewards and -0.0 survive too


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups())
def test_round_trip_is_exact(group: TrajectoryGroup):
    data = group.to_bytes()
    back = TrajectoryGroup.from_bytes(data)
    assert_same(group, back)
    assert back.to_bytes() == data  # deterministic: the same group always encodes the same way
    back.completion_ids[...] = 0  # decoded arrays are owned and writable, not views of `data`


def sample(unmask: bool = True) -> TrajectoryGroup:
    return TrajectoryGroup(
        group_id="run/b3-w0-1", task="sudoku", prompt_id="ex-7", prompt_ids=np.array([5, 6, 7]),
        completion_ids=np.array([[1, 2], [3, 4]]), rewards=np.array([1.0, 0.25]), policy_version=3,
        mask_seed=12345, unmask_steps=np.array([[0, 1], [1, 0]]) if unmask else None,
        timings={"generate": 0.5},
    )


def test_golden_bytes():
    """The layout is exactly what the module docstring says (a format change needs a new version)."""
    header = (b'{"group_id":"run/b3-w0-1","task":"sudoku","prompt_id":"ex-7","policy_version":3,'
              b'"mask_seed":12345,"timings":{"generate":0.5},"arrays":{'
              b'"prompt_ids":{"dtype":"<i4","shape":[3],"offset":0},'
              b'"completion_ids":{"dtype":"<i4","shape":[2,2],"offset":12},'
              b'"rewards":{"dtype":"<f4","shape":[2],"offset":28},'
              b'"unmask_steps":{"dtype":"<i2","shape":[2,2],"offset":36}}}')
    payload = (struct.pack("<3i", 5, 6, 7) + struct.pack("<4i", 1, 2, 3, 4) + struct.pack("<2f", 1.0, 0.25)
               + struct.pack("<4h", 0, 1, 1, 0))
    assert sample().to_bytes() == b"DLRLTG\r\n" + struct.pack("<HI", 1, len(header)) + header + payload


def test_encoder_normalises_byte_order_and_layout():
    g = sample()
    g.completion_ids = np.array([[1, 2, 9], [3, 4, 9]], dtype=">i4")[:, :2]  # big-endian, strided
    g.prompt_ids = np.array([5, 6, 7], dtype=">i4")
    assert TrajectoryGroup.from_bytes(g.to_bytes()).completion_ids.tolist() == [[1, 2], [3, 4]]
    assert g.to_bytes() == sample().to_bytes()


@pytest.mark.parametrize("change, reason", [
    (dict(group_id=""), "group_id must not be empty"),
    (dict(group_id="x" * 300), "group_id is 300 characters"),
    (dict(timings={"t": float("nan")}), "not a finite number"),
    (dict(timings={1: 0.5}), "timing name"),
    (dict(policy_version=2**64), "outside the 64-bit range"),
    (dict(mask_seed=1.5), "mask_seed must be an integer"),
    (dict(completion_ids=np.zeros((2, 2), dtype=np.int64)), "completion_ids must be a 2-D <i4"),
    (dict(rewards=np.zeros(3, dtype=np.float32)), "do not match"),
])
def test_unencodable_groups_are_refused(change, reason):
    g = sample()
    for k, v in change.items():
        setattr(g, k, v)  # reassigned after construction, past the dataclass's checks
    with pytest.raises(WireError, match=reason):
        g.to_bytes()


# -- corrupt input --------------------------------------------------------------------------------


def frame(header: dict | bytes, payload: bytes, *, magic: bytes = MAGIC, version: int = WIRE_VERSION,
          header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    return magic + struct.pack("<HI", version, n) + raw + payload


def parts(group: TrajectoryGroup | None = None) -> tuple[dict, bytes]:
    data = (group or sample()).to_bytes()
    (n,) = struct.unpack_from("<I", data, 10)
    return json.loads(data[14:14 + n]), data[14 + n:]


def edited(edit) -> bytes:
    header, payload = parts()
    edit(header)
    return frame(header, payload)


def _set(path: str, value):
    def edit(header: dict) -> None:
        *keys, last = path.split(".")
        obj = header
        for k in keys:
            obj = obj[k]
        obj[last] = value
    return edit


def _delete(path: str):
    def edit(header: dict) -> None:
        *keys, last = path.split(".")
        obj = header
        for k in keys:
            obj = obj[k]
        del obj[last]
    return edit


GOOD = sample().to_bytes()
HEADER, PAYLOAD = parts()

CORRUPT = {
    # framing
    "empty": (b"", "shorter than"),
    "prefix cut": (GOOD[:9], "shorter than"),
    "flipped magic": (b"X" + GOOD[1:], "bad magic"),
    "text-mode mangled magic": (GOOD.replace(b"\r\n", b"\n", 1), "bad magic"),
    "unknown version": (frame(HEADER, PAYLOAD, version=7), "unknown wire format version 7"),
    "version zero": (frame(HEADER, PAYLOAD, version=0), "unknown wire format version 0"),
    "huge header length": (frame(HEADER, PAYLOAD, header_len=2**32 - 1), "exceeds the limit"),
    "header cut": (GOOD[:40], "truncated"),
    "payload cut": (GOOD[:-1], "truncated"),
    "trailing bytes": (GOOD + b"\0", "1 trailing bytes"),
    "no payload": (frame(HEADER, b""), "truncated"),
    # header JSON
    "not utf-8": (frame(b"\xff\xfe{}", PAYLOAD), "not valid JSON"),
    "not json": (frame(b"{group_id: 1}", PAYLOAD), "not valid JSON"),
    "json array": (frame(b"[1, 2]", PAYLOAD), "must be a JSON object"),
    "deep nesting": (frame(b"[" * 30_000 + b"]" * 30_000, PAYLOAD), "not valid JSON"),
    "giant integer": (frame(json.dumps(HEADER).replace('"mask_seed": 12345', '"mask_seed": ' + "9" * 5000).encode(),
                            PAYLOAD), "not valid JSON"),
    "NaN constant": (frame(json.dumps(HEADER).replace('"generate": 0.5', '"generate": NaN').encode(), PAYLOAD),
                     "NaN"),
    "infinite timing": (frame(json.dumps(HEADER).replace('"generate": 0.5', '"generate": 1e999').encode(), PAYLOAD),
                        "not a finite number"),
    "duplicate key": (frame(json.dumps(HEADER).replace('{"group_id"', '{"task": "x", "group_id"', 1).encode(),
                            PAYLOAD), "duplicate key"),
    "missing key": (edited(_delete("task")), r"missing \['task'\]"),
    "extra key": (edited(_set("pickle", "cos\nsystem")), r"unexpected \['pickle'\]"),
    "group_id not a string": (edited(_set("group_id", 5)), "group_id must be a string"),
    "empty group_id": (edited(_set("group_id", "")), "must not be empty"),
    "long prompt_id": (edited(_set("prompt_id", "p" * 10_000)), "prompt_id is 10000 characters"),
    "bool version": (edited(_set("policy_version", True)), "policy_version must be an integer"),
    "float seed": (edited(_set("mask_seed", 1.0)), "mask_seed must be an integer"),
    "seed out of range": (edited(_set("mask_seed", 2**64)), "64-bit range"),
    "timings not object": (edited(_set("timings", [1])), "timings must be an object"),
    "timing is string": (edited(_set("timings", {"generate": "fast"})), "must be a number"),
    "too many timings": (edited(_set("timings", {str(i): 0.0 for i in range(100)})), "the limit is 64"),
    # arrays
    "arrays not object": (edited(_set("arrays", [])), "'arrays' must be an object"),
    "array missing": (edited(_delete("arrays.rewards")), "'rewards' is missing"),
    "unknown array": (edited(_set("arrays.weights", {"dtype": "<f4", "shape": [0], "offset": 44})), "unknown arrays"),
    "array spec extra key": (edited(_set("arrays.rewards.strides", [4])), "must be an object with keys"),
    "wrong dtype int64": (edited(_set("arrays.prompt_ids.dtype", "<i8")), "dtype '<i8', expected '<i4'"),
    "big-endian dtype": (edited(_set("arrays.rewards.dtype", ">f4")), "dtype '>f4'"),
    "object dtype": (edited(_set("arrays.completion_ids.dtype", "|O")), "dtype '|O'"),
    "dtype not string": (edited(_set("arrays.rewards.dtype", 4)), "dtype 4"),
    "wrong ndim": (edited(_set("arrays.completion_ids.shape", [4])), "shape of 2 dimension"),
    "negative dim": (edited(_set("arrays.prompt_ids.shape", [-3])), "dimension -3"),
    "float dim": (edited(_set("arrays.prompt_ids.shape", [3.0])), "dimension 3.0"),
    "shape not list": (edited(_set("arrays.prompt_ids.shape", "3")), "shape of 1 dimension"),
    "shape mismatch (more bytes declared)": (edited(_set("arrays.prompt_ids.shape", [4])), "offset 12, expected 16"),
    "shape mismatch (fewer bytes declared)": (edited(_set("arrays.unmask_steps.shape", [2, 1])), "4 trailing bytes"),
    "rewards disagree with completions": (
        frame({**HEADER, "arrays": {**HEADER["arrays"],
                                    "rewards": {"dtype": "<f4", "shape": [1], "offset": 28},
                                    "unmask_steps": {"dtype": "<i2", "shape": [2, 2], "offset": 32}}},
              PAYLOAD[:32] + PAYLOAD[36:]), "inconsistent group"),
    "overlapping offset": (edited(_set("arrays.rewards.offset", 0)), "offset 0, expected 28"),
    "bool offset": (edited(_set("arrays.prompt_ids.offset", False)), "expected 0"),
    "huge declared shape": (edited(_set("arrays.completion_ids.shape", [2**24, 2**24])), "the limit is"),
    "dimension over cap": (edited(_set("arrays.prompt_ids.shape", [2**40])), "dimension 1099511627776"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_input_is_a_wire_error(name):
    data, reason = CORRUPT[name]
    with pytest.raises(WireError, match=reason):
        TrajectoryGroup.from_bytes(data)


def test_every_truncation_is_a_wire_error():
    for n in range(len(GOOD)):
        with pytest.raises(WireError):
            TrajectoryGroup.from_bytes(GOOD[:n])


def test_non_bytes_input():
    for bad in ("DLRLTG", None, 5, [1, 2], np.zeros((4, 4))[:, ::2]):
        with pytest.raises(WireError):
            TrajectoryGroup.from_bytes(bad)  # type: ignore[arg-type]
    assert_same(TrajectoryGroup.from_bytes(bytearray(GOOD)), sample())
    assert_same(TrajectoryGroup.from_bytes(memoryview(GOOD)), sample())


def test_huge_declared_shape_is_refused_before_allocating():
    """A few bytes claiming a 2**24 x 2**24 completion matrix fail on the header alone."""
    data, _ = CORRUPT["huge declared shape"]
    assert len(data) < 1024
    header, payload = parts()
    header["arrays"]["prompt_ids"]["shape"] = [wire.MAX_DIM]  # an allowed dim, but no such bytes
    for name in ("completion_ids", "rewards", "unmask_steps"):
        header["arrays"][name]["offset"] += 4 * wire.MAX_DIM - 12
    with pytest.raises(WireError, match="truncated"):
        TrajectoryGroup.from_bytes(frame(header, payload))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_bytes_decode_or_raise_wire_error(data):
    """Random bit flips, cuts and insertions: the decoder returns a valid group or raises
    WireError, never another exception type."""
    raw = bytearray(data.draw(st.sampled_from([GOOD, sample(unmask=False).to_bytes()])))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and pos < len(raw):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[pos:pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        group = TrajectoryGroup.from_bytes(bytes(raw))
    except WireError:
        return
    assert TrajectoryGroup.from_bytes(group.to_bytes()).group_id == group.group_id
