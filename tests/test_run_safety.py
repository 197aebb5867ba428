"""A run a researcher can trust, as `dlrl train` meets it (issue 21): a real `dlrl train` in its own
process session, stopped with Ctrl-C (SIGINT to its whole process group, as a terminal sends it),
ends with the last checkpoint's step and the exact resume command, no traceback and no Ray
"will be retried" line; a second `dlrl train` of the same run folder is refused while it runs;
the printed command resumes it; a rerun without flags is refused and leaves the run intact;
`--resume` refuses a change that breaks the run and takes one that does not; `--overwrite`
starts over.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.driver.progress import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "train.steps=4", "--set", "eval.every=2", "--set", "eval.steps=5", "--set", "task.eval_size=4",
         "--set", "rollout.prompts_per_step=4", "--set", "rollout.group_size=4", "--set", "rollout.steps=5",
         "--set", "train.n_mc=2", "--set", "runtime.num_cpus=2"]
LONG = 200
"""train.steps of a run that must still be running when the test signals it: at its pace (a few
seconds a step) far longer than the second process the Ctrl-C test starts meanwhile, even on a
loaded machine (at 30 steps a loaded CI machine once finished the run first)."""


def dlrl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def train_records(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def _as_in_a_terminal() -> None:
    """SIGINT at its default disposition, as a terminal's foreground job has it. A job started in
    the background by a shell without job control (`cmd &` in a script, as CI may launch pytest)
    inherits SIGINT ignored, and Python then leaves it ignored: the Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None,
            line: str = rf"^step +3/{LONG}") -> Iterator[subprocess.Popen]:
    """`dlrl ARGS` in its own process session (as a terminal's foreground group), its output in
    `log`, yielded once it printed `line` (default: step 3, so the checkpoint of step 2 is
    written); SIGKILLed with its group if it still runs at the end."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_as_in_a_terminal,
                                env={**(env or os.environ), "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 400
        while not re.search(line, log.read_text(), re.M):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_and_the_resume_command_and_the_run_folder_is_guarded(tmp_path):
    train = ["train", "deploy/jobs/tiny-sudoku.toml", *SMALL, "--set", f"runtime.out_dir={tmp_path}",
             "--set", "name=guarded"]
    run = tmp_path / "guarded"
    log = tmp_path / "first.log"
    first = [*train, "--set", f"train.steps={LONG}"]  # still running while the second process starts
    with running(first, log) as proc:
        # A second process with the same run folder is refused, naming the one that holds it.
        second = dlrl(*train, "--overwrite", timeout=240)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"in use by another run: pid {proc.pid}" in second.stderr and str(run / "run.lock") in second.stderr
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        proc.wait(120)
    out = log.read_text()
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "will be retried" not in out, out[-3000:]
    saved = json.loads((run / "checkpoint/trainer_state.json").read_text())["step"]
    assert saved >= 2 and saved % 2 == 0  # checkpoints by default: every eval.every steps
    tail = out.rstrip().splitlines()[-2:]
    assert tail[0] == f"dlrl: interrupted; the last checkpoint is step {saved} of {LONG} ({run / 'checkpoint'}). " \
                      f"Resume with:", tail
    command = shlex.split(tail[1].strip())
    assert command[0] == "dlrl" and command[1:] == [*first, "--resume"], tail
    assert not (run / "run.lock").exists()
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]

    # The command as printed, made shorter (a change a resume may make).
    resumed = dlrl(*command[1:], "--set", f"train.steps={max(saved, 4)}", timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"steps {saved}->{max(saved, 4)}" in resumed.stdout
    assert f"train.steps {LONG} -> {max(saved, 4)}" in resumed.stdout
    if saved > 4:
        pytest.skip(f"the machine was too slow: interrupted at step {saved}")
    assert train_records(run) == [1, 2, 3, 4]  # train records are numbered by the steps done
    metrics, state = (run / "metrics.jsonl").read_bytes(), (run / "checkpoint/trainer_state.json").read_bytes()

    # A rerun without flags is refused and the run is intact.
    again = dlrl(*train, timeout=240)
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"{run} already holds a run" in again.stderr and "checkpoint of step 4" in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "checkpoint/trainer_state.json").read_bytes() == state

    # --resume with a change that breaks the run: refused before anything starts, each change named.
    unsafe = dlrl(*train, "--set", "train.lr=0.001", "--set", "train.n_mc=4", "--resume", timeout=240)
    assert unsafe.returncode == 2, unsafe.stdout[-2000:] + unsafe.stderr[-2000:]
    assert "train.lr: 0.0002 -> 0.001" in unsafe.stderr and "train.n_mc: 2 -> 4" in unsafe.stderr
    assert (run / "metrics.jsonl").read_bytes() == metrics

    # --resume with a longer run: said, recorded, and trained; spec.json keeps the original.
    longer = dlrl(*train, "--set", "train.steps=5", "--resume", timeout=600)
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert "dlrl: resumed with a changed spec: train.steps 4 -> 5" in longer.stdout
    assert train_records(run) == [1, 2, 3, 4, 5]
    assert json.loads((run / "spec.json").read_text())["train"]["steps"] == LONG  # the run's first spec
    history = [json.loads(line) for line in (run / "spec_history.jsonl").read_text().splitlines()]
    assert [(h["resumed_at_step"], h["changes"]) for h in history] == [
        (saved, {"train.steps": [LONG, 4]}), (4, {"train.steps": [4, 5]})]

    # --overwrite: the old run is deleted and a new one starts.
    fresh = dlrl(*train, "--set", "train.steps=1", "--overwrite", timeout=600)
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert "--overwrite: deleted the earlier run's" in fresh.stdout
    assert train_records(run) == [1] and not (run / "spec_history.jsonl").exists()
    assert json.loads((run / "spec.json").read_text())["train"]["steps"] == 1


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does(ray_cluster, tmp_path):
    """`ray job stop` (the API's stop) sends SIGTERM to the entrypoint's process group; `kill` and
    `docker stop` to the driver. The run unwinds as after Ctrl-C -- its calls cancelled, its actors
    ended in the cluster, the run folder released -- and ends with the same last lines, exiting
    143 = 128 + SIGTERM. The run joins a separate Ray head, as a Ray Job does: a Ray started in the
    driver's own process group would get the signal too."""
    from ray.util.state import list_actors

    train = ["train", "deploy/jobs/tiny-sudoku.toml", *SMALL, "--set", f"runtime.out_dir={tmp_path}",
             "--set", "name=termed", "--set", f"train.steps={LONG}"]
    run = tmp_path / "termed"
    log = tmp_path / "run.log"
    with running(train, log, env={**ray_cluster.env(), "RAY_ADDRESS": ray_cluster.address}) as proc:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    out = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out and "will be retried" not in out, out[-3000:]
    saved = json.loads((run / "checkpoint/trainer_state.json").read_text())["step"]
    tail = out.rstrip().splitlines()[-2:]
    assert tail[0] == f"dlrl: stopped by SIGTERM; the last checkpoint is step {saved} of {LONG} " \
                      f"({run / 'checkpoint'}). Resume with:", tail
    assert shlex.split(tail[1].strip()) == ["dlrl", *train, "--resume"], tail
    assert not (run / "run.lock").exists()
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]
    rows = list_actors(address=ray_cluster.dashboard_url, filters=[("state", "=", "ALIVE")],
                       raise_on_missing_output=False)
    assert not [row.name for row in rows if (row.name or "").startswith("dlrl:termed:")]
