"""The shipped distributed tiny job, whole: 2 rollout workers, Redis Streams, max_staleness = 1.

Starts a real redis-server (AOF, password) and a real Ray head (`ray start --head`) on free
loopback ports, attaches `dlrl train deploy/jobs/tiny-sudoku-distributed.toml` to them (only the
cluster address and the Redis URL differ from the spec), and compares its held-out curve with the
single-process BGPO run in bench/results/tiny_sudoku.json. Writes
bench/results/tiny_sudoku_distributed.json and the run's reward curve PNG beside it.

    python bench/tiny_sudoku_distributed.py            # 150 steps (about 8 min on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one-machine cluster: loopback only
import dlrl  # noqa: E402,F401  (Ray auth mode before ray is imported)
from dlrl.local_cluster import RayHead, RedisProcess  # noqa: E402
from services.progress import read_metrics  # noqa: E402

SPEC = ROOT / "deploy/jobs/tiny-sudoku-distributed.toml"
RESULTS = ROOT / "bench/results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    redis, head = RedisProcess().start(), RayHead(num_cpus=2).start()
    try:
        with tempfile.TemporaryDirectory(prefix="dlrl-dist-") as tmp:
            sets = ["--set", f"runtime.ray_address={head.address}", "--set", f"runtime.out_dir={tmp}"]
            if args.steps:
                sets += ["--set", f"train.steps={args.steps}"]
            subprocess.run([sys.executable, "-m", "services.cli", "train", str(SPEC), *sets], cwd=ROOT, check=True,
                           env={**os.environ, "DLRL_REDIS_URL": redis.url})
            run = Path(tmp) / "tiny-sudoku-distributed"
            summary = json.loads((run / "summary.json").read_text())
            records = read_metrics(run / "metrics.jsonl")
            shutil.copy(run / "reward.png", RESULTS / "tiny_sudoku_distributed_reward.png")
    finally:
        head.cleanup()
        redis.cleanup()
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    single = next(r for r in json.loads((RESULTS / "tiny_sudoku.json").read_text())["runs"]
                  if r["algorithm"] == "bgpo")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {
        "benchmark": "tiny_sudoku_distributed",
        "spec": str(SPEC.relative_to(ROOT)),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}, CPU only",
        "date": dt.date.today().isoformat(),
        "commit": commit,
        "steps": len(train),
        "first_eval_reward": summary["first_eval_reward"],
        "last3_eval_reward": summary["last3_eval_reward"],
        "gain": summary["last3_eval_reward"] - summary["first_eval_reward"],
        "eval_curve": [[r["step"], round(r["eval_reward"], 4)] for r in evals],
        "wall_seconds": summary["seconds"],
        "mean_step_seconds": sum(r["step_seconds"] for r in train) / len(train),
        "max_staleness_seen": max(r["max_staleness"] for r in train),
        "stale_dropped": sum(r.get("stale_dropped", 0) for r in train),
        "duplicates_dropped": sum(r.get("duplicates_dropped", 0) for r in train),
        "single_process_bgpo": {k: single[k] for k in ("first_eval_reward", "last3_eval_reward", "gain",
                                                       "mean_step_seconds")},
    }
    out["rises_at_least_as_single_process"] = out["gain"] >= single["gain"]
    (RESULTS / "tiny_sudoku_distributed.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "eval_curve"}, indent=2))


if __name__ == "__main__":
    main()
