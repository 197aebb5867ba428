"""4×4 Sudoku: all 288 valid grids, uniquely solvable puzzles, and a partial-credit reward.

Grids are strings of 16 digits 1–4, row-major; puzzles are the same with '.' for a blank.
The 288 grids are split once, by a fixed hash, into 48 test grids and 240 train grids, so the
held-out puzzles never share a solution with training puzzles and the split is identical on
every machine and Python version.

Formats (style "compact", for tiny character-level models):
    prompt  "1.3.\\n..2.\\n....\\n4...\\n"   the 4 puzzle rows, each followed by "\\n"
    target  "1234\\n3412\\n2143\\n4321"       the 4 solution rows joined by "\\n" (no trailing "\\n")
Style "chat" asks (like d1) for the 16-digit solution inside <answer></answer>; blanks are shown
as '0' there, as in d1's prompt.

Reward (as in d1/BGPO): the fraction of the puzzle's blank cells filled correctly.  The answer
region is the last <answer>…</answer> (else the whole text); its digits 0–9 are read in order,
ignoring everything else (whitespace, '|', …), and the first 16 are the grid; missing cells are
wrong.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

from dlrl.tasks.answer_format import REASONING_FORMAT, answer_region, chat_answer
from dlrl.tasks.task import Example, Task

SIDE = 4
CELLS = SIDE * SIDE
DIGITS = "1234"
BLANK = "."
TEST_GRIDS = 48
_SPLIT_SALT = "dlrl-sudoku-split-v1"
_CELL_DIGIT = re.compile(r"[0-9]")  # not \d: that also matches non-ASCII digits


def _peers(cell: int) -> frozenset[int]:
    """Cells sharing a row, column or 2×2 box with `cell` (excluding itself)."""
    r, c = divmod(cell, SIDE)
    br, bc = r // 2 * 2, c // 2 * 2
    same = {r * SIDE + j for j in range(SIDE)} | {i * SIDE + c for i in range(SIDE)}
    same |= {(br + i) * SIDE + bc + j for i in range(2) for j in range(2)}
    return frozenset(same - {cell})


PEERS = tuple(_peers(i) for i in range(CELLS))


def _check_puzzle(puzzle: str) -> list[str]:
    """`puzzle` as a list of cells ('.' for blank; '0' is accepted as a blank too)."""
    if len(puzzle) != CELLS or any(ch not in DIGITS + BLANK + "0" for ch in puzzle):
        raise ValueError(f"a 4x4 puzzle is 16 chars of 1-4 and '.', got {puzzle!r}")
    return [BLANK if ch == "0" else ch for ch in puzzle]


def _search(cells: list[str], limit: int, found: list[str]) -> None:
    """Depth-first fill of the first blank; appends solutions to `found` until it holds `limit`."""
    try:
        cell = cells.index(BLANK)
    except ValueError:
        found.append("".join(cells))
        return
    used = {cells[p] for p in PEERS[cell]}
    for digit in DIGITS:
        if digit not in used:
            cells[cell] = digit
            _search(cells, limit, found)
            cells[cell] = BLANK
            if len(found) >= limit:
                return


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of solutions of `puzzle`, counting stops at `limit` (2 answers "is it unique?")."""
    cells = _check_puzzle(puzzle)
    for i, ch in enumerate(cells):  # givens that already clash have no solution
        if ch != BLANK and any(cells[p] == ch for p in PEERS[i]):
            return 0
    found: list[str] = []
    _search(cells, limit, found)
    return len(found)


def solve(puzzle: str) -> str | None:
    """The first solution of `puzzle` in digit order, or None if it has none."""
    cells = _check_puzzle(puzzle)
    if count_solutions(puzzle, limit=1) == 0:
        return None
    found: list[str] = []
    _search(cells, 1, found)
    return found[0]


@lru_cache(maxsize=1)
def all_grids() -> tuple[str, ...]:
    """All 288 valid 4×4 grids, in lexicographic order."""
    found: list[str] = []
    _search([BLANK] * CELLS, limit=10**6, found=found)
    return tuple(sorted(found))


@lru_cache(maxsize=2)
def split_grids(split: str) -> tuple[str, ...]:
    """The grids of `split`: 48 test / 240 train, fixed by a salted SHA-256 order (not by `random`,
    whose algorithms may change) so every machine holds out the same grids."""
    ranked = sorted(all_grids(), key=lambda g: hashlib.sha256(f"{_SPLIT_SALT}:{g}".encode()).digest())
    if split == "test":
        return tuple(ranked[:TEST_GRIDS])
    if split == "train":
        return tuple(ranked[TEST_GRIDS:])
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def make_puzzle(grid: str, blanks: int, rng: random.Random) -> str | None:
    """Blank `blanks` cells of `grid` in a random order, skipping any removal that would admit a
    second solution; None if this order cannot reach `blanks` (the caller retries)."""
    cells = list(grid)
    order = list(range(CELLS))
    rng.shuffle(order)
    removed = 0
    for i in order:
        if removed == blanks:
            break
        kept, cells[i] = cells[i], BLANK
        if count_solutions("".join(cells)) == 1:
            removed += 1
        else:
            cells[i] = kept
    return "".join(cells) if removed == blanks else None


