"""The shipped distributed tiny job, whole: 2 rollout workers, Redis Streams, max_staleness = 1.

Starts a real redis-server (AOF, password) and a real Ray head (`ray start --head`) on free
loopback ports, attaches `dlrl train deploy/jobs/tiny-sudoku-distributed.toml` to them (only the
cluster address, the Redis URL and runtime.learner_ranks differ from the spec), once with one
learner and once with a 2-rank learner group (FSDP2 over gloo), and compares their held-out curves
with each other and with the single-process BGPO run in bench/results/tiny_sudoku.json. Writes
bench/results/tiny_sudoku_distributed.json and each run's reward curve PNG beside it.

    python bench/tiny_sudoku_distributed.py            # 2 x 150 steps (about 20 min on 2 cores)
    python bench/tiny_sudoku_distributed.py --ranks 2 --steps 20
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
from tests.local_cluster import RayHead, RedisProcess  # noqa: E402
from services.driver.progress import read_metrics  # noqa: E402

SPEC = ROOT / "deploy/jobs/tiny-sudoku-distributed.toml"
RESULTS = ROOT / "bench/results"


def one_run(head: RayHead, redis: RedisProcess, ranks: int, steps: int | None) -> dict:
    """The job with `ranks` learner ranks; its figures."""
    with tempfile.TemporaryDirectory(prefix="dlrl-dist-") as tmp:
        sets = ["--set", f"runtime.ray_address={head.address}", "--set", f"runtime.out_dir={tmp}",
                "--set", f"runtime.learner_ranks={ranks}"]
        if steps:
            sets += ["--set", f"train.steps={steps}"]
        subprocess.run([sys.executable, "-m", "services.cli", "train", str(SPEC), *sets], cwd=ROOT, check=True,
                       env={**os.environ, "DLRL_REDIS_URL": redis.url})
        run = Path(tmp) / "tiny-sudoku-distributed"
        summary = json.loads((run / "summary.json").read_text())
        records = read_metrics(run / "metrics.jsonl")
        suffix = "" if ranks == 1 else f"_{ranks}ranks"
        shutil.copy(run / "reward.png", RESULTS / f"tiny_sudoku_distributed{suffix}_reward.png")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    return {
        "learner_ranks": ranks,
        "steps": len(train),
        "first_eval_reward": summary["first_eval_reward"],
        "last3_eval_reward": summary["last3_eval_reward"],
        "gain": summary["last3_eval_reward"] - summary["first_eval_reward"],
        "eval_curve": [[r["step"], round(r["eval_reward"], 4)] for r in evals],
        "wall_seconds": summary["seconds"],
        "mean_step_seconds": sum(r["step_seconds"] for r in train) / len(train),
        "mean_learner_seconds": sum(r["learner_seconds"] for r in train) / len(train),
        "max_staleness_seen": max(r["max_staleness"] for r in train),
        "stale_dropped": sum(r.get("stale_dropped", 0) for r in train),
        "duplicates_dropped": sum(r.get("duplicates_dropped", 0) for r in train),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ranks", default="1,2", help="learner group sizes to run, one after the other")
    args = ap.parse_args()
    redis, head = RedisProcess().start(), RayHead(num_cpus=2).start()
    try:
        runs = [one_run(head, redis, int(n), args.steps) for n in args.ranks.split(",")]
    finally:
        head.cleanup()
        redis.cleanup()
    single = next(r for r in json.loads((RESULTS / "tiny_sudoku.json").read_text())["runs"]
                  if r["algorithm"] == "bgpo")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {
        "benchmark": "tiny_sudoku_distributed",
        "spec": str(SPEC.relative_to(ROOT)),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}, CPU only",
        "date": dt.date.today().isoformat(),
        "commit": commit,
        "runs": runs,
        "single_process_bgpo": {k: single[k] for k in ("first_eval_reward", "last3_eval_reward", "gain",
                                                       "mean_step_seconds")},
    }
    by = {r["learner_ranks"]: r for r in runs}
    for r in runs:
        r["rises_at_least_as_single_process"] = r["gain"] >= single["gain"]
    if 1 in by and 2 in by:
        # The 2-rank group computes the 1-rank gradient (up to float32 rounding), so the runs start
        # identical and drift apart only as rounding flips a sampled token: same learning, not same bits.
        out["two_ranks_minus_one_rank_gain"] = by[2]["gain"] - by[1]["gain"]
    (RESULTS / "tiny_sudoku_distributed.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({**out, "runs": [{k: v for k, v in r.items() if k != "eval_curve"} for r in runs]}, indent=2))


if __name__ == "__main__":
    main()
