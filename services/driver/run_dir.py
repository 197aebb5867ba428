"""The run folder `<out_dir>/<name>/`: who may write it, when it may be started over, and what a
resumed run may change.

Three rules, so that a run is never lost by accident (issue 21):

1. **One process per run folder.** `RunLock` holds `<run>/run.lock`, a file with the holder's pid,
   host and start time, under an exclusive `flock` for as long as the driver runs. A second
   `dlrl train` with the same folder is refused with the holder's pid and host. The kernel drops
   the flock when its process ends however it ends (SIGKILL and OOM kills included), so a lock
   file left behind on this host is known to be stale: the next run takes it over and says so.
   A lock file written on another host (a shared runs folder) is never taken over, since its
   process cannot be checked from here: the message says which file to delete once that process
   is known to be gone. The lock is released (the file removed) when the run ends: finished,
   failed, stopped by SIGTERM or Ctrl-C.
2. **No silent restart over an old run.** `dlrl train` refuses a folder that holds a run
   (metrics.jsonl, a checkpoint or summary.json) unless it is told `--resume` (continue it) or
   `--overwrite` (delete the old run's outputs and start again).
3. **A resumed run is the same run.** `--resume` compares the spec with the run's own (spec.json,
   plus the changes earlier resumes recorded) field by field. `RESUMABLE` lists what may change
   -- how long the run goes, how often it is evaluated or saved, and where and with how many
   processes and threads it runs; every other change (model, task, algorithm, rollout, seeds,
   LoRA shape, learning-rate schedule, ...) is refused, naming each field with its old and new
   value. Allowed changes are printed and appended to `<run>/spec_history.jsonl`; spec.json keeps
   the spec the run started with.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from dlrl.config import JobSpec
from learner.train import read_state
from services.driver.periodic_eval import clear_outputs
from services.driver.tracker import TENSORBOARD_DIR

LOCK = "run.lock"
SPEC = "spec.json"
SPEC_HISTORY = "spec_history.jsonl"
RUN_MARKERS = ("metrics.jsonl", "checkpoint", "summary.json")
"""What makes a folder hold a run (a folder with only spec.json never got to its first step)."""
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "reward.png", "samples.jsonl", SPEC, SPEC_HISTORY)
"""The files a run writes in its folder (besides its checkpoints and evaluations): what
--overwrite deletes. Only these: a folder may hold files of the user's own."""

RESUMABLE: dict[str, str] = {
    "train.steps": "how long the run goes",
    "eval.every": "how often it is evaluated",
    "runtime.checkpoint_every": "how often it is saved",
    "runtime.keep_checkpoints": "which checkpoints are kept",
    "runtime.out_dir": "where the run folder lies (a moved folder)",
    "runtime.ray_address": "which Ray cluster runs it",
    "runtime.num_cpus": "the CPUs of an in-process Ray",
    "runtime.threads": "torch threads per actor",
    "runtime.learner_gpus": "GPUs each learner rank asks for",
    "runtime.worker_gpus": "GPUs each rollout worker asks for",
    "runtime.placement_timeout_s": "how long placement may wait",
    "runtime.publish_timeout_s": "how long a weights hand-over may take",
    "runtime.max_restarts": "how many crashes are ridden out",
    "queue.backend": "the queue's transport (a resumed run regenerates every batch after its checkpoint)",
    "queue.redis_url": "the queue's transport",
    "queue.capacity": "the queue's back-pressure",
    "queue.maxlen": "the queue's trimming",
    "weights.sync": "how weights reach the workers",
    "weights.bucket_mb": "how weights reach the workers",
}
"""The one list of spec fields a resumed run may change, each with why it does not change the
experiment. Everything else is refused: what the run trains (model, LoRA shape, task and its
data), how (algorithm, objective terms, learning-rate schedule, decoding, group size, prompts per
step, rollout workers, which seed every batch), what an evaluation measures (eval.steps,
eval.protocol, task.eval_size: the curve and best.json compare evaluations), where it computes
(runtime.device: "auto" compute is bfloat16 on CUDA) and the run's name (it names the run's queue
and group ids). Thread and process counts may change floating-point rounding, not the experiment.
`train.steps` moves the end of a decaying learning rate (train.lr_decay "linear" or "cosine"),
so there it is refused too."""


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: locked, holding a run, or resumed with a change
    that breaks the run. The message says what to do."""


# ---------------------------------------------------------------------------------------- lock


def _host() -> str:
    return socket.gethostname()


class RunLock:
    """`<run>/run.lock`, held (flock) by this process until `release`. See the module docstring."""

    def __init__(self, path: Path, fd: int, note: str | None) -> None:
        self.path, self.fd = path, fd
        self.note = note
        """What was taken over (a stale lock), or None."""

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        path = run_dir / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderError(f"{run_dir} is in use by another run: {_describe(holder)} holds "
                                     f"{path}. Wait for it to end (or stop it), or give this run another "
                                     f"name (--set name=...) or runtime.out_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (removed) the file between our open and our flock
                os.close(fd)
                continue
            holder = _read_holder(fd)
            note = None
            if holder is not None:
                if holder.get("host") != _host():
                    os.close(fd)
                    raise RunFolderError(
                        f"{run_dir} may be in use by another run: {_describe(holder)} wrote {path}, and a "
                        f"process on another host cannot be checked from {_host()}. If it no longer runs, "
                        f"delete {path}; else give this run another name or runtime.out_dir")
                note = (f"dlrl: took over the stale lock {path} of {_describe(holder)}: that process is gone "
                        f"(killed without cleaning up)")
            record = {"pid": os.getpid(), "host": _host(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            return cls(path, fd, note)

    def release(self) -> None:
        """Remove the lock file, then drop the flock (in that order: see `acquire`'s inode check)."""
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:  # a write that never finished: nobody to name
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that left no pid"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"


# ------------------------------------------------------------------------- start or resume


def holds_run(run_dir: Path) -> list[str]:
    """What of a run the folder holds (empty: nothing to lose)."""
    return [name for name in RUN_MARKERS if (run_dir / name).exists()]


def last_checkpoint(run_dir: Path) -> int | None:
    """The learner step of the run's last complete checkpoint (a save killed between its two
    renames left it as checkpoint.old: learner.train.recover_checkpoint), or None."""
    for name in ("checkpoint", "checkpoint.old"):
        state = read_state(run_dir / name)
        if state is not None:
            return int(state["step"])
    return None


def refuse_old_run(run_dir: Path) -> None:
    """A fresh start (neither --resume nor --overwrite) in a folder that holds a run is refused."""
    found = holds_run(run_dir)
    if not found:
        return
    step = last_checkpoint(run_dir)
    saved = f"a checkpoint of step {step}" if step is not None else "no checkpoint"
    raise RunFolderError(f"{run_dir} already holds a run ({', '.join(found)}; {saved}). Continue it with "
                         f"--resume, or delete it and start again with --overwrite, or give this run another "
                         f"name (--set name=...) or runtime.out_dir")


def clear_run(run_dir: Path) -> list[str]:
    """--overwrite: delete what an earlier run wrote here; returns what was deleted."""
    gone = [name for name in (*RUN_OUTPUTS, "checkpoint", "checkpoints", "eval", "best.json", TENSORBOARD_DIR)
            if (run_dir / name).exists()]
    for name in RUN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)
    clear_outputs(run_dir)
    return gone


