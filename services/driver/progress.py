"""What a run leaves behind for a person: a progress line per step, metrics.jsonl, samples.jsonl, reward.png
(and, with runtime.tracker, TensorBoard events: services.driver.tracker)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

from services.driver.samples import console_line, truncate_samples, write_samples
from services.driver.tracker import TensorBoardTracker


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def loss_moves(spec) -> bool:
    """Whether the step's loss and |d| can be non-zero, and so are worth a place on the progress line.

    On-policy with one update per batch the old policy is the current one: d = l_new - l_old = 0,
    so every ratio is 1, no token is clipped and the loss is -mean(advantage) = 0 up to rounding
    (group advantages sum to zero): only the gradient moves. They move with several updates per
    batch (the last update's d is logged) or with stale rollouts (max_staleness >= 1: the workers'
    behaviour terms differ from the learner's from the first update on)."""
    return spec.train.updates_per_batch > 1 or spec.runtime.max_staleness > 0


class RunLog:
    """Appends one JSON line per record to <run>/metrics.jsonl and prints a progress line.

    Step numbers, one convention everywhere (metrics.jsonl, the console, reward.png, the job API,
    TensorBoard): `step` is the number of learner steps done, which is also the weights version. The
    train record of step k is the k-th update (it trained rollout batch k-1 and made version k); the
    eval record of step k evaluates version k (step 0: the starting model)."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0,
                 sink: Callable[[dict[str, Any]], None] | None = None, show_loss: bool = True,
                 tracker: TensorBoardTracker | None = None) -> None:
        self.run_dir = run_dir
        self.sink = sink  # also receives every record (the job service stores them in Redis)
        self.tracker = tracker
        self.show_loss = show_loss  # see loss_moves
        self.path = run_dir / "metrics.jsonl"
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.last_eval: float | None = None
        truncate_samples(run_dir, start_step)  # a fresh run (0) starts a new file; a resumed one redoes its evals

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.sink is not None:
            self.sink(record)
        if self.tracker is not None:
            self.tracker.log(record)

    def eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Log the evaluation of version `step`; its `samples` (if any) go to samples.jsonl."""
        metrics = dict(metrics)
        samples = metrics.pop("samples", None) or []
        self.last_eval = metrics["eval_reward"]
        self.write({"kind": "eval", "step": step, **metrics})
        print(f"[eval] step {step:4d}/{self.total}  held-out reward {metrics['eval_reward']:.3f}"
              f"  solved {metrics.get('eval_solved', float('nan')):.2f}", flush=True)
        if samples:
            write_samples(self.run_dir, step, samples)
            print(console_line(samples), flush=True)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Log learner step `step` (1-based: the steps done once it finished, its weights version)."""
        self.write({"kind": "train", "step": step, **metrics})
        done = step - self.start_step
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        evaluated = f"  eval {self.last_eval:.3f}" if self.last_eval is not None else ""
        loss = f"  loss {metrics['loss']:+.4f}  |d| {metrics['d_abs']:.4f}" if self.show_loss else ""
        print(
            f"step {step:4d}/{self.total}  reward {metrics['reward']:.3f}"
            f" (group std {metrics.get('reward_std_in_group', float('nan')):.3f},"
            f" {100 * metrics.get('zero_adv_groups', float('nan')):.0f}% groups flat){evaluated}{loss}"
            f"  gnorm {metrics['grad_norm']:.2f}"
            f"  gen {metrics.get('rollout_tokens_per_s', 0):.0f} tok/s"
            f"  learn {metrics['learner_tokens_per_s']:.0f} tok/s  {metrics['step_seconds']:.1f}s/step"
            f"  ETA {_fmt_seconds(eta)}",
            flush=True,
        )

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_rewards(run_dir: Path, title: str | None = None) -> Path:
    """reward.png: training reward per step (and its moving average) with held-out evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["reward"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_reward"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=1, label="rollout reward (per step)")
        w = max(1, len(ys) // 20)
        avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, avg, color="tab:blue", lw=2, label=f"rollout reward ({w}-step mean)")
    if evals:
        xs, ys = zip(*evals)
        ax.plot(xs, ys, "o-", color="tab:red", lw=2, ms=4, label="held-out reward (greedy)")
    ax.set_xlabel("learner step")
    ax.set_ylabel("reward")
    lo = min([0.0] + [y for _, y in train + evals if not math.isnan(y)])
    ax.set_ylim(lo, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or run_dir.name)
    fig.tight_layout()
    out = run_dir / "reward.png"
    fig.savefig(out)
    plt.close(fig)
    return out
