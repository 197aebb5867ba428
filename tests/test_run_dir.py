"""The run folder's rules (services/driver/run_dir.py): one process per folder, no silent restart
over an old run, and a resumed run that stays the same run.

The lock is held by a real second process (a Python child holding `RunLock`, then SIGKILLed to
leave a stale lock behind); the refusals of `dlrl train` itself are in tests/test_run_safety.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dlrl.config import JobSpec
from services.driver.run_dir import (LOCK, SPEC_HISTORY, RunFolderError, RunLock, check_resume, clear_run,
                                     refuse_old_run, spec_changes, write_spec)

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pathlib import Path
from services.driver.run_dir import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A second process that holds the lock of tmp_path/run (killed by pid at the end)."""
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_process_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(holder):
    run, proc = holder
    with pytest.raises(RunFolderError) as refused:
        RunLock.acquire(run)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in str(refused.value)
    assert str(run / LOCK) in str(refused.value)
    assert json.loads((run / LOCK).read_text())["pid"] == proc.pid  # the holder's lock is untouched

    proc.send_signal(signal.SIGKILL)  # dies without cleaning up: the lock file stays
    proc.wait()
    assert (run / LOCK).exists()
    lock = RunLock.acquire(run)
    assert lock.note is not None and f"pid {proc.pid}" in lock.note and "stale" in lock.note
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):  # held: even this process is refused
        RunLock.acquire(run)
    lock.release()
    assert not (run / LOCK).exists()
    again = RunLock.acquire(run)  # released: free, and nothing stale to report
    assert again.note is None
    again.release()


def test_a_lock_written_on_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00Z"}))
    with pytest.raises(RunFolderError) as refused:
        RunLock.acquire(tmp_path)
    assert "pid 1 on host elsewhere" in str(refused.value) and f"delete {tmp_path / LOCK}" in str(refused.value)
    assert (tmp_path / LOCK).exists()


def _spec(tmp_path: Path, **sections) -> JobSpec:
    body = {"name": "r", "runtime": {"out_dir": str(tmp_path)}, "train": {"steps": 6}}
    for section, values in sections.items():
        body[section] = {**body.get(section, {}), **values}
    return JobSpec.model_validate(body)


def test_an_old_run_is_refused_and_overwrite_deletes_only_what_runs_write(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    refuse_old_run(run)  # empty: nothing to lose
    (run / "spec.json").write_text("{}")
    refuse_old_run(run)  # a run that never got to a first step
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 0}\n')
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": 3, "version": 3}))
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError) as refused:
        refuse_old_run(run)
    message = str(refused.value)
    assert str(run) in message and "--resume" in message and "--overwrite" in message
    assert "metrics.jsonl" in message and "checkpoint of step 3" in message
    assert sorted(clear_run(run)) == ["checkpoint", "metrics.jsonl", "spec.json"]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_resume_allows_cadence_and_length_changes_and_records_them(tmp_path):
    first = _spec(tmp_path)
    run = tmp_path / "r"
    run.mkdir()
    write_spec(run, first)
    assert check_resume(run, first, 2) == []  # the same spec: nothing to say
    longer = _spec(tmp_path, train={"steps": 10}, eval={"every": 5}, runtime={"threads": 2})
    lines = check_resume(run, longer, 4)
    assert lines == ["dlrl: resumed with a changed spec: eval.every 10 -> 5",
                     "dlrl: resumed with a changed spec: runtime.threads null -> 2",
                     "dlrl: resumed with a changed spec: train.steps 6 -> 10"]
    assert json.loads((run / "spec.json").read_text())["train"]["steps"] == 6  # the original is kept
    history = [json.loads(line) for line in (run / SPEC_HISTORY).read_text().splitlines()]
    assert [h["resumed_at_step"] for h in history] == [2, 4]
    assert history[1]["changes"]["train.steps"] == [6, 10]
    assert check_resume(run, longer, 6) == []  # compared with the run's spec as resumed, not the first


def test_resume_refuses_changes_that_break_the_run_naming_each(tmp_path):
    first = _spec(tmp_path, train={"steps": 6, "lr_decay": "cosine"})
    run = tmp_path / "r"
    run.mkdir()
    write_spec(run, first)
    changed = _spec(tmp_path, train={"steps": 8, "lr_decay": "cosine", "n_mc": 8, "seed": 1},
                    model={"path": "builtin:other", "lora": {"r": 4}}, rollout={"group_size": 4})
    with pytest.raises(RunFolderError) as refused:
        check_resume(run, changed, 2)
    message = str(refused.value)
    for line in ("train.n_mc: 16 -> 8", "train.seed: 0 -> 1", 'model.path: "builtin:tiny-sudoku" -> "builtin:other"',
                 "rollout.group_size: 8 -> 4", "model.lora.r: \"(absent)\" -> 4",
                 "train.steps: 6 -> 8 (the cosine learning-rate decay ends at the last step)"):
        assert line in message, message
    assert not (run / SPEC_HISTORY).exists()  # nothing recorded for a refused resume


def test_spec_changes_are_dotted_and_complete():
    old = {"a": 1, "b": {"c": [1, 2], "d": {"e": None}}, "f": {}}
    new = {"a": 1, "b": {"c": [1, 3], "d": {"e": 2}}, "g": 5, "f": {}}
    assert spec_changes(old, new) == {"b.c": ([1, 2], [1, 3]), "b.d.e": (None, 2), "g": ("(absent)", 5)}
