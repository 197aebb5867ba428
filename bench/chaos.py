"""Faults as they really happen, on a real cluster: SIGKILLs of a rollout worker's process, the
learner's process (while it steps, or inside a checkpoint write) and redis-server (restarted from
its AOF), sent by pid while steps run.

The run is the shipped distributed tiny job (deploy/jobs/tiny-sudoku-distributed.toml: 2 workers,
Redis Streams, max_staleness = 1, checkpoint_every = 10), 40 steps, with the faults of issue 13 at
steps 8 / 18 / 28, by default a second round at 12 / 24 / 34, and a learner killed inside the
checkpoint write after step 15 (the save of step 20: `save`). The run must finish every step,
train each of the 40 x 16 = 640 expected group ids exactly once (the final checkpoint's list),
log each step once, count in metrics.jsonl every group it dropped, and leave no Redis key of the
run and no temporary checkpoint folder behind. Writes bench/results/chaos.json
with the recovery time of every fault (to the first step logged after it, and until the run was
back past the step it had reached) and the counts.

    python bench/chaos.py                    # about 5 min on 2 cores
    python bench/chaos.py --max-staleness 0 --out bench/results/chaos-sync.json   # the same, synchronous
    python bench/chaos.py --steps 12 --faults 3:worker:0,6:redis,9:learner,10:save

tests/test_chaos.py runs `run_with_faults` on a smaller job in CI.

Redis runs with `appendfsync always` here: a SIGKILLed redis-server with `everysec` may lose the
last second of acknowledged puts, and a lost group cannot be trained; the learner then fails its
step after its queue wait with the missing batch named (learner/train.py), rather than finish.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one-machine cluster: loopback only
import dlrl  # noqa: E402,F401  (Ray auth mode before ray is imported)
from dlrl.config import JobSpec  # noqa: E402
from tests.local_cluster import RayHead, RedisProcess  # noqa: E402
from services.driver.progress import read_metrics  # noqa: E402

SPEC = ROOT / "deploy/jobs/tiny-sudoku-distributed.toml"
RESULTS = ROOT / "bench/results"
DEFAULT_FAULTS = "8:worker:0,12:worker:1,15:save,18:redis,24:redis,28:learner,34:learner"
DROPS = ("duplicates_dropped", "stale_dropped", "future_dropped")
SAVE_WAIT_S = 300.0
"""Longest a `save` fault waits for the next checkpoint write to reach its hold."""


@dataclass
class Fault:
    step: int  # injected once the run has logged this train step
    target: str  # "worker:<i>", "learner", "redis", or "save" (the learner, inside the next checkpoint write)

    @classmethod
    def parse(cls, text: str) -> "Fault":
        step, target = text.split(":", 1)
        if target not in ("learner", "redis", "save") and not target.startswith("worker:"):
            raise ValueError(f"fault target {target!r} must be worker:<i>, learner, redis or save")
        return cls(int(step), target)


def actor_pid(head: RayHead, name: str) -> int:
    """The pid of the live process of Ray actor `name` (the head's state API)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 60
    while True:
        rows = list_actors(address=head.dashboard_url, filters=[("name", "=", name), ("state", "=", "ALIVE")],
                           raise_on_missing_output=False)
        pids = [row.pid for row in rows if row.pid]
        if pids:
            return pids[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no live process for actor {name}")
        time.sleep(0.5)


def kill_inside_save(run_dir: Path, run_id: str, head: RayHead) -> int:
    """SIGKILL the lead learner inside its next checkpoint write: the learner holds that save with
    its temporary folder written, not renamed, while <checkpoint>.hold-save exists (learner.train),
    so the kill lands there every time. The hold is lifted once the learner is dead."""
    from learner.train import HOLD_SAVE, STATE_JSON

    hold = run_dir / f"checkpoint{HOLD_SAVE}"
    hold.touch()
    try:
        deadline = time.monotonic() + SAVE_WAIT_S
        while not list(run_dir.glob(f"checkpoint.tmp-*/{STATE_JSON}")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no checkpoint write reached its hold within {SAVE_WAIT_S:.0f}s")
            time.sleep(0.05)
        pid = actor_pid(head, f"dlrl:{run_id}:learner")
        os.kill(pid, signal.SIGKILL)
        return pid
    finally:
        hold.unlink(missing_ok=True)


def kill(fault: Fault, run_id: str, head: RayHead, redis: RedisProcess, redis_down_s: float,
         run_dir: Path) -> int:
    """SIGKILL the fault's process by pid (redis-server: then start it again on its AOF)."""
    if fault.target == "save":
        return kill_inside_save(run_dir, run_id, head)
    if fault.target == "redis":
        pid = redis.proc.pid
        os.kill(pid, signal.SIGKILL)
        redis.proc.wait()
        time.sleep(redis_down_s)
        redis.start()
        return pid
    pid = actor_pid(head, f"dlrl:{run_id}:{fault.target}")
    os.kill(pid, signal.SIGKILL)
    return pid


def run_with_faults(spec: JobSpec, head: RayHead, redis: RedisProcess, faults: list[Fault],
                    redis_down_s: float = 1.0, timeout_s: float = 1800.0) -> dict:
    """Run `spec` (Redis queue, URL from $DLRL_REDIS_URL) in a thread of this process (connected to
    `head`), inject `faults` in step order, and return the checks' counts and recovery times."""
    from learner.train import read_state
    from services.driver.driver import run, split

    run_dir = Path(spec.runtime.out_dir) / spec.name
    metrics = run_dir / "metrics.jsonl"
    out: dict = {}

    def target() -> None:
        try:
            out["summary"] = run(spec)
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t0 = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    injected: list[dict] = []
    todo = sorted(faults, key=lambda f: f.step)
    while thread.is_alive():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"the run did not finish within {timeout_s:.0f}s")
        records = [r for r in read_metrics(metrics) if r.get("kind") == "train"]
        now = time.monotonic()
        # Recovery: the first new train record after the kill, and the run back past `reached`.
        for f in injected:
            if "first_step_s" not in f and any(json.dumps(r, sort_keys=True) not in f["seen"] for r in records):
                f["first_step_s"] = round(now - f["t_kill"], 2)
            if "caught_up_s" not in f and any(r["step"] > f["reached"] for r in records):
                f["caught_up_s"] = round(now - f["t_kill"], 2)
        reached = max((r["step"] for r in records), default=-1)
        if todo and reached > todo[0].step:  # records count the steps done: step f.step (0-based) is done
            fault = todo.pop(0)
            seen = {json.dumps(r, sort_keys=True) for r in records}
            t_kill = time.monotonic()
            pid = kill(fault, spec.name, head, redis, redis_down_s, run_dir)
            if fault.target == "save":  # it waited for the save: count from the kill, from where the run was then
                records = [r for r in read_metrics(metrics) if r.get("kind") == "train"]
                seen, t_kill = {json.dumps(r, sort_keys=True) for r in records}, time.monotonic()
                reached = max((r["step"] for r in records), default=-1)
            injected.append({"step": fault.step, "target": fault.target, "pid": pid, "reached": reached,
                             "t_kill": t_kill, "seen": seen})
        time.sleep(0.1)
    if todo:
        raise RuntimeError(f"the run ended before the faults {todo}: {out.get('error')}")
    thread.join(max(0.0, timeout_s - (time.monotonic() - t0)))
    if thread.is_alive():
        raise TimeoutError(f"the run did not finish within {timeout_s:.0f}s")
    if "error" in out:
        raise out["error"]

    shares = split(spec.rollout.prompts_per_step, spec.rollout.num_workers)
    expected = {f"{spec.name}/b{b}-w{w}-{k}" for b in range(spec.train.steps) for w, n in enumerate(shares)
                for k in range(n)}
    final = read_state(run_dir / "checkpoint")
    trained = final["trained_groups"]
    train = [r for r in read_metrics(metrics) if r.get("kind") == "train"]
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    left = sorted(k.decode() for k in client.scan_iter(match=f"dlrl:{{{spec.name}}}:*"))
    client.close()
    return {
        "steps": spec.train.steps,
        "steps_logged": [r["step"] for r in train],
        "expected_groups": len(expected),
        "trained_groups": len(trained),
        "distinct_trained_groups": len(set(trained)),
        "missing_groups": sorted(expected - set(trained))[:20],
        "unexpected_groups": sorted(set(trained) - expected)[:20],
        "duplicates_dropped": sum(r.get("duplicates_dropped", 0) for r in train),
        "future_dropped": sum(r.get("future_dropped", 0) for r in train),
        "stale_dropped": sum(r.get("stale_dropped", 0) for r in train),
        # The learner's own running totals (its last checkpoint): metrics.jsonl must show every drop.
        "drops_in_checkpoint": {k: final["counts"][k] for k in DROPS},
        "drops_in_metrics": {k: sum(r.get(k, 0) for r in train) for k in DROPS},
        "temporary_folders_left": sorted(p.name for p in run_dir.glob("**/*.tmp-*")),
        "max_staleness_seen": max(r["max_staleness"] for r in train),
        "worker_restarts": sum(r.get("worker_restarts", 0) for r in train),
        "queue_keys_left": left,
        "faults": [{k: v for k, v in f.items() if k not in ("t_kill", "seen")} for f in injected],
        "wall_seconds": round(time.monotonic() - t0, 1),
    }


def summary_line(label: str, report: dict) -> str:
    """One line of a chaos run's counts and recovery times, for a CI log."""
    faults = ", ".join(f"{f['target']}@{f['step']} back in {f.get('first_step_s', '?')}s "
                       f"(caught up {f.get('caught_up_s', '?')}s)" for f in report["faults"])
    return (f"{label}: {len(report['steps_logged'])}/{report['steps']} steps logged, "
            f"{report['trained_groups']} groups trained, {report['distinct_trained_groups']} distinct of "
            f"{report['expected_groups']} expected, {report['duplicates_dropped']} duplicates dropped, "
            f"{report['stale_dropped']} stale dropped, {report['worker_restarts']} worker restarts, "
            f"{len(report['queue_keys_left'])} queue keys left, "
            f"{len(report['temporary_folders_left'])} temporary folders left, {report['wall_seconds']}s; {faults}")


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--faults", default=DEFAULT_FAULTS, help="step:target,... (targets: worker:<i>, learner, redis)")
    ap.add_argument("--max-staleness", type=int, default=None, help="override the spec's (1); 0 = synchronous")
    ap.add_argument("--out", default=str(RESULTS / "chaos.json"))
    args = ap.parse_args()
    faults = [Fault.parse(f) for f in args.faults.split(",")]
    redis, head = RedisProcess(appendfsync="always").start(), RayHead(num_cpus=2).start()
    try:
        ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
        os.environ["DLRL_REDIS_URL"] = redis.url
        with tempfile.TemporaryDirectory(prefix="dlrl-chaos-") as tmp:
            base = JobSpec.from_toml(SPEC).model_dump()
            base["train"]["steps"] = args.steps
            base["runtime"].update(ray_address=head.address, out_dir=tmp)
            if args.max_staleness is not None:
                base["runtime"]["max_staleness"] = args.max_staleness
            report = run_with_faults(JobSpec.model_validate(base), head, redis, faults)
    finally:
        ray.shutdown()
        head.cleanup()
        redis.cleanup()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "chaos",
        "spec": str(SPEC.relative_to(ROOT)),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}, CPU only",
        "date": dt.date.today().isoformat(),
        "commit": commit,
        "redis_appendfsync": "always",
        "max_staleness": base["runtime"]["max_staleness"],
        **report,
        "every_step_logged_once": report["steps_logged"] == list(range(1, args.steps + 1)),
        "every_group_trained_once": (report["trained_groups"] == report["distinct_trained_groups"]
                                     == report["expected_groups"] and not report["missing_groups"]),
        "every_drop_in_metrics": report["drops_in_metrics"] == report["drops_in_checkpoint"],
    }
    result["steps_logged"] = len(report["steps_logged"])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(summary_line("chaos", report))


if __name__ == "__main__":
    main()
