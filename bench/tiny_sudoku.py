"""The tiny Sudoku job under BGPO, the naive ELBO ratio and diffu-GRPO, at equal steps.

Each algorithm runs the shipped spec (deploy/jobs/tiny-sudoku.toml, or `--spec`, e.g. the block-
diffusion job deploy/jobs/tiny-sudoku-block.toml) with only `train.algorithm`
changed (the naive ratio runs its n_t samples as one chunk, as it must keep them all alive), one
after the other on the same machine. Writes bench/results/tiny_sudoku.json with each run's
held-out curve, first evaluation, mean of the last three, gain, wall time and step time, the
rollout reward of every step, plus the starting checkpoint's recipe and SFT curve; each run's
reward curve is copied beside it as bench/results/tiny_sudoku_<algorithm>_reward.png. Another
`--spec` names the JSON and PNGs after the spec's file (tiny-sudoku-block.toml:
bench/results/tiny_sudoku_block.json, tiny_sudoku_block_<algorithm>_reward.png).

    python bench/tiny_sudoku.py                         # all three (about 20 minutes on 2 cores)
    python bench/tiny_sudoku.py --algorithms bgpo --steps 50
    python bench/tiny_sudoku.py --algorithms bgpo --seeds 1 2 --out bench/results/tiny_sudoku_seeds.json
    python bench/tiny_sudoku.py --algorithms bgpo --tag cached --set rollout.engine=cached \
        --set rollout.threshold=0.9 --out bench/results/tiny_sudoku_cached.json
    python bench/tiny_sudoku.py --spec deploy/jobs/tiny-sudoku-demo.toml --algorithms bgpo   # the README's demo (`make train`)
    python bench/tiny_sudoku.py --spec deploy/jobs/tiny-sudoku-block.toml --algorithms bgpo

`--set KEY=VALUE` passes further spec overrides to every run (e.g. the rollout engine, which
evaluation uses too); `--tag` names those runs `<tag>_<algorithm>` so their PNGs do not overwrite
the shipped-spec ones.

Times per run: `command_seconds` is the whole `dlrl train` command as a user waits for it (Python
and Ray start-up included), `wall_seconds` the run from its first evaluation on (summary.json), and
`rollout_seconds_total` / `learner_seconds_total` / `eval_seconds_total` the phases summed over the
run (from metrics.jsonl; in a synchronous run they take turns, so they add up to most of the wall).
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrl.config import JobSpec  # noqa: E402
from dlrl.models.loading import resolve_model_path  # noqa: E402
from services.driver.progress import plot_rewards, read_metrics  # noqa: E402

SPEC = ROOT / "deploy/jobs/tiny-sudoku.toml"


def prefix(spec: Path) -> str:
    """The result files' name stem of a spec: tiny-sudoku.toml -> tiny_sudoku."""
    return spec.stem.replace("-", "_")


def run_name(algorithm: str, seed: int | None, tag: str | None) -> str:
    name = algorithm if seed is None else f"{algorithm}-seed{seed}"
    return name if tag is None else f"{tag}_{name}"


def run_one(spec: Path, algorithm: str, seed: int | None, steps: int | None, out_dir: Path, overrides: list[str],
            tag: str | None) -> tuple[Path, float]:
    name = run_name(algorithm, seed, tag)
    sets = ["--set", f"train.algorithm={algorithm}", "--set", f"name={name}",
            "--set", f"runtime.out_dir={out_dir}"]
    if seed is not None:  # seeds prompt order, sampling noise and MC masks; not the start or eval set
        sets += ["--set", f"train.seed={seed}"]
    if algorithm == "naive_elbo":
        sets += ["--set", "train.mc_chunk=4"]
    if steps:
        sets += ["--set", f"train.steps={steps}"]
    for kv in overrides:
        sets += ["--set", kv]
    cmd = [sys.executable, "-m", "services.cli", "train", str(spec), *sets]
    print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out_dir / name, time.monotonic() - t0


