"""Task import paths ("package.module:factory") are opt-in: importing a named module runs its code,
so `get_task` refuses them unless the caller (`allow_import_paths=True`) or the environment
($DLRL_TASK_IMPORT_PATHS: "*" or a list) allows them. `dlrl train` with a spec file allows all;
a job started by the job API gets only the operator's list. A file a factory would write proves
whether it ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlrl.tasks import IMPORT_PATHS_ENV, Example, ImportPathRefused, Task, get_task, import_path_allowed

EX = Example(id="e", question={}, answer={})


def _junk_factory(**options):
    """A factory returning something that is not a task."""
    return object()


def _custom_factory(scale: float = 1.0) -> Task:
    """A user task reachable by import path, with an option."""
    return Task(name="custom", make_examples=lambda split, n, seed: [EX] * (n or 1),
                make_prompt=lambda e, style: "", score=lambda c, e: scale * len(c))


def _marking_factory(marker: str) -> Task:
    """Writes `marker` when it runs: the proof that an import path was (not) followed."""
    Path(marker).write_text("ran")
    return _custom_factory()


def test_import_paths_are_refused_by_default_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(IMPORT_PATHS_ENV, raising=False)
    marker = tmp_path / "ran"
    for name, options in [("os:system", {"command": f"touch {marker}"}),
                          ("subprocess:run", {"args": ["touch", str(marker)]}),
                          ("runpy:run_path", {"path_name": str(marker)}),
                          ("tests.test_tasks_import_paths:_marking_factory", {"marker": str(marker)})]:
        with pytest.raises(ImportPathRefused, match="not allowed"):
            get_task(name, **options)
    assert not marker.exists()
    with pytest.raises(ImportPathRefused):  # an explicit False wins over the environment
        monkeypatch.setenv(IMPORT_PATHS_ENV, "*")
        get_task("tests.test_tasks_import_paths:_custom_factory", allow_import_paths=False)
    assert get_task("sudoku").name == "sudoku"  # registered names need no permission


def test_the_environment_allows_all_or_a_list(tmp_path, monkeypatch):
    ok = "tests.test_tasks_import_paths:_custom_factory"
    monkeypatch.setenv(IMPORT_PATHS_ENV, f" {ok} , dlrl.tasks.sudoku:sudoku_task")
    assert import_path_allowed(ok) and not import_path_allowed("os:system")
    assert get_task(ok, scale=0.25).reward("ab", EX) == 0.5
    marker = tmp_path / "ran"
    with pytest.raises(ImportPathRefused):
        get_task("tests.test_tasks_import_paths:_marking_factory", marker=str(marker))
    assert not marker.exists()
    monkeypatch.setenv(IMPORT_PATHS_ENV, "*")
    get_task("tests.test_tasks_import_paths:_marking_factory", marker=str(marker))
    assert marker.read_text() == "ran"


def test_allowed_import_path_factory_gets_the_options():
    task = get_task("tests.test_tasks_import_paths:_custom_factory", allow_import_paths=True, scale=0.25)
    assert task.name == "custom" and task.reward("ab", EX) == 0.5
    same = get_task("dlrl.tasks.sudoku:sudoku_task", allow_import_paths=True, min_blanks=7, max_blanks=7)
    assert all(e.question["puzzle"].count(".") == 7 for e in same.examples("test", 5))


def test_bad_allowed_import_paths_are_reported():
    with pytest.raises(ValueError, match="cannot load"):
        get_task("no_such_module_xyz:factory", allow_import_paths=True)
    with pytest.raises(ValueError, match="cannot load"):
        get_task("dlrl.tasks.sudoku:no_such_factory", allow_import_paths=True)
    with pytest.raises(TypeError):
        get_task("tests.test_tasks_import_paths:_junk_factory", allow_import_paths=True)
