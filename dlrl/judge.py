"""The two programs of a code-reward run, each in its own sandbox: the candidate's server and the
judge that runs the tests against it.

Why two interpreters: code can rewrite anything in the interpreter it runs in (the harness's
exit, its exception printing, a trace function over the asserts, builtins, the frame holding a
pass marker), so the verdict must be reached and written where the model's code never ran.

- `serve` (candidate side) executes the model's program, then only answers requests arriving on
  a pipe: call this object with these arguments, read or set this attribute, list this iterable.
- `judge` (trusted side) executes the reference program (the prompt's helpers, the imports the
  tests rely on), binds the candidate's names to `Remote` proxies that forward each use over the
  pipe, runs the tests, and only if they all returned writes the pass marker (a per-run nonce)
  to its own stdout, which the candidate cannot reach.

Values cross the pipe as JSON of plain data (`encode` / `decode`): None, bool, int, float, str,
bytes, complex, list, tuple, dict, set and frozenset, rebuilt by the judge with exactly those
types, so a comparison in a test runs the builtin type's own code.  Subclass instances
(namedtuple, Counter, IntEnum) cross as their base type, converted on the candidate's side.
Anything else (a generator, an instance of the candidate's class) stays in the candidate's
process and the judge holds a `Remote` reference to it: equal only to itself, hashable by
identity, with no order, length or arithmetic, so it satisfies no test a plain value could not.

sandbox.py runs this file's text with `python -I -c`, so it imports only the standard library.
Both sides first forbid creating user namespaces (`deny_user_namespaces`): with none, an
unprivileged program cannot gain the capabilities to mount a tmpfs outside the memory caps.
"""

from __future__ import annotations

import builtins
import json
import os
import sys

MAX_MESSAGE = 16 << 20
"""Longest request or reply line; a longer reply is an error (the test fails)."""
PLAIN = (bool, int, float, str, bytes, complex, tuple, list, dict, frozenset, set)
"""Base types a subclass instance is converted to, in this order (bool before int)."""


def encode(value, refs) -> object:
    """`value` as JSON-able data.  `refs(value)` gives the reference id of a value that is not
    plain data (or raises TypeError where none may cross)."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v, refs) for v in value]
    if kind in (tuple, set, frozenset):
        return {"$": kind.__name__, "v": [encode(v, refs) for v in value]}
    if kind is dict:
        return {"$": "dict", "v": [[encode(k, refs), encode(v, refs)] for k, v in value.items()]}
    if kind is bytes:
        return {"$": "bytes", "v": value.hex()}
    if kind is complex:
        return {"$": "complex", "v": [value.real, value.imag]}
    if kind is Remote:
        return {"$": "ref", "v": value._ref}
    for base in PLAIN:
        if isinstance(value, base):
            converted = base(value.items()) if base is dict else base(value)
            if type(converted) is base:
                return encode(converted, refs)
    return {"$": "ref", "v": refs(value)}


def decode(data, resolve) -> object:
    """The value `encode` gave `data` for; `resolve(id)` turns a reference into an object."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v, resolve) for v in data]
    if type(data) is not dict or set(data) != {"$", "v"}:
        raise ValueError("malformed value")
    tag, v = data["$"], data["v"]
    if tag in ("tuple", "set", "frozenset"):
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](
            decode(x, resolve) for x in v)
    if tag == "dict":
        return {decode(k, resolve): decode(x, resolve) for k, x in v}
    if tag == "bytes":
        return bytes.fromhex(v)
    if tag == "complex":
        return complex(float(v[0]), float(v[1]))
    if tag == "ref" and type(v) is int:
        return resolve(v)
    raise ValueError(f"unknown value tag {tag!r}")


