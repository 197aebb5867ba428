"""4×4 Sudoku: the 288 grids, the fixed split, unique puzzles, and the partial-credit reward."""

from __future__ import annotations

import pytest

from dlrl.tasks import Example, get_task
from dlrl.tasks.sudoku import all_grids, count_solutions, rows, solve, split_grids, sudoku_task

# rows 1234 / 3412 / 2143 / 4321: every row, column and 2×2 box is a permutation of 1..4
SOLUTION = "1234341221434321"
BLANKS = (1, 4, 8, 15)
PUZZLE = "".join("." if i in BLANKS else ch for i, ch in enumerate(SOLUTION))  # "1.34.412.143432."
EX = Example(id="hand", question={"puzzle": PUZZLE}, answer={"solution": SOLUTION})


def _is_valid_grid(grid: str) -> bool:
    """Independent check (not the module's peers table): rows, columns and boxes are 1..4."""
    rows = [grid[4 * r:4 * r + 4] for r in range(4)]
    cols = ["".join(row[c] for row in rows) for c in range(4)]
    boxes = ["".join(rows[r + i][c + j] for i in range(2) for j in range(2))
             for r in (0, 2) for c in (0, 2)]
    return all(sorted(unit) == list("1234") for unit in rows + cols + boxes)


def test_all_288_grids_are_valid_and_distinct():
    grids = all_grids()
    assert len(grids) == 288 == len(set(grids))
    assert all(_is_valid_grid(g) for g in grids)
    assert SOLUTION in grids


def test_split_is_48_test_240_train_disjoint_and_fixed():
    test, train = split_grids("test"), split_grids("train")
    assert len(test) == 48 and len(train) == 240
    assert set(test).isdisjoint(train) and set(test) | set(train) == set(all_grids())
    # golden values: the split must not change between machines or versions
    assert test[:2] == ("2413314212344321", "2314142332414132")


def test_solver_counts_and_solves():
    assert count_solutions("." * 16, limit=10**6) == 288
    assert count_solutions("." * 16) == 2  # stops at the limit
    assert count_solutions("11" + "." * 14) == 0  # clashing givens
    assert count_solutions(PUZZLE) == 1
    assert solve(PUZZLE) == SOLUTION
    assert solve("0234341221434321".replace("0", ".")) == SOLUTION
    assert solve("11" + "." * 14) is None
    with pytest.raises(ValueError):
        count_solutions("12345")


def test_puzzles_are_unique_with_blanks_in_range_and_from_their_split():
    task = sudoku_task(min_blanks=6, max_blanks=10)
    for split in ("train", "test"):
        examples = task.examples(split, 200, seed=3)
        assert len({e.question["puzzle"] for e in examples}) == 200
        assert len({e.id for e in examples}) == 200
        for ex in examples:
            puzzle, solution = ex.question["puzzle"], ex.answer["solution"]
            assert 6 <= puzzle.count(".") <= 10
            assert all(p in (".", s) for p, s in zip(puzzle, solution))
            assert count_solutions(puzzle) == 1 and solve(puzzle) == solution
            assert solution in split_grids(split)
            assert ex.id.startswith(f"sudoku-{split}-")
    counts = {e.question["puzzle"].count(".") for e in task.examples("train", 200, seed=3)}
    assert counts == set(range(6, 11))  # the whole range is used


def test_examples_are_a_pure_function_of_their_arguments():
    task = get_task("sudoku")
    assert task.examples("train", 50, seed=1) == get_task("sudoku").examples("train", 50, seed=1)
    assert task.examples("train", 50, seed=1) != task.examples("train", 50, seed=2)
    whole = task.examples("test", None, seed=0)
    assert sorted(e.answer["solution"] for e in whole) == sorted(split_grids("test"))


def test_extreme_blank_counts_and_bad_options():
    hard = sudoku_task(min_blanks=12, max_blanks=12).examples("train", 20, seed=0)
    assert all(e.question["puzzle"].count(".") == 12 and count_solutions(e.question["puzzle"]) == 1
               for e in hard)
    for lo, hi in ((0, 5), (7, 6), (6, 13)):
        with pytest.raises(ValueError):
            sudoku_task(min_blanks=lo, max_blanks=hi)