def summarize(spec: Path, run: Path, algorithm: str, seed: int | None, overrides: list[str], results: Path,
              command_seconds: float | None = None) -> dict:
    """One run's row. A run cut short (no summary.json) is summarized from its metrics so far,
    marked `"partial": true`, its wall time measured from the run directory's creation."""
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    partial = not (run / "summary.json").exists()
    if partial:
        target = json.loads((run / "spec.json").read_text())["train"]["steps"]
        summary = {"steps": len(train), "first_eval_reward": evals[0]["eval_reward"],
                   "last3_eval_reward": sum(r["eval_reward"] for r in evals[-3:]) / len(evals[-3:]),
                   "seconds": train[-1]["time"] - (run / "spec.json").stat().st_mtime}
        plot_rewards(run, title=f"{run.name} (PARTIAL: {len(train)} of {target} steps)")
    else:
        summary = json.loads((run / "summary.json").read_text())
    shutil.copyfile(run / "reward.png", results / f"{prefix(spec)}_{run.name}_reward.png")
    return {
        "algorithm": algorithm,
        "overrides": overrides,
        **({"partial": True, "target_steps": target} if partial else {}),
        "seed": JobSpec.from_toml(spec).train.seed if seed is None else seed,
        "steps": summary["steps"],
        "first_eval_reward": summary["first_eval_reward"],
        "last3_eval_reward": summary["last3_eval_reward"],
        "gain": summary["last3_eval_reward"] - summary["first_eval_reward"],
        "max_eval_reward": max(r["eval_reward"] for r in evals),
        "eval_curve": [[r["step"], round(r["eval_reward"], 4)] for r in evals],
        "rollout_reward_first10": sum(r["reward"] for r in train[:10]) / len(train[:10]),
        "rollout_reward_last10": sum(r["reward"] for r in train[-10:]) / len(train[-10:]),
        "rollout_reward_curve": [[r["step"], round(r["reward"], 4)] for r in train],
        "wall_seconds": summary["seconds"],
        **({"command_seconds": command_seconds} if command_seconds is not None else {}),
        "rollout_seconds_total": sum(r["rollout_seconds"] for r in train),
        "learner_seconds_total": sum(r["learner_seconds"] for r in train),
        "eval_seconds_total": sum(r["eval_seconds"] for r in evals),
        "mean_step_seconds": sum(r["step_seconds"] for r in train) / len(train),
        "mean_learner_seconds": sum(r["learner_seconds"] for r in train) / len(train),
        "mean_rollout_seconds": sum(r["rollout_seconds"] for r in train) / len(train),
        **{f"{k}_{end}10": sum(r[k] for r in rows) / len(rows)
           for k in ("rollout_tokens_per_step", "rollout_mean_confidence") if k in train[0]
           for end, rows in (("first", train[:10]), ("last", train[-10:]))},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(SPEC), help="the job spec (default: deploy/jobs/tiny-sudoku.toml)")
    p.add_argument("--algorithms", nargs="+", default=["bgpo", "naive_elbo", "diffu_grpo"])
    p.add_argument("--steps", type=int, default=None, help="override train.steps (default: the spec's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed values (default: the spec's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="further spec override for every run (repeatable), e.g. rollout.engine=cached")
    p.add_argument("--tag", default=None, help="prefix of the run names (and PNGs) when --set is used")
    p.add_argument("--out", default=None, help="default: bench/results/<spec file's stem>.json")
    p.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    p.add_argument("--summarize", action="store_true",
                   help="do not train: summarize the runs already in --runs-dir (ones cut short marked partial)")
    args = p.parse_args()
    if args.summarize and not args.runs_dir:
        p.error("--summarize needs --runs-dir")
    if args.overrides and not args.tag:
        p.error("--set needs --tag, so the runs' PNGs do not overwrite the shipped-spec ones")
    spec = Path(args.spec).resolve()
    args.out = args.out or str(ROOT / f"bench/results/{prefix(spec)}.json")
    start = JobSpec.from_toml(spec).model.path
    asset = Path(resolve_model_path(start))
    load_at_start = os.getloadavg()
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="dlrl-bench-"))
    results = Path(args.out).parent
    rows = []
    for a in args.algorithms:
        for seed in args.seeds or [None]:
            run, seconds = (runs_dir / run_name(a, seed, args.tag), None) if args.summarize else \
                run_one(spec, a, seed, args.steps, runs_dir, args.overrides, args.tag)
            rows.append(summarize(spec, run, a, seed, args.overrides, results, seconds))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    sft = json.loads((asset / "sft_curve.json").read_text())
    result = {
        "benchmark": "tiny Sudoku RL job, held-out greedy reward, algorithms at equal steps",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "spec": str(spec.relative_to(ROOT)),
        "start_checkpoint": {"path": start, "sft_recipe": sft["recipe"],
                             "teacher": sft["teacher"], "sft_saved_at_step": sft["saved_at_step"],
                             "sft_curve": sft["curve"]},
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "runs": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['algorithm']:11s} seed {r['seed']}  held-out {r['first_eval_reward']:.3f} -> {r['last3_eval_reward']:.3f}"
              f" (gain {r['gain']:+.3f})  {r['wall_seconds'] / 60:.1f} min, {r['mean_step_seconds']:.2f} s/step")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
