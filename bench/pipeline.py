"""The distributed pipeline side by side: sync vs max_staleness=1, 1 vs 2 rollout workers, Ray queue vs Redis.

Starts one real redis-server (AOF, password) and one real Ray head (`ray start --head`) on free
loopback ports, then runs the tiny Sudoku job for a fixed number of steps in each configuration,
one after the other, attached to that cluster. Every actor gets one torch thread, so on a 2-core
machine the learner and a rollout worker can overlap, which is what asynchrony buys.
Writes bench/results/pipeline.json: steps/min, training reward over the last 10 steps, held-out
reward after the last step, weight-sync seconds per step, learner/rollout idle fractions,
staleness and drops, plus machine, date and commit. Asynchronous configurations train against
the l_old their rollout workers shipped (rollout/behaviour.py): the JSON has the first update's
|d| and clip fraction on the steps whose batch was stale, the workers' seconds spent on l_old,
and each configuration's steps/min and held-out reward next to the synchronous one with as many
workers.

    python bench/pipeline.py                 # 6 configurations x 40 steps (about 15 min on 2 cores)
    python bench/pipeline.py --steps 10 --configs sync-1w-ray async1-2w-redis
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one-machine cluster: loopback only
import dlrl  # noqa: E402,F401  (Ray auth mode before ray is imported)
from dlrl.config import JobSpec  # noqa: E402
from tests.local_cluster import RayHead, RedisProcess  # noqa: E402
from services.driver.progress import read_metrics  # noqa: E402

CONFIGS = {  # name: (max_staleness, rollout workers, queue backend)
    "sync-1w-ray": (0, 1, "ray"),
    "async1-1w-ray": (1, 1, "ray"),
    "sync-2w-ray": (0, 2, "ray"),
    "async1-2w-ray": (1, 2, "ray"),
    "sync-1w-redis": (0, 1, "redis"),
    "async1-2w-redis": (1, 2, "redis"),
}


def spec_for(name: str, steps: int, out_dir: Path, ray_address: str) -> JobSpec:
    staleness, workers, backend = CONFIGS[name]
    d = JobSpec.from_toml(ROOT / "deploy/jobs/tiny-sudoku.toml").model_dump()
    d["name"] = name
    d["rollout"]["num_workers"] = workers
    d["train"]["steps"] = steps
    d["eval"]["every"] = steps  # evaluate before the first step and after the last
    d["queue"]["backend"] = backend
    d["runtime"].update(max_staleness=staleness, out_dir=str(out_dir), threads=1,
                        ray_address=ray_address, checkpoint_every=0)
    return JobSpec.model_validate(d)


def measure(name: str, steps: int, out_dir: Path, ray_address: str, redis_url: str) -> dict:
    spec = spec_for(name, steps, out_dir, ray_address)
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "services.cli", "train", "--spec-env", "DLRL_SPEC"], cwd=ROOT,
                   check=True, env={**os.environ, "DLRL_REDIS_URL": redis_url, "DLRL_SPEC": spec.model_dump_json()})
    wall = time.perf_counter() - t0
    records = read_metrics(out_dir / name / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    loop_seconds = train[-1]["time"] - train[0]["time"] + train[0]["step_seconds"]
    mean = lambda key: sum(r.get(key, 0.0) for r in train) / len(train)  # noqa: E731
    staleness, workers, backend = CONFIGS[name]
    stale = [r for r in train if r["max_staleness"] >= 1]
    mean_of = lambda rs, key: sum(r[key] for r in rs) / len(rs) if rs else None  # noqa: E731
    return {
        "config": name, "max_staleness": staleness, "rollout_workers": workers, "queue": backend,
        "steps": len(train),
        "steps_per_min": 60.0 * len(train) / loop_seconds,
        "train_reward_last10": sum(r["reward"] for r in train[-10:]) / len(train[-10:]),
        "eval_reward_first": evals[0]["eval_reward"],
        "eval_reward_last": evals[-1]["eval_reward"],
        "weight_sync_seconds_per_step": mean("weight_sync_seconds"),
        "weight_sync_bytes": train[-1].get("weight_sync_bytes", 0),
        "learner_idle_fraction": mean("learner_idle_fraction"),
        "rollout_idle_fraction": mean("rollout_idle_fraction"),
        "max_staleness_seen": max(r["max_staleness"] for r in train),
        "stale_dropped": sum(r.get("stale_dropped", 0) for r in train),
        "duplicates_dropped": sum(r.get("duplicates_dropped", 0) for r in train),
        # d = l_new - l_old at each step's first update: 0 on an on-policy batch; on a stale one,
        # how far the learner has moved from the weights that generated it (what the clip sees).
        "stale_steps": len(stale),
        "d_abs_first_stale_steps": mean_of(stale, "d_abs_first"),
        "clip_frac_first_stale_steps": mean_of(stale, "clip_frac_first"),
        "d_abs_first_all_steps": mean_of(train, "d_abs_first"),
        "behaviour_elbo_missing": sum(r.get("behaviour_elbo_missing", 0) for r in train),
        "behaviour_elbo_seconds_per_step": mean("behaviour_elbo_seconds"),
        "wall_seconds_with_startup": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/pipeline.json")
    args = ap.parse_args()
    redis, head = RedisProcess().start(), RayHead(num_cpus=2).start()
    try:
        with tempfile.TemporaryDirectory(prefix="dlrl-pipeline-") as tmp:
            results = [measure(c, args.steps, Path(tmp), head.address, redis.url) for c in args.configs]
    finally:
        head.cleanup()
        redis.cleanup()
    for r in results:  # against the synchronous configuration with as many rollout workers
        sync = next((b for b in results if b["max_staleness"] == 0 and b["rollout_workers"] == r["rollout_workers"]), None)
        if sync is not None and r["max_staleness"] > 0:
            r["vs_sync"] = {"config": sync["config"], "steps_per_min_ratio": r["steps_per_min"] / sync["steps_per_min"],
                            "eval_reward_last_diff": r["eval_reward_last"] - sync["eval_reward_last"]}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {
        "benchmark": "pipeline",
        "what": "tiny Sudoku job, fixed steps, one config after another on one machine and one Ray cluster",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}, CPU only",
        "date": dt.date.today().isoformat(),
        "commit": commit,
        "steps": args.steps,
        "results": results,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'config':18s} {'steps/min':>9s} {'reward10':>8s} {'eval':>11s} {'sync s':>7s} "
          f"{'L idle':>6s} {'R idle':>6s} {'|d|1 stale':>10s} {'clip1':>6s}")
    for r in results:
        d, clip = r["d_abs_first_stale_steps"], r["clip_frac_first_stale_steps"]
        print(f"{r['config']:18s} {r['steps_per_min']:9.1f} {r['train_reward_last10']:8.3f} "
              f"{r['eval_reward_first']:.3f}->{r['eval_reward_last']:.3f} {r['weight_sync_seconds_per_step']:7.3f} "
              f"{r['learner_idle_fraction']:6.2f} {r['rollout_idle_fraction']:6.2f} "
              f"{'-' if d is None else f'{d:.2e}':>10s} {'-' if clip is None else f'{clip:.3f}':>6s}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