def _example(split: str, puzzle: str, grid: str) -> Example:
    digest = hashlib.sha256(puzzle.encode()).hexdigest()[:10]
    return Example(id=f"sudoku-{split}-{digest}", question={"puzzle": puzzle},
                   answer={"solution": grid})


def generate(split: str, n: int | None, seed: int, min_blanks: int = 6,
             max_blanks: int = 10) -> list[Example]:
    """`n` distinct uniquely-solvable puzzles from the grids of `split`, each with a blank count
    drawn uniformly from [min_blanks, max_blanks]; n=None gives one puzzle per grid of the split.
    A pure function of its arguments (string-seeded `random.Random`, which hashes with SHA-512)."""
    grids = split_grids(split)
    rng = random.Random(f"sudoku:{split}:{seed}:{min_blanks}:{max_blanks}")
    examples: list[Example] = []
    seen: set[str] = set()
    picks = iter(grids) if n is None else None
    target = len(grids) if n is None else n
    attempts = 0
    while len(examples) < target:
        attempts += 1
        if attempts > 100 * target + 1000:
            raise ValueError(f"could not make {target} distinct sudoku puzzles with "
                             f"{min_blanks}-{max_blanks} blanks from the {split} grids")
        grid = next(picks) if picks is not None else rng.choice(grids)
        puzzle = None
        for _ in range(100):  # 12 blanks takes ~2 removal orders on average, 10 just one
            puzzle = make_puzzle(grid, rng.randint(min_blanks, max_blanks), rng)
            if puzzle is not None:
                break
        else:
            raise ValueError(f"no unique puzzle with {min_blanks}-{max_blanks} blanks for {grid}")
        if puzzle in seen:
            if picks is not None:  # n=None walks grids once; different grids can't collide
                raise AssertionError("unreachable: distinct grids gave the same puzzle")
            continue
        seen.add(puzzle)
        examples.append(_example(split, puzzle, grid))
    return examples


def rows(cells: str) -> list[str]:
    """The 4 rows of a 16-char grid or puzzle."""
    return [cells[i:i + SIDE] for i in range(0, CELLS, SIDE)]


def prompt(ex: Example, style: str) -> str:
    """Compact: the 4 puzzle rows, each followed by "\\n". Chat: a d1-style instruction."""
    puzzle = ex.question["puzzle"]
    if style == "compact":
        return "".join(row + "\n" for row in rows(puzzle))
    return (
        f"{REASONING_FORMAT}\n\n"
        "Please solve the following 4x4 Sudoku puzzle. The puzzle is given as a 16-character "
        "string read left-to-right, top-to-bottom, where '0' marks an empty cell.\n"
        "Rules: fill the empty cells with digits 1-4 so that every row, every column and every "
        "2x2 box contains each of 1, 2, 3, 4 exactly once.\n"
        "Put your final solved grid inside <answer></answer> as a 16-digit string of 1-4, "
        "with no spaces or separators.\n\n"
        f"Puzzle: {puzzle.replace(BLANK, '0')}"
    )


def target(ex: Example, style: str) -> str:
    """Compact: the solution rows joined by "\\n". Chat: the 16 digits inside answer tags."""
    solution = ex.answer["solution"]
    return "\n".join(rows(solution)) if style == "compact" else chat_answer(solution)


def reward(completion: str, ex: Example) -> float:
    """Fraction of the puzzle's blank cells whose digit (see module docstring) is right."""
    puzzle, solution = ex.question["puzzle"], ex.answer["solution"]
    blanks = [i for i, ch in enumerate(puzzle) if ch in (BLANK, "0")]
    if not blanks:
        return 0.0
    digits: list[str] = []
    for match in _CELL_DIGIT.finditer(answer_region(completion)):  # stops after 16: C-speed scan
        digits.append(match.group())
        if len(digits) == CELLS:
            break
    right = sum(1 for i in blanks if i < len(digits) and digits[i] == solution[i])
    return right / len(blanks)


def sudoku_task(min_blanks: int = 6, max_blanks: int = 10) -> Task:
    """The 4×4 Sudoku task; puzzles have between `min_blanks` and `max_blanks` blank cells.

    At most 12 blanks: a 4×4 Sudoku needs at least 4 givens to be unique (every grid has such a
    puzzle, and random removal orders find one in ~2 tries)."""
    if not 1 <= min_blanks <= max_blanks <= 12:
        raise ValueError(f"need 1 <= min_blanks <= max_blanks <= 12, got {min_blanks}, {max_blanks}")

    def make_examples(split: str, n: int | None, seed: int) -> list[Example]:
        return generate(split, n, seed, min_blanks, max_blanks)

    return Task(name="sudoku", make_examples=make_examples, make_prompt=prompt, score=reward,
                make_target=target)
