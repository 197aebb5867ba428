"""The judge's wire format (dlrl/judge.py): plain data crosses exactly, anything else only as a
reference; and values of every plain type reach the tests through the real sandbox."""

from __future__ import annotations

import collections
import json
import math

import pytest

from dlrl import sandbox
from dlrl.judge import decode, encode


def roundtrip(value, refs=None):
    kept = []
    data = json.loads(json.dumps(encode(value, refs or (lambda v: kept.append(v) or len(kept) - 1))))
    return decode(data, kept.__getitem__)


@pytest.mark.parametrize("value", [None, True, 0, -7, 10 ** 50, 2.5, -0.0, "é\n", b"\x00x", 3 - 1j,
                                   [1, [2.0]], (1, ("a",)), {(1, 2): {"k": [None]}},
                                   {frozenset({1}), 2}, frozenset(), set()])
def test_plain_values_cross_with_their_exact_types(value):
    back = roundtrip(value)
    assert back == value and type(back) is type(value)
    if isinstance(value, float):
        assert math.copysign(1, back) == math.copysign(1, value)


def test_subclasses_cross_as_their_base_type():
    point = collections.namedtuple("Point", "x y")(1, 2)
    assert type(roundtrip(point)) is tuple and roundtrip(point) == (1, 2)
    counts = roundtrip(collections.Counter("aab"))
    assert type(counts) is dict and counts == {"a": 2, "b": 1}

    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    back = roundtrip(Liar(3))
    assert type(back) is int and back == 3 and back != 4


def test_other_objects_stay_behind_as_references():
    class Anything:
        def __eq__(self, other):
            return True

    thing = Anything()
    kept = []
    data = encode([thing, 1], lambda v: kept.append(v) or len(kept) - 1)
    assert data == [{"$": "ref", "v": 0}, 1] and kept == [thing]
    with pytest.raises(TypeError):
        encode(thing, lambda v: (_ for _ in ()).throw(TypeError("no")))


@pytest.mark.parametrize("data", [{"$": "pickle", "v": "x"}, {"k": 1}, {"$": "ref", "v": "0"},
                                  {"$": "tuple", "v": [1], "extra": 2}])
def test_malformed_values_are_refused(data):
    with pytest.raises((ValueError, TypeError)):
        decode(data, lambda ref: None)


@pytest.mark.skipif(sandbox.backend() == "none", reason="no sandbox backend works here")
def test_values_of_every_kind_reach_the_tests():
    program = ("import collections\ndef f():\n    return (collections.Counter('aab'), {1: {2.5}}, "
               "float('nan'), b'x', 3j, 7 ** 3000, (x for x in [1, 2]))\n"
               "class Node:\n    def __init__(self, v):\n        self.v, self.left = v, None\n"
               "def depth(n):\n    return 0 if n is None else 1 + depth(n.left)\n")
    tests = ("c, d, n, b, z, big, g = f()\n"
             "assert c == {'a': 2, 'b': 1} and d == {1: {2.5}} and n != n and b == b'x'\n"
             "assert z == 3j and big == 7 ** 3000 and list(g) == [1, 2]\n"
             "root = Node(1)\nroot.left = Node(2)\nroot.left.left = Node(3)\n"
             "assert depth(root) == 3 and root.left.v == 2\n")
    result = sandbox.run_tests(program, tests, ("f", "Node", "depth"))
    assert result.passed, result
    missing = sandbox.run_tests("def f():\n    return 1\n", "assert depth(None) == 0",
                                ("depth",), reference="def depth(n):\n    return 0\n")
    assert not missing.passed and "NameError" in missing.stderr  # never the reference's own