def test_compact_prompt_and_target_formats():
    task = get_task("sudoku")
    assert task.prompt(EX, "compact") == "1.34\n.412\n.143\n432.\n"
    assert task.target(EX, "compact") == "1234\n3412\n2143\n4321"
    assert task.target(EX, "chat") == "<answer>\n1234341221434321\n</answer>"
    chat = task.prompt(EX, "chat")
    assert "1034041201434320" in chat and "<answer>" in chat and "<reasoning>" in chat


def test_reward_counts_only_the_blank_cells():
    task = get_task("sudoku")
    assert task.reward("1234\n3412\n2143\n4321", EX) == 1.0
    assert task.reward("1234341221434321", EX) == 1.0
    # cell 4 (a blank) wrong → 3 of 4; cell 0 (a given) wrong → still 4 of 4
    assert task.reward("1234141221434321", EX) == 0.75
    assert task.reward("4234341221434321", EX) == 1.0
    # separators are ignored; only the first 16 digits count
    assert task.reward("1 2 | 3 4\n3 4 | 1 2\n2 1 | 4 3\n4 3 | 2 1 9999", EX) == 1.0
    # missing cells are wrong: 9 digits cover blanks 1, 4, 8 but not 15
    assert task.reward("123434122", EX) == 0.75
    # echoing the puzzle with '0' blanks gets nothing
    assert task.reward("1034041201434320", EX) == 0.0
    assert task.reward("", EX) == 0.0
    assert task.reward("no digits at all", EX) == 0.0


def test_reward_reads_the_last_answer_tag():
    task = get_task("sudoku")
    text = ("<reasoning>row 1 has 1 3 4 so cell 2 is 2 ...</reasoning>\n"
            "<answer>1111111111111111</answer>\n<answer>\n1234341221434321\n</answer>")
    assert task.reward(text, EX) == 1.0
    # digits in the reasoning do not leak into a tagged answer
    assert task.reward("1234341221434321 <answer>1111</answer>", EX) == 0.0


def test_reward_on_a_huge_completion_is_fast_and_zero():
    assert get_task("sudoku").reward("x" * 10**7, EX) == 0.0
    assert get_task("sudoku").reward("1234341221434321" + "x" * 10**7, EX) == 1.0


def _build_script():
    """scripts/build_tiny_sudoku.py as a module (scripts/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_sudoku.py"
    spec = importlib.util.spec_from_file_location("build_tiny_sudoku", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_starting_checkpoints_sloppy_teacher_fills_rows_only():
    row_fill = _build_script().row_fill
    # one blank per row: the row alone decides it, so the row fill is the solution
    assert row_fill(PUZZLE) == SOLUTION
    # row 0 "..34" -> missing {1, 2} in ascending order: right; row 1 "3..2" -> "3142", wrong
    # (the solution's row is 3412): columns and boxes are ignored
    puzzle = "..34" + "3..2" + "2143" + "4321"
    assert row_fill(puzzle) == "1234" + "3142" + "2143" + "4321"
    ex = Example(id="two", question={"puzzle": puzzle}, answer={"solution": SOLUTION})
    assert get_task("sudoku").score("\n".join(rows(row_fill(puzzle))), ex) == 0.5


def test_the_shipped_start_is_an_sft_plateau_below_the_teacher():
    """The claim the default job rests on: more SFT on the teacher no longer helps."""
    import json
    from pathlib import Path

    record = json.loads((Path(__file__).resolve().parents[1] / "dlrl/assets/tiny-sudoku/sft_curve.json").read_text())
    saved = record["saved_eval_reward"]
    after = [c["eval_reward"] for c in record["curve"] if c["step"] > record["saved_at_step"]]
    assert saved <= 0.6 < record["teacher"]["held_out_reward"]
    assert len(after) >= 4 and max(after) <= saved + 0.05 and sum(after) / len(after) <= saved + 0.02