def write_spec(run_dir: Path, spec: JobSpec) -> None:
    """spec.json of a fresh run (atomically: a reader never sees half a spec)."""
    tmp = run_dir / f"{SPEC}.tmp-{os.getpid()}"
    tmp.write_text(spec.model_dump_json(indent=2) + "\n")
    tmp.replace(run_dir / SPEC)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 6}} -> {"train.steps": 6}; lists stay whole."""
    if isinstance(data, dict) and (data or not prefix):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


ABSENT = "(absent)"


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (old, new) for every field that differs (JSON values)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(a.keys() | b.keys())
            if a.get(k, ABSENT) != b.get(k, ABSENT)}


def _why_not(path: str, spec: JobSpec) -> str | None:
    """Why changing `path` breaks the run, or None when it may change (RESUMABLE)."""
    if path == "train.steps" and spec.train.lr_decay != "constant":
        return f"the {spec.train.lr_decay} learning-rate decay ends at the last step"
    return None if path in RESUMABLE else "not a field a resumed run may change"


def run_spec(run_dir: Path) -> dict[str, Any] | None:
    """The spec the run has: spec.json with every change an earlier resume recorded (JSON values)."""
    try:
        spec = json.loads((run_dir / SPEC).read_text())
    except (OSError, ValueError):
        return None
    flat = _flat(spec)
    history = run_dir / SPEC_HISTORY
    if history.exists():
        for line in history.read_text().splitlines():
            if line.strip():
                for path, (_, value) in json.loads(line).get("changes", {}).items():
                    flat[path] = value
    out: dict[str, Any] = {}
    for path, value in flat.items():
        if value == ABSENT:
            continue
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def check_resume(run_dir: Path, spec: JobSpec, step: int) -> list[str]:
    """The lines saying what this resume changes; RunFolderError naming every change that breaks
    the run. The allowed changes are recorded in spec_history.jsonl (spec.json is kept)."""
    old = run_spec(run_dir)
    if old is None:
        return [f"dlrl: {run_dir / SPEC} is missing or unreadable: the resumed spec cannot be compared"]
    changes = spec_changes(old, json.loads(spec.model_dump_json()))
    refused = [(p, o, n, why) for p, (o, n) in changes.items() if (why := _why_not(p, spec)) is not None]
    if refused:
        lines = "\n".join(f"  {p}: {json.dumps(o)} -> {json.dumps(n)} ({why})" for p, o, n, why in refused)
        raise RunFolderError(f"cannot resume {run_dir} with this spec: it changes what the run is\n{lines}\n"
                             f"Resume with the run's own values (its spec.json), or start a new run under "
                             f"another name. A resumed run may change only: {', '.join(RESUMABLE)}")
    with (run_dir / SPEC_HISTORY).open("a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), "resumed_at_step": step,
                            "changes": {p: [o, n] for p, (o, n) in changes.items()}}) + "\n")
    return [f"dlrl: resumed with a changed spec: {p} {json.dumps(o)} -> {json.dumps(n)}"
            for p, (o, n) in changes.items()]
