"""Countdown: combine the given numbers with + - * / to hit a target; reward as in d1/TinyZero.

Instances are built forwards, so each is solvable by construction and carries one solution:
draw `size` numbers in [min_number, max_number], combine random pairs with random operators until
one value is left, and keep the instance if that value is an integer in [min_target, max_target].
Arithmetic is exact `Fraction` arithmetic throughout — intermediate values may be fractions
(e.g. 7/2*4 = 14) — the same arithmetic the reward uses, so every stored solution scores 1.0.

Train and test are disjoint: an instance (its sorted numbers and target) belongs to "test" iff a
salted SHA-256 of it falls below `test_fraction`; each split's generator keeps only its own.

Formats (style "compact"):
    prompt  "3 7 25 50 -> 72\\n"   the numbers, " -> ", the target, "\\n"
    target  "50+25-3"             one solution equation, no spaces, no "=" or target
Style "chat" asks (like d1) for the equation inside <answer></answer>.

Reward: the equation is the answer region (last <answer>…</answer>, else the whole text).
1.0 if it parses, uses exactly the given numbers (as a multiset) and equals the target;
0.1 if it parses but the numbers or the value are wrong — division by zero counts as a wrong
value (0.1): the model produced a well-formed equation, only its value is undefined;
0.0 if there is no equation or it does not parse (including text over 200 chars, nesting over
32 levels, '=', '**', names, decimals).
"""

from __future__ import annotations

import hashlib
import random
from fractions import Fraction

from dlrl.tasks.answer_format import REASONING_FORMAT, answer_region, chat_answer
from dlrl.tasks.arithmetic import MAX_CHARS, ParseError, evaluate, literals, parse_expression
from dlrl.tasks.task import Example, Task

_SPLIT_SALT = "dlrl-countdown-split-v1"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3

Instance = tuple[list[int], int, str]  # numbers, target, one solution equation


def instance_key(numbers: list[int], target: int) -> str:
    """Order-free identity of an instance: the same numbers and target are the same puzzle."""
    return f"{','.join(map(str, sorted(numbers)))}->{target}"