def deny_user_namespaces() -> None:
    """Install a seccomp filter: unshare/clone with CLONE_NEWUSER fail with EPERM, clone3 with
    ENOSYS (so libc falls back to clone, which the filter can inspect), and syscalls of another
    ABI (x32, int 0x80) with ENOSYS.  Exits 97 where it cannot, so nothing runs unfiltered."""
    try:
        import ctypes
        import platform

        arch, nr_unshare, nr_clone = {"x86_64": (0xC000003E, 272, 56),
                                      "aarch64": (0xC00000B7, 97, 220)}[platform.machine()]
        ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
        allow, enosys, eperm = 0x7FFF0000, 0x50000 | 38, 0x50000 | 1
        prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, enosys),  # arch at offset 4
                (ld, 0, 0, 0),  # the syscall number
                (jge, 0, 1, 0x40000000), (ret, 0, 0, enosys),  # x32
                (jeq, 0, 1, 435), (ret, 0, 0, enosys),  # clone3
                (jeq, 1, 0, nr_unshare), (jeq, 0, 3, nr_clone),
                (ld, 0, 0, 16),  # args[0], low half: the flags
                (jset, 0, 1, 0x10000000), (ret, 0, 0, eperm),  # CLONE_NEWUSER
                (ret, 0, 0, allow)]

        class Filter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                        ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

        filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                               ctypes.c_ulong, ctypes.c_ulong]
        if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        program = Program(len(prog), filters)
        if libc.prctl(22, 2, ctypes.byref(program), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
            raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
    except Exception as e:  # noqa: BLE001 -- any failure means: do not run unfiltered
        os.write(2, f"sandbox: cannot forbid user namespaces: {e!r}\n".encode())
        os._exit(97)


def _stdin_then_devnull() -> bytes:
    data = sys.stdin.buffer.read()
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    return data


def _send(out, message) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def _error(e: BaseException) -> dict:
    try:
        text = str(e)[:2000]
    except BaseException:  # noqa: BLE001 -- the candidate's __str__ may raise anything
        text = "?"
    return {"err": [type(e).__name__, text]}


def serve(requests_fd: int, replies_fd: int) -> None:
    """The candidate's side: stdin is a JSON line naming what to export, then the program."""
    deny_user_namespaces()
    sys.set_int_max_str_digits(0)  # big integers are answers too (and cost only the run's time)
    header, _, source = _stdin_then_devnull().partition(b"\n")
    requests, replies = os.fdopen(requests_fd, "rb"), os.fdopen(replies_fd, "wb")
    objects: list = []

    def ref(value) -> int:
        objects.append(value)
        return len(objects) - 1

    try:
        namespace = {"__name__": "program", "__builtins__": builtins}
        exec(compile(source.decode("utf-8"), "program.py", "exec"), namespace)  # noqa: S102
        sys.stdout.flush()
        exported = {name: namespace[name] for name in json.loads(header) if name in namespace}
        _send(replies, {"ok": encode(exported, ref)})
    except BaseException as e:  # noqa: BLE001 -- SystemExit too: the program did not finish
        import traceback

        traceback.print_exc()
        _send(replies, _error(e))
        os._exit(1)
    while line := requests.readline(MAX_MESSAGE):
        try:
            request = json.loads(line)
            target = objects[request["ref"]]
            op = request["op"]
            if op == "call":
                args = decode(request["args"], objects.__getitem__)
                kwargs = decode(request["kwargs"], objects.__getitem__)
                value = target(*args, **kwargs)
            elif op == "getattr":
                value = getattr(target, request["name"])
            elif op == "setattr":
                value = setattr(target, request["name"],
                                decode(request["value"], objects.__getitem__))
            elif op == "list":
                value = list(target)
            else:
                raise ValueError(f"unknown request {op!r}")
            reply = {"ok": encode(value, ref)}
        except BaseException as e:  # noqa: BLE001 -- whatever the candidate raises is its answer
            reply = _error(e)
        sys.stdout.flush()
        _send(replies, reply)
    os._exit(0)


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one, or its process ended."""


class _Channel:
    """The judge's end of the pipes to the candidate."""

    def __init__(self, requests_fd: int, replies_fd: int):
        self.requests = os.fdopen(requests_fd, "wb")
        self.replies = os.fdopen(replies_fd, "rb")
        self.remotes: dict[int, Remote] = {}

    def remote(self, ref: int) -> Remote:
        if ref not in self.remotes:
            self.remotes[ref] = Remote(self, ref)
        return self.remotes[ref]

    def reply(self):
        line = self.replies.readline(MAX_MESSAGE)
        if not line.endswith(b"\n"):
            raise CandidateError("the candidate's process ended or sent an overlong reply")
        message = json.loads(line)
        if type(message) is not dict:
            raise CandidateError("malformed reply")
        if "ok" in message:
            return decode(message["ok"], self.remote)
        name, text = message["err"]
        kind = getattr(builtins, str(name), None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            raise kind(f"(in the candidate) {text}")
        raise CandidateError(f"{name}: {text}")

    def ask(self, op: str, ref: int, **fields):
        self.requests.write(json.dumps({"op": op, "ref": ref, **fields}).encode() + b"\n")
        self.requests.flush()
        return self.reply()


def _refuse(value) -> int:
    raise TypeError(f"{type(value).__name__} cannot be passed to the candidate")


class Remote:
    """An object in the candidate's process: calls, attributes and iteration go there."""

    __slots__ = ("_channel", "_ref")

    def __init__(self, channel: _Channel, ref: int):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        return self._channel.ask("call", self._ref, args=encode(list(args), _refuse),
                                 kwargs=encode(kwargs, _refuse))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._channel.ask("getattr", self._ref, name=name)

    def __setattr__(self, name: str, value) -> None:
        self._channel.ask("setattr", self._ref, name=name, value=encode(value, _refuse))

    def __iter__(self):
        return iter(self._channel.ask("list", self._ref))

    def __repr__(self) -> str:
        return f"<candidate object {self._ref}>"


def judge(requests_fd: int, replies_fd: int) -> None:
    """The trusted side: stdin is the nonce line, then JSON {"names", "reference", "tests"}."""
    deny_user_namespaces()
    sys.set_int_max_str_digits(0)
    nonce, _, body = _stdin_then_devnull().partition(b"\n")
    report = os.dup(1)
    try:
        plan = json.loads(body)
        channel = _Channel(requests_fd, replies_fd)
        exported = channel.reply()
        namespace = {"__name__": "reference", "__builtins__": builtins}
        exec(compile(plan["reference"], "reference.py", "exec"), namespace)  # noqa: S102
        for name in plan["names"]:
            if name in exported:
                namespace[name] = exported[name]
            else:  # never the reference's own: a test using it raises NameError
                namespace.pop(name, None)
        exec(compile(plan["tests"], "tests.py", "exec"), namespace)  # noqa: S102
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 -- any failure of a test is a fail
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os.write(report, b"\n" + nonce + b"\n")
    os._exit(0)