def split_of(numbers: list[int], target: int, test_fraction: float) -> str:
    """"test" or "train", by a salted hash of the instance (stable across machines)."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{instance_key(numbers, target)}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _combine(op: str, a: tuple[Fraction, str, int], b: tuple[Fraction, str, int]
             ) -> tuple[Fraction, str, int] | None:
    """(value, text, precedence) of `a op b`, with only the parentheses the value needs."""
    (va, ta, pa), (vb, tb, pb) = a, b
    if op == "/" and vb == 0:
        return None
    value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else va}[op]
    prec = _PREC[op]
    if pa < prec:  # (a+b)*c
        ta = f"({ta})"
    if pb < prec or (op in "-/" and pb == prec):  # a-(b+c), a/(b*c)
        tb = f"({tb})"
    return value, f"{ta}{op}{tb}", prec


def random_instance(rng: random.Random, size: int, min_number: int, max_number: int,
                    min_target: int, max_target: int) -> Instance | None:
    """One forward-built instance, or None if its value is not an integer target in range."""
    numbers = [rng.randint(min_number, max_number) for _ in range(size)]
    items = [(Fraction(x), str(x), _ATOM) for x in numbers]
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        merged = _combine(rng.choice("+-*/"), items[i], items[j])
        if merged is None:
            return None
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [merged]
    value, text, _ = items[0]
    if value.denominator != 1 or not min_target <= value <= max_target:
        return None
    return numbers, int(value), text


def generate(split: str, n: int, seed: int, sizes: tuple[int, ...] = (3, 4), min_number: int = 1,
             max_number: int = 99, min_target: int = 1, max_target: int = 100,
             test_fraction: float = 0.1) -> list[Example]:
    """`n` distinct instances of `split`; a pure function of its arguments."""
    rng = random.Random(f"countdown:{split}:{seed}")
    examples: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    size = rng.choice(sizes)
    while len(examples) < n:
        attempts += 1
        if attempts > 1000 * n + 10_000:
            raise ValueError(f"could not make {n} distinct countdown instances for {split}")
        # the size is drawn per kept example, not per attempt: 4 numbers are rejected more often
        # than 3, and redrawing per attempt would skew the mix toward 3
        made = random_instance(rng, size, min_number, max_number, min_target, max_target)
        if made is None:
            continue
        numbers, target, solution = made
        key = instance_key(numbers, target)
        if key in seen or split_of(numbers, target, test_fraction) != split:
            continue
        seen.add(key)
        size = rng.choice(sizes)
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        examples.append(Example(id=f"countdown-{split}-{digest}",
                                question={"numbers": numbers, "target": target},
                                answer={"target": target, "solution": solution}))
    return examples


def solve(numbers: list[int], target: int) -> str | None:
    """Some equation using every number once that equals `target`, or None (brute force; for
    tests and analysis — 4 numbers take a few milliseconds)."""

    def search(items: list[tuple[Fraction, str, int]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                rest = [it for k, it in enumerate(items) if k not in (i, j)]
                for op in "+-*/":
                    if op in "+*" and i > j:  # commutative: one order is enough
                        continue
                    merged = _combine(op, items[i], items[j])
                    if merged is not None and (found := search(rest + [merged])):
                        return found
        return None

    return search([(Fraction(x), str(x), _ATOM) for x in numbers])


def prompt(ex: Example, style: str) -> str:
    """Compact: "3 7 25 50 -> 72\\n". Chat: a d1-style instruction."""
    numbers, target = ex.question["numbers"], ex.question["target"]
    if style == "compact":
        return f"{' '.join(map(str, numbers))} -> {target}\n"
    return (
        f"{REASONING_FORMAT}\n\n"
        f"Using only the numbers {numbers}, create an arithmetic expression that evaluates to "
        f"exactly {target}. Use every number exactly once; you may use +, -, * and / and "
        "parentheses. Put only the final expression inside <answer></answer>, without an equals "
        "sign or the target. For example, for the numbers [2, 3, 4] and the target 5, a valid "
        "answer is <answer>\n2*4-3\n</answer>."
    )


def target(ex: Example, style: str) -> str:
    """Compact: the stored solution equation. Chat: the same inside answer tags."""
    solution = ex.answer["solution"]
    return solution if style == "compact" else chat_answer(solution)


def reward(completion: str, ex: Example) -> float:
    """1.0 / 0.1 / 0.0 as in the module docstring."""
    region = answer_region(completion)
    if len(region) > MAX_CHARS:  # before strip(): never copy a huge string
        return 0.0
    try:
        tree = parse_expression(region.strip())
    except ParseError:
        return 0.0
    if sorted(literals(tree)) != sorted(ex.question["numbers"]):
        return 0.1
    try:  # numbers match, so the tree is tiny and evaluation cheap
        value = evaluate(tree)
    except ZeroDivisionError:
        return 0.1
    return 1.0 if value == ex.question["target"] else 0.1


def countdown_task(sizes: tuple[int, ...] = (3, 4), min_number: int = 1, max_number: int = 99,
                   min_target: int = 1, max_target: int = 100, test_fraction: float = 0.1,
                   train_size: int = 10_000, test_size: int = 500) -> Task:
    """The Countdown task. `sizes`: how many numbers an instance may have (drawn uniformly);
    numbers in [min_number, max_number]; targets in [min_target, max_target]; `test_fraction`
    of all instances (by hash) are test-only; `train_size`/`test_size`: what n=None means."""
    sizes = tuple(sizes)
    if not sizes or any(not 2 <= s <= 6 for s in sizes):
        raise ValueError(f"sizes must be numbers of operands in 2..6, got {sizes}")
    if not 0 <= min_number <= max_number or min_target > max_target:
        raise ValueError("need 0 <= min_number <= max_number and min_target <= max_target")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    def make_examples(split: str, n: int | None, seed: int) -> list[Example]:
        size = n if n is not None else (train_size if split == "train" else test_size)
        return generate(split, size, seed, sizes, min_number, max_number, min_target,
                        max_target, test_fraction)

    return Task(name="countdown", make_examples=make_examples, make_prompt=prompt, score=reward,
                make_target=target)
